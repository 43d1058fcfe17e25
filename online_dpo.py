"""Online DPO in one file: Online AI Feedback (Guo et al. 2024, arXiv 2402.04792).

Each step, for every prompt of the batch: sample K (2) completions from the *current* policy ->
reward models and/or functions score them, or an LLM judge compares them -> the better is "chosen",
the worse "rejected" -> DPO (sigmoid) or IPO loss against a frozen reference model.

    python online_dpo.py --preset tiny               # the embedded offline world (later flags override it)
    torchrun --nproc_per_node 8 online_dpo.py --beta 0.1    # one process per GPU: DDP, or --distributed fsdp to shard

Flags are spelled as in TRL's OnlineDPOConfig and TrainingArguments. Read main() first:
its loop is one step in numbered stages; above it, what a step uses, in order; below,
what a first reading can skip.
"""

import collections
import concurrent.futures
import contextlib
import copy
import datetime
import difflib
import functools
import importlib
import io
import json
import math
import os
import random
import re
import runpy
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Annotated, Literal

import datasets
import huggingface_hub
import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
import tyro
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          StaticCache, get_scheduler, set_seed)
from tyro.constructors import PrimitiveConstructorSpec

from dpo_kernels import fp32_head, linear_logprobs, naive_token_logprobs
from dpo_kernels.decode import EAGER, Decoder, draw, filter_logits, make_decoder
from dpo_kernels.durable import (SIGNALS, STOP, Stopped, lock_output_dir, on_signal, remove, replace_file, signal_exit,
                             stop_signals, unlock_output_dir, written_in_place)
from dpo_kernels.judge import JUDGE_PROMPT, as_text, judge_answer_ids, judge_locally, judge_texts
from dpo_kernels.lora import AdaptersOff, add_adapters, load_adapter, merged, save_adapter

TINY_WORLD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmarks", "tiny")
OFFLINE_HINT = "no network or Hub? `python online_dpo.py --preset tiny` trains the embedded world offline"


# ---- Args


def _parse_bool(words):
    word = words[0].lower() if words else "true"  # a bare `--flag`: True
    if word not in ("true", "1", "yes", "false", "0", "no"):
        raise ValueError(f"expected True or False, got {words[0]!r}")
    return word in ("true", "1", "yes")


# Booleans take `--flag`, `--flag True` and `--flag False`, as in TRL's commands.
Bool = Annotated[bool, PrimitiveConstructorSpec(
    nargs=(0, 1), metavar="{True,False}", instance_from_str=_parse_bool, is_instance=lambda x: isinstance(x, bool),
    str_from_instance=lambda x: [str(x)])]


@dataclass
class Args:
    preset: Literal["tiny", "qwen2-0.5b", "pythia-1b-tldr"] | None = None
    """a named setup (PRESETS): its values become the defaults"""

    # --- models and data
    model_name_or_path: str = "Qwen/Qwen2-0.5B-Instruct"
    """policy to train: a Hub id or a local directory"""
    ref_model_path: str | None = None
    """reference model; None: a frozen copy of the policy"""
    reward_model_path: tuple[str, ...] | None = None
    """reward models (sequence classifiers); None: trl-lib/Qwen2-0.5B-Reward, unless other feedback"""
    reward_funcs: tuple[str, ...] = ()
    """Python reward functions: `module:function` or `path/to/file.py:function`"""
    reward_weights: tuple[float, ...] | None = None
    """a weight per reward, reward models first; None: all 1"""
    dataset_name: str = "trl-lib/ultrafeedback-prompt"
    """prompts: a Hub dataset, a `save_to_disk` directory, or a .json/.jsonl/.parquet/.csv file"""
    dataset_config: str | None = None
    """dataset configuration name"""
    dataset_train_split: str = "train"
    """split to train on"""
    dataset_test_split: str = "test"
    """split of held-out prompts, to compare reference and trained policy on"""
    eval_prompts: int = 64
    """held-out prompts per comparison (0: none)"""
    dataset_prompt_column: str = "prompt"
    """prompt column: text, or lists of {role, content} messages"""
    model_init_kwargs: str | None = None
    """JSON dict for from_pretrained of policy and reference, e.g. '{"attn_implementation": "sdpa"}'"""
    trust_remote_code: Bool = False
    """let models and tokenizers run their Hub repository's code (trusted sources only)"""

    # --- LoRA (TRL's ModelConfig)
    use_peft: Bool = False
    """train LoRA adapters on the frozen policy; the reference: the policy, adapters off"""
    lora_r: int = 16
    """rank of the adapters"""
    lora_alpha: float = 32
    """the adapters' output scale is lora_alpha / lora_r"""
    lora_dropout: float = 0.05
    """dropout on the adapters' input (with --disable_dropout False only, as in TRL)"""
    lora_target_modules: tuple[str, ...] = ("all-linear",)
    """linear layers to adapt, by name (q_proj v_proj ...); all-linear: every one in the decoder blocks"""

    # --- online DPO (OnlineDPOConfig)
    beta: tuple[float, ...] = (0.1,)
    """KL strength (IPO: tau); several: one per epoch, the last for the rest"""
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    """sigmoid (DPO), ipo, hinge (SLiC) or robust (rDPO): see dpo_loss"""
    label_smoothing: float = 0.0
    """the chance that a preference is flipped, in [0, 0.5): sigmoid becomes cDPO, robust corrects for it"""
    rpo_alpha: float | None = None
    """RPO: add rpo_alpha x the chosen completion's NLL per token to the loss (None: off)"""
    sync_ref_model: Bool = False
    """TR-DPO: the reference moves toward the policy every ref_model_sync_steps"""
    ref_model_mixup_alpha: float = 0.6
    """TR-DPO: the reference becomes alpha x policy + (1 - alpha) x reference"""
    ref_model_sync_steps: int = 512
    """TR-DPO: steps between the reference's moves"""
    max_new_tokens: int = 64
    """the most tokens sampled per completion"""
    max_length: int = 256
    """the most prompt + completion tokens (prompts cut from the left)"""
    temperature: float = 0.9
    """sampling temperature"""
    top_p: float = 1.0
    """keep the likeliest tokens that sum to top_p (1: off)"""
    top_k: int = 0
    """keep the top_k likeliest tokens (0: off)"""
    min_p: float | None = None
    """drop tokens less likely than min_p x the likeliest (None: off)"""
    repetition_penalty: float = 1.0
    """penalise tokens already in prompt or completion (> 1: fewer repeats; 1: off)"""
    generation_kwargs: str | None = None
    """JSON dict over the sampling flags above; also do_sample, suppress_tokens, eos_token_id"""
    missing_eos_penalty: float | None = None
    """subtracted from the score of a completion without EOS"""
    disable_dropout: Bool = True
    """no dropout in the policy and the reference"""
    num_samples: int = 2
    """completions per prompt; the pair: the best and the worst (a judge compares 2)"""
    drop_ties: Bool = False
    """leave out of the loss (and count) the prompts whose best and worst sample tie"""
    tie_threshold: float = 0.0
    """best and worst scores that differ by this or less tie (0: only equal scores)"""
    judge_model_path: str | None = None
    """AI feedback: a causal LM judges which completion is better"""
    judge_prompt: str | None = None
    """the judge's instruction with {prompt}, {response_a}, {response_b}; None: JUDGE_PROMPT"""
    judge_undecided: float = 0.05
    """a judgement within this of 0.5 (P(first is better)) is undecided and leaves the pair out of the loss"""
    judge_api_base: str | None = None
    """the judge over an OpenAI-compatible API, e.g. http://localhost:8000/v1 (vLLM); key: $OPENAI_API_KEY"""
    judge_api_model: str | None = None
    """model name for --judge_api_base"""
    judge_api_concurrency: int = 16
    """judge requests in flight at once"""
    judge_api_timeout: float = 60.0
    """seconds to wait for a judge's answer before retrying"""
    judge_api_retries: int = 3
    """retries of a judge request after a timeout, a connection error, a 429 or a 5xx"""
    prefix_sharing: Bool = True
    """each prompt once: one prefill for its K samples, one [prompt | chosen | rejected] row per pair"""

    # --- training (TrainingArguments)
    output_dir: str = "Qwen2-0.5B-OnlineDPO"
    """for the trained model, checkpoints and metrics.jsonl"""
    learning_rate: float = 5e-7
    """AdamW peak learning rate"""
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = "linear"
    """after warmup: linear to 0, cosine to 0, or constant"""
    warmup_steps: float = 0
    """linear warmup: steps, or a fraction of all if < 1"""
    weight_decay: float = 0.0
    """AdamW weight decay (not on biases and norms)"""
    max_grad_norm: float = 1.0
    """clip the gradient to this global norm (0: off)"""
    per_device_train_batch_size: int = 8
    """prompts per micro-batch"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    num_train_epochs: float = 3.0
    """passes over the prompts (unless max_steps > 0)"""
    max_steps: int = -1
    """optimizer steps; overrides num_train_epochs when > 0"""
    logging_steps: float = 10
    """log every N steps, or a fraction of all if < 1"""
    save_steps: float = 500
    """save output_dir/checkpoint-N every N steps or fraction (0: the final save only)"""
    eval_steps: float = 0
    """every N steps or fraction: log the pairs (completions.jsonl, wandb), compare policy and reference (0: end)"""
    save_total_limit: int | None = None
    """keep the newest N checkpoints (None: all)"""
    resume_from_checkpoint: str | None = None
    """continue a stopped run exactly: a checkpoint directory, or `latest`"""
    overwrite_output_dir: Bool = False
    """start afresh in an output_dir holding an earlier run (replaces it)"""
    seed: int = 42
    """seed of the data order, sampling and initialisation"""
    use_cpu: Bool = False
    """train on the CPU even with a GPU (processes talk over gloo)"""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """under torchrun: ddp keeps a whole policy per rank; fsdp shards it and the frozen models"""
    bf16: Bool | None = None
    """bf16 mixed precision (fp32 master weights); None: if the GPU supports it"""
    gradient_checkpointing: Bool = True
    """recompute activations in the training forward, to save memory"""
    torch_compile: Bool = False
    """compile the policy's one-token decode step (torch.compile; on a GPU replayed as CUDA graphs)"""
    report_to: Literal["none", "wandb"] = "none"
    """also send metrics to Weights & Biases (project: $WANDB_PROJECT or online-dpo)"""
    run_name: str | None = None
    """run name shown in wandb"""
    push_to_hub: Bool = False
    """upload the final model and tokenizer to the Hub"""
    hub_model_id: str | None = None
    """Hub repository for --push_to_hub; None: output_dir's name"""


PRESETS = {
    # The embedded world (benchmarks/tiny_world.py): the reward likes
    # positive, short, ended answers.
    "tiny": dict(
        model_name_or_path=f"{TINY_WORLD}/policy", reward_model_path=(f"{TINY_WORLD}/reward",), use_cpu=True,
        dataset_name=f"{TINY_WORLD}/prompts", output_dir="tiny-OnlineDPO", bf16=False, gradient_checkpointing=False,
        max_new_tokens=64, max_length=128, learning_rate=1e-4, warmup_steps=0.1, per_device_train_batch_size=16,
        max_steps=150, logging_steps=10, save_steps=0),
    # The spec's quick start: the Args defaults.
    "qwen2-0.5b": dict(),
    # The spec's 1B TL;DR benchmark (it adds --push_to_hub).
    "pythia-1b-tldr": dict(
        model_name_or_path="trl-lib/pythia-1b-deduped-tldr-sft", dataset_name="trl-lib/tldr", save_steps=0.1,
        reward_model_path=("trl-lib/pythia-1b-deduped-tldr-rm",), output_dir="pythia-1b-deduped-tldr-online-dpo",
        per_device_train_batch_size=8, gradient_accumulation_steps=2, num_train_epochs=3, max_new_tokens=53,
        warmup_steps=0.1, missing_eos_penalty=1.0),
}


class UsageError(ValueError):
    """Bad input: the message names it and says what to do."""


class TrainingError(RuntimeError):
    """Training cannot go on: the message says why and what to do."""


USER_FAULTS = (Exception, SystemExit, KeyboardInterrupt)  # a reward function's sys.exit() too


def why(e):  # an exception as the error line shows it
    return f"{type(e).__name__}: {e}"


class FeedbackError(UsageError):
    """A reward function or the judge failed on the completions."""


# ---- Loading models


def load_policy(path, args, device, world, bf16, resume=False):
    """The policy in fp32 (bf16 runs under autocast), and what the training forward goes through:
    DDP's wrapper (it averages gradients over ranks), or the policy."""
    kwargs = {"dtype": torch.float32} | json_dict(args.model_init_kwargs, "model_init_kwargs")
    policy = load_model(AutoModelForCausalLM, path, args, **kwargs)
    # LoRA first, so that turning dropout off turns the adapters' off too (as TRL).
    if args.use_peft:
        add_lora(policy, args, resume=path if resume else None)
    if args.disable_dropout:
        for module in policy.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    if args.gradient_checkpointing:  # in train mode only: sampling (eval mode) keeps its KV cache
        policy.activation_checkpointing_enable()
    policy.train()
    fsdp = world > 1 and args.distributed == "fsdp"
    mixed_precision = None
    if bf16:
        mixed_precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    policy = place(policy, device, fsdp, mixed_precision)
    if world == 1 or fsdp:  # FSDP2 shards the model in place: no wrapper
        return policy, policy
    device_ids = [device.index] if device.type == "cuda" else None
    return policy, DDP(policy, device_ids=device_ids, init_sync=False)  # place() synced them


def load_frozen(auto_class, path, args, device, shard, bf16, **kwargs):
    """A model that only runs forwards (reference, reward model, judge): no gradients, eval mode;
    bf16 weights when the matmuls run in bf16."""
    kwargs = {"dtype": torch.float32} | kwargs
    if bf16:
        kwargs["dtype"] = torch.bfloat16
    model = load_model(auto_class, path, args, **kwargs)
    model.requires_grad_(False).eval()
    if bf16 and isinstance(getattr(model, "score", None), torch.nn.Linear):  # a reward model's head
        model.score.register_forward_hook(fp32_head)  # rewards not rounded to bf16
    return place(model, device, shard)


def load_reference(args, policy, resume, frozen):
    """The reference: the policy with its adapters off (--use_peft), or a frozen model; with
    --sync_ref_model in fp32 (the policy mixes into it), and on a resume the checkpoint's."""
    if args.use_peft:
        return AdaptersOff(policy)
    path = args.ref_model_path or args.model_name_or_path
    if resume and args.sync_ref_model:
        path = os.path.join(resume, "reference")
    return load_frozen(AutoModelForCausalLM, path, **frozen | {"bf16": frozen["bf16"] and not args.sync_ref_model},
                       **json_dict(args.model_init_kwargs, "model_init_kwargs"))


def decoder_blocks(model):
    """The model's repeated blocks (Qwen2DecoderLayer, ...): what FSDP2 shards
    one by one and LoRA adapts."""
    names = model._no_split_modules if getattr(model, "_no_split_modules", None) else []
    return [module for module in model.modules() if type(module).__name__ in names]


# ---- Several processes: torchrun, DDP, FSDP2 (with one process, all of this does nothing)

# Ranks wait while rank 0 writes a checkpoint (7B: minutes); NCCL's default 10 would abort them mid-write.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)


def init_distributed(args):
    """Join the process group that torchrun set up, one device per rank.
    Returns rank, world size, device."""
    check_torchrun()  # its variables: all or none, whole numbers, ranks in order
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and not args.use_cpu
    if cuda and local_rank >= torch.cuda.device_count():
        raise UsageError(f"LOCAL_RANK {local_rank} but {torch.cuda.device_count()} GPUs: lower --nproc_per_node")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None,
                                timeout=COLLECTIVE_TIMEOUT)
    return rank, world, device


def is_main():
    """Rank 0 alone prints and writes files."""
    return os.environ.get("RANK", "0") == "0"


def say(text):
    if is_main():
        print(text)


def place(model, device, shard, mixed_precision=None):
    """Move the model to this rank's device or, with shard, split it over all ranks with FSDP2, a
    unit per decoder block, so that one block's weights are gathered at a time. Under torchrun rank 0
    alone has read the weights (load_model) and sends them."""
    if not dist.is_initialized():
        return model.to(device)
    meta = next(model.parameters()).is_meta
    whole = model.state_dict() if is_main() else {}  # what rank 0 sends
    if shard:
        mesh = device_mesh(device.type)
        if mixed_precision is None:
            mixed_precision = MixedPrecisionPolicy()
        for block in decoder_blocks(model):
            fully_shard(block, mesh=mesh, mp_policy=mixed_precision)
        # No backward reshards a frozen root: it would stay gathered.
        frozen = not any(p.requires_grad for p in model.parameters())
        fully_shard(model, mesh=mesh, mp_policy=mixed_precision, reshard_after_forward=True if frozen else None)
    from_rank_0(model, whole, device, shard, meta)
    return model


@contextlib.contextmanager
def gathered(model):
    """Under FSDP2, gather every unit once for a whole decode: then decoding needs no collectives,
    and ranks whose completions end early need not run forwards for the others."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    trains = any(p.requires_grad for p in model.parameters())
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        root = getattr(model, "module", model)
        for unit in units:  # as place() set them
            unit.set_reshard_after_forward(unit is not root or not trains, recurse=False)
            unit.reshard()


def sync_gradients(model, sync):
    """With gradient accumulation, DDP averages gradients (all-reduce) in the last micro-batch's
    backward only. FSDP2 reduce-scatters in every one: unsynced, it would keep whole fp32
    gradients on every rank (7B: 28 GB), not its shard."""
    if isinstance(model, DDP):
        model.require_backward_grad_sync = sync  # what DDP's no_sync() context sets


# ---- Prompts


def micro_batches(dataset, args, plan, rank, world, start):
    """Yield this rank's micro-batches of B prompts, from global micro-batch `start` on (a resumed
    run starts mid-epoch). Each epoch shuffles the prompts with a seed of its own; rank r takes
    the r-th B of each micro-step."""
    B = args.per_device_train_batch_size
    per_epoch = plan.per_epoch * args.gradient_accumulation_steps  # micro-batches, on each rank
    first_epoch = start // per_epoch
    for epoch in range(first_epoch, math.ceil(plan.total / plan.per_epoch)):
        generator = torch.Generator().manual_seed(args.seed + epoch)
        order = torch.randperm(len(dataset), generator=generator).tolist()
        first_batch = start % per_epoch if epoch == first_epoch else 0
        for i in range(first_batch, per_epoch):
            first = (i * world + rank) * B
            yield dataset[order[first : first + B]]


def prompt_token_ids(tokenizer, prompts):
    """Each prompt's token ids, whole. A conversation goes through the chat template, with the
    assistant's turn opened so that the completion is the assistant's answer."""
    if is_conversational(prompts[0]) and tokenizer.chat_template is None:
        raise UsageError("conversational prompts need a tokenizer with a chat template; this one has none")
    texts = []
    for prompt in prompts:
        if is_conversational(prompt):
            prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        texts.append(prompt)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if min(map(len, ids)) == 0:
        raise UsageError("a prompt is empty after tokenization")
    return ids


def encode_prompts(tokenizer, prompts, max_prompt_len):
    """The last max_prompt_len tokens of each prompt, as ids and mask (N, P), left-padded: every row
    then ends in a real token, so that decoding appends each row's next token in the same column."""
    seqs = [ids[-max_prompt_len:] for ids in prompt_token_ids(tokenizer, prompts)]
    batch = tokenizer.pad({"input_ids": seqs}, padding_side="left", return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def positions(mask):
    """Position ids of left-padded rows (N, L): 0 at each row's first real token
    (and on the padding before it)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


# ---- Sampling with a KV cache


@torch.no_grad()
def sample(model, prompt_ids, prompt_mask, max_new_tokens, stop_ids, pad_id, num_samples=1, temperature=1.0, top_k=0,
           top_p=1.0, min_p=None, repetition_penalty=1.0, do_sample=True, suppress_tokens=None, generator=None,
           decoder=EAGER):
    """Sample K = num_samples completions of each of N prompts, all rows at once, over a KV cache.
    Returns completion ids and mask (K*N, T), rows [all 1st samples, ..., all K-th samples]; each
    row ends at its first stop token, and padding follows it. `decoder` (dpo_kernels/decode.py) runs the
    one-token steps: eagerly, or compiled with --torch_compile."""
    N, P = prompt_ids.shape
    K = num_samples
    device = prompt_ids.device
    stop = torch.tensor(stop_ids, device=device)
    width = decoder.width(model, P, max_new_tokens)
    cache = StaticCache(config=model.config, max_cache_len=width)
    # One attention mask for the whole decode, (N, width): each new token opens the next column.
    mask = torch.cat([prompt_mask, prompt_mask.new_zeros(N, width - P)], 1)
    out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=positions(prompt_mask), cache=cache,
                logits_to_keep=1)
    logits = out.logits[:, -1]  # (N, V)
    # Each prompt was prefilled once; the rows of its K samples decode from copies of its cache.
    cache = decoder.decode_cache(model, cache, K)
    if K > 1:
        prompt_ids = prompt_ids.repeat(K, 1)
        prompt_mask = prompt_mask.repeat(K, 1)
        mask = mask.repeat(K, 1)
        logits = logits.repeat(K, 1)
        N *= K
    next_position = prompt_mask.sum(-1, keepdim=True)  # (N, 1)
    seen = None
    if repetition_penalty != 1.0:  # (N, V): the prompt's tokens (padding aside), then the completion's
        seen = torch.zeros(N, logits.size(-1), dtype=torch.bool, device=device)
        seen.scatter_(1, prompt_ids.where(prompt_mask.bool(), prompt_ids[:, -1:]), True)
    tokens = prompt_ids.new_full((N, max_new_tokens), pad_id)
    suppress = None
    if suppress_tokens:  # on the device once, not every token
        suppress = torch.tensor(suppress_tokens, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        scores = logits.float()
        if seen is not None:  # as generate(): positive logits divided, negative ones multiplied
            penalised = torch.where(scores > 0, scores / repetition_penalty, scores * repetition_penalty)
            scores = torch.where(seen, penalised, scores)
        if suppress is not None:
            scores[:, suppress] = float("-inf")
        if do_sample:
            scores = filter_logits(scores / temperature, top_k, top_p, min_p)
            token = draw(scores.softmax(-1), generator)  # as multinomial, without its host syncs
        else:
            token = scores.argmax(-1)
        token = token.masked_fill(done, pad_id)  # (N,)
        tokens[:, t] = token
        done |= torch.isin(token, stop)
        if t == max_new_tokens - 1:
            break
        if t % decoder.check_every == decoder.check_every - 1 and done.all():
            break
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        mask[:, P + t] = 1
        logits = decoder(model, token, mask, next_position + t, cache)
    is_stop = torch.isin(tokens, stop).long()
    after_stop = (is_stop.cumsum(-1) - is_stop) > 0
    completion_mask = (~after_stop).long()
    # The longest completion: a decoder checking the end every few tokens may go past it.
    T = int(completion_mask.sum(1).max())
    return tokens.masked_fill(after_stop, pad_id)[:, :T], completion_mask[:, :T]


@dataclass
class Rollout:
    """What sampling and feedback need, set up once in main()."""
    args: Args
    tokenizer: object
    rank: int
    world: int
    device: torch.device
    autocast: torch.autocast  # bf16 matmuls, or a no-op
    generation: dict  # sample()'s keyword arguments
    stop_ids: list[int]
    reward_models: list  # (model, tokenizer) pairs
    reward_funcs: list
    judge: tuple | None  # a local judge: its model, its tokenizer, the ids of "A" and "B"
    packed: bool = False  # training packs each pair into one row (check_packing)
    judged: bool = False  # a judge compares the completions; rewards do not score them
    decoder: Decoder = EAGER  # the decode step: eager, or compiled (--torch_compile)
    reference: list = field(default_factory=list)  # its held-out answers and scores, sampled once (evaluate())


# What a training forward takes: prompts (left-padded) and completions (right-padded).
TrainingInputs = collections.namedtuple(
    "TrainingInputs", "prompt_ids prompt_mask completion_ids completion_mask")


@dataclass
class Samples:
    """K completions of each of B prompts, a row each, in the order [all 1st
    samples, ..., all K-th samples]."""
    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    completion_ids: torch.Tensor  # (K*B, T) right-padded
    completion_mask: torch.Tensor  # (K*B, T)
    has_eos: torch.Tensor  # (K*B,) the completion ended with a stop token
    token_ids: list[list[int]]  # each completion's tokens, padding aside
    texts: list[str]
    completions: list  # for reward functions: the texts, or assistant messages

    def training_inputs(self, pick, packed):
        """The training forward's inputs for the completions `pick` (2B,), chosen then
        rejected. Packed, each pair shares one prompt row (B prompt rows); unpacked, each
        completion has a copy of its prompt (2B)."""
        copies = 1 if packed else 2
        return TrainingInputs(self.prompt_ids.repeat(copies, 1), self.prompt_mask.repeat(copies, 1),
                            self.completion_ids[pick], self.completion_mask[pick])


def rollout(run, model, prompts, generator, k=1, window=None):
    """Sample k completions of each prompt from `model` as it is now. Prompts are cut to their last
    max_length - max_new_tokens tokens; the seconds spent go into window.sampling."""
    args = run.args
    ids, mask = encode_prompts(run.tokenizer, prompts, args.max_length - args.max_new_tokens)
    ids = ids.to(run.device)
    mask = mask.to(run.device)
    was_training = model.training
    t0 = time.perf_counter()
    model.eval()
    # Prefix sharing: sample() prefills each prompt once for its k samples. Without it, each of k
    # copies of a prompt is prefilled as a prompt of its own.
    copies = 1 if args.prefix_sharing else k
    with gathered(model), run.autocast:
        completion_ids, completion_mask = sample(
            model, ids.repeat(copies, 1), mask.repeat(copies, 1), args.max_new_tokens, run.stop_ids,
            run.tokenizer.pad_token_id, k // copies, generator=generator, decoder=run.decoder, **run.generation)
    model.train(was_training)
    if window is not None:
        window.sampling += time.perf_counter() - t0
    stop = torch.tensor(run.stop_ids, device=run.device)
    has_eos = (torch.isin(completion_ids, stop) & (completion_mask == 1)).any(1)
    token_ids = [row[m.bool()].tolist() for row, m in zip(completion_ids.cpu(), completion_mask.cpu())]  # one sync
    texts = run.tokenizer.batch_decode(token_ids, skip_special_tokens=True)
    completions = texts
    if is_conversational(prompts[0]):
        completions = [[{"role": "assistant", "content": text}] for text in texts]
    return Samples(prompt_ids=ids, prompt_mask=mask, completion_ids=completion_ids,
                   completion_mask=completion_mask, has_eos=has_eos, token_ids=token_ids, texts=texts,
                   completions=completions)


# ---- Feedback from rewards


@torch.no_grad()
def score_completions(prompts, completions, completion_ids, extra_columns, reward_models, reward_funcs, weights,
                      when=""):
    """Each (prompt, completion)'s score: the weighted sum of every reward model and function, as in
    TRL, a NaN (None) counting 0; NaN if no reward scored it, which ranks last. Returns the scores
    (N,) and each reward (N, R)."""
    device = weights.device
    chat = is_conversational(prompts[0])
    columns = []
    for model, tokenizer in reward_models:
        if chat:
            texts = [tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions)]
        else:
            texts = [p + c for p, c in zip(prompts, completions)]
        batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
        columns.append(model(**batch.to(device)).logits[:, 0].float())
    for func in reward_funcs:
        # Copies: a function that edits its arguments changes nothing here.
        given = copy.deepcopy(dict(extra_columns, prompts=prompts, completions=completions,
                                   completion_ids=completion_ids))
        try:
            out = func(**given)
        except USER_FAULTS as e:
            name = getattr(func, "__name__", func)
            raise FeedbackError(f"reward function {name} fails{when}: {why(e)}") from None
        columns.append(reward_column(out, func, len(prompts), device))
    per_reward = torch.stack(columns, 1)  # (N, R)
    total = (per_reward * weights).nansum(1)
    unscored = per_reward.isnan().all(1)
    return total.masked_fill(unscored, math.nan), per_reward


def score(run, prompts, samples, columns):
    """The samples' scores (N,), less --missing_eos_penalty for each
    completion that has no stop token."""
    n_rewards = len(run.reward_models) + len(run.reward_funcs)
    weights = torch.tensor(run.args.reward_weights or [1.0] * n_rewards, device=run.device)
    with all_or_none(), run.autocast:  # one rank failing stops all
        scores, _ = score_completions(
            prompts, samples.completions, samples.token_ids, columns, run.reward_models, run.reward_funcs, weights)
    if run.args.missing_eos_penalty is not None:
        scores = scores - run.args.missing_eos_penalty * (~samples.has_eos).float()
    return scores


# ---- Feedback from an LLM judge (the paper's annotator)

JUDGE_MIN_MASS = 0.5  # P(A) + P(B) below this in either order: no answer A or B, an invalid pair


def judge_decisions(q, mass, undecided):
    """q = P(A) / (P(A) + P(B)) and mass = P(A) + P(B), (2N,): each pair as (first, second), then
    swapped. Returns p = P(first is better) (N,), averaged over both orders so that a judge biased
    to one position gives 0.5; valid (A or B in both orders); decided (p further than `undecided`
    from 0.5)."""
    N = q.numel() // 2
    p = (q[:N] + 1 - q[N:]) / 2
    valid = (mass[:N] >= JUDGE_MIN_MASS) & (mass[N:] >= JUDGE_MIN_MASS)
    decided = valid & ((p - 0.5).abs() > undecided)
    return p, valid, decided


def judge(run, prompts, first, second):
    """Ask the judge about each pair in both orders, a local model or one over HTTP. Returns p,
    valid and decided (N,) as judge_decisions() does, and which of the 2N requests failed."""
    args = run.args
    texts = judge_texts(args.judge_prompt or JUDGE_PROMPT, prompts, first, second)
    if args.judge_api_base:  # a failed request makes its pair invalid
        q, mass, failed = judge_over_http(texts, args)
    else:
        model, tokenizer, answer_ids = run.judge
        with run.autocast:
            q, mass = judge_locally(model, tokenizer, texts, answer_ids, 2 * args.per_device_train_batch_size)
        failed = torch.zeros(len(texts), dtype=torch.bool)
    p, valid, decided = judge_decisions(q.to(run.device), mass.to(run.device), args.judge_undecided)
    return p, valid, decided, failed.to(run.device)


# ---- Pairing


def pair(scores, num_samples=2, tie_threshold=0.0):
    """Each prompt's best and worst of its K samples, by scores (K*B,) in sample()'s
    row order; NaN ranks last. Returns the rows of the best (B,), of the worst (B,),
    and whether the two tie (B,)."""
    s = scores.view(num_samples, -1).nan_to_num(nan=-math.inf)  # (K, B)
    prompts = torch.arange(s.size(1), device=scores.device)
    best = s.argmax(0)  # the first maximum
    # The last minimum: when all K samples score the same, best and worst
    # are still two different samples.
    worst = num_samples - 1 - s.flip(0).argmin(0)
    tie = s[best, prompts] - s[worst, prompts] <= tie_threshold
    return best * s.size(1) + prompts, worst * s.size(1) + prompts, tie


@dataclass
class Pairs:
    """A micro-batch's preferences, as rows of its K*B samples."""
    chosen: torch.Tensor  # (B,) each prompt's chosen completion
    rejected: torch.Tensor  # (B,) and its rejected one
    kept: torch.Tensor  # (B,) bool: the pair goes into the loss
    scores: torch.Tensor | None  # (2B,) the chosen's scores, then the rejected's; None: a judge
    metrics: dict  # per-pair feedback metrics, pairs/* or judge/*
    logged: dict  # (B,) each, for completions.jsonl


def preferences(run, prompts, samples, columns):
    """Stages 3-4 for the K*B samples of B prompts: which completion of each prompt is chosen and
    which rejected. This is the one place that knows where preferences come from: a judge, or
    rewards (the best and the worst)."""
    args = run.args
    B = len(prompts)
    if run.judged:
        p, valid, kept, failed = judge(run, prompts, samples.texts[:B], samples.texts[B:])
        first = torch.arange(B, device=run.device)  # prompt i's first sample: row i; its second: B + i
        first_wins = p >= 0.5
        p_chosen = torch.maximum(p, 1 - p)  # how sure the judge is of its choice
        metrics = {"judge/p_chosen": p_chosen[kept], "judge/invalid": (~valid).float(),
                   "judge/undecided": (valid & ~kept).float()}
        if args.judge_api_base:
            metrics["judge/api_failures"] = failed.float()
        chosen = torch.where(first_wins, first, first + B)
        rejected = torch.where(first_wins, first + B, first)
        return Pairs(chosen=chosen, rejected=rejected, kept=kept, scores=None, metrics=metrics,
                     logged={"p_chosen": p_chosen})
    scores = score(run, prompts * args.num_samples, samples, columns)  # (K*B,)
    chosen, rejected, tie = pair(scores, args.num_samples, args.tie_threshold)
    unscored = scores[chosen].isnan()  # the best unscored: all of its prompt's samples are
    kept = ~unscored & ~(tie & args.drop_ties)
    return Pairs(chosen=chosen, rejected=rejected, kept=kept, scores=scores[torch.cat([chosen, rejected])],
                 metrics={"pairs/ties": tie.float(), "pairs/unscored": unscored.float()},
                 logged={"score_chosen": scores[chosen], "score_rejected": scores[rejected]})


# ---- Log-probs and loss


def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, impl="fused", packed=False):
    """Per-token log-probs of the completions under `model`, (N, T), 0 on padding. fused: from the
    last hidden states and the output embedding, tile by tile (dpo_kernels/), so that no (tokens,
    vocabulary) logits exist; naive: from the logits. packed: a row per pair (training_rows())."""
    ids, mask, position_ids, row, column = training_rows(
        prompt_ids, prompt_mask, completion_ids, completion_mask, packed)
    inner = getattr(model, "module", model)  # DDP wraps the model; FSDP2 shards it in place
    if mask.dim() == 4:  # packed: additive, 0 where a query may look, the dtype's min elsewhere
        dtype = inner.dtype
        blocked = torch.finfo(dtype).min
        mask = torch.zeros(mask.shape, dtype=dtype, device=ids.device).masked_fill(~mask, blocked)
    real = completion_mask.bool()
    # (n,) for each real completion token: the row and column whose output predicts it, and the token.
    row = row[real]
    column = column[real]
    targets = completion_ids[real]
    head = inner.get_output_embeddings()
    config = inner.config
    # Gemma 2 and Cohere transform their logits (a softcap, a scale), which
    # the fused path would leave out.
    plain_head = head.bias is None and getattr(config, "final_logit_softcapping", None) is None \
        and getattr(config, "logit_scale", None) in (None, 1.0)
    naive = impl == "naive" or not plain_head
    first = prompt_ids.size(1) - 1  # the prompt's last token predicts the first completion token
    if naive:
        logits_to_keep = ids.size(1) - first
    else:  # no logits at all
        logits_to_keep = torch.empty(0, dtype=torch.long, device=ids.device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                logits_to_keep=logits_to_keep, output_hidden_states=not naive)
    if naive:
        logps = naive_token_logprobs(out.logits[row, column - first], targets)
    else:
        # head.weight is read after the forward: FSDP2's root keeps it gathered until the backward, a
        # frozen one gathers it again.
        weight = head.weight
        if isinstance(weight, DTensor):
            weight = weight.full_tensor()
        hidden = out.hidden_states[-1]  # after the final norm
        logps = linear_logprobs(hidden[row, column], weight, targets)
    return logps.new_zeros(completion_ids.shape).index_put((real,), logps)


def training_rows(prompt_ids, prompt_mask, completion_ids, completion_mask, packed):
    """A training forward's ids, attention mask and position ids, and for each completion token
    (N, T) the row and column whose output predicts it. Unpacked: N rows [prompt | completion].
    Packed: B rows [prompt | chosen | rejected], a 4D mask (B, 1, L, L) in which the rejected see
    the prompt but not the chosen, positions restarting after the prompt: each completion is
    computed as if it followed its prompt alone, and the prompt once per pair."""
    B, P = prompt_ids.shape
    N, T = completion_ids.shape
    device = prompt_ids.device
    t = torch.arange(T, device=device)
    if not packed:
        ids = torch.cat([prompt_ids, completion_ids], 1)
        mask = torch.cat([prompt_mask, completion_mask], 1)
        row = torch.arange(N, device=device)[:, None].expand(N, T)
        column = (P - 1 + t).expand(N, T)
        return ids, mask, positions(mask), row, column
    L = P + 2 * T
    ids = torch.cat([prompt_ids, completion_ids[:B], completion_ids[B:]], 1)  # (B, L)
    real = torch.cat([prompt_mask, completion_mask[:B], completion_mask[B:]], 1).bool()  # (B, L)
    i = torch.arange(L, device=device)
    part = (i >= P).long() + (i >= P + T).long()  # (L,) 0: prompt, 1: chosen, 2: rejected
    sees = (i[None] <= i[:, None]) & ~((part[:, None] == 2) & (part[None] == 1))  # (L, L) query x key
    # A query always sees itself, padding too, so that no row of the softmax is empty.
    mask = sees & real[:, None, :] | torch.eye(L, dtype=torch.bool, device=device)
    start = prompt_mask.sum(1, keepdim=True)  # (B, 1) each row's first completion position
    position_ids = torch.cat([positions(prompt_mask), start + t, start + t], 1)
    row = torch.arange(B, device=device).repeat(2)[:, None].expand(N, T)
    # Chosen token t is predicted at column P-1+t; rejected token t at P+T-1+t,
    # but its first token at P-1 too.
    column = torch.stack([P - 1 + t, torch.where(t == 0, P - 1, P + T - 1 + t)]).repeat_interleave(B, 0)  # (2B, T)
    return ids, mask[:, None], position_ids, row, column


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, loss_type, label_smoothing=0.0):
    """The loss of each pair (B,) from the completions' log-probs (B,) under the policy and the
    reference. h is how much more than the reference the policy prefers the chosen completion:

        h = (log pi(chosen) - log pi(rejected)) - (log pi_ref(chosen) - log pi_ref(rejected))"""
    h = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "ipo":  # IPO (Azar et al. 2023): h regressed onto 1 / (2 beta)
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":  # SLiC (Zhao et al. 2023), as RSO writes it (Liu et al. 2024, eq. 12)
        return torch.relu(1 - beta * h)
    eps = label_smoothing  # the chance that a pair's label is flipped
    right = -F.logsigmoid(beta * h)  # the loss if the label is right
    flipped = -F.logsigmoid(-beta * h)  # and if it is flipped
    if loss_type == "robust":  # rDPO (Chowdhury et al. 2024): its mean over flipped labels is the clean loss
        return ((1 - eps) * right - eps * flipped) / (1 - 2 * eps)
    # DPO (Rafailov et al. 2023); with eps, cDPO (Mitchell 2023): the expected loss under that chance
    return (1 - eps) * right + eps * flipped


# ---- Metrics


@torch.no_grad()
def step_metrics(logps, ref_logps, completion_mask, scores, chosen, rejected, has_eos, losses, beta):
    """Per-sample values of every logged metric, with TRL's names and formulas; no score metrics
    when a judge decided (scores None)."""
    logp = (logps * completion_mask).sum(1)  # (2B,)
    ref_logp = (ref_logps * completion_mask).sum(1)
    kl = logp - ref_logp
    non_score_reward = -beta * kl
    reward_chosen = beta * (logp[chosen] - ref_logp[chosen])
    reward_rejected = beta * (logp[rejected] - ref_logp[rejected])
    scored = {}
    if scores is not None:
        scored = {"objective/rlhf_reward": scores + non_score_reward, "objective/scores": scores,
                  "objective/scores_margin": scores[chosen] - scores[rejected]}
    return {
        "loss": losses.detach(),
        "objective/kl": kl,
        "objective/entropy": -logp,
        "objective/non_score_reward": non_score_reward,
        **scored,
        "rewards/chosen": reward_chosen,
        "rewards/rejected": reward_rejected,
        "rewards/margins": reward_chosen - reward_rejected,
        "rewards/accuracies": (reward_chosen > reward_rejected).float(),
        "logps/chosen": logp[chosen],
        "logps/rejected": logp[rejected],
        "val/contain_eos_token": has_eos.float(),
        "completions/mean_length": completion_mask.sum(1).float(),
        "beta": torch.full((1,), float(beta), dtype=torch.float64, device=logps.device),
    }


@dataclass
class Window:
    """What a logged line averages: sums and counts of per-sample values, and a clock."""
    sums: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    start: float = field(default_factory=time.perf_counter)
    sampling: float = 0.0  # seconds in rollout()
    steps: int = 0

    def add(self, values, counts=None):
        """Add per-sample tensors, or with `counts`, another window's sums."""
        for k, v in values.items():
            if counts is None:
                self.sums[k] = self.sums.get(k, 0.0) + v.sum()
                self.counts[k] = self.counts.get(k, 0) + v.numel()
            else:
                self.sums[k] = self.sums.get(k, 0.0) + v
                self.counts[k] = self.counts.get(k, 0) + counts[k]

    def means(self, **extra):
        """Each metric's mean over all ranks' samples (one all_reduce), `extra`, the times."""
        elapsed = time.perf_counter() - self.start
        keys = list(self.sums)
        means = {}
        tokens = 0.0
        if keys:  # none: every step since the last line was skipped
            counts = torch.tensor([float(self.counts[k]) for k in keys], dtype=torch.float64,
                                  device=self.sums[keys[0]].device)
            sums = torch.stack([self.sums[k].double() for k in keys])
            packed = torch.stack([sums, counts])  # (2, metrics): one all_reduce
            if dist.is_initialized():
                dist.all_reduce(packed)
            total, count = packed.tolist()
            means = {k: s / c for k, s, c in zip(keys, total, count) if c}  # no samples: no value
            tokens = dict(zip(keys, total)).get("completions/mean_length", 0)  # all ranks' tokens
        times = {"time/step": elapsed / self.steps, "time/sampling": self.sampling / self.steps,
                 "time/tokens_per_s": tokens / elapsed}
        return means | extra | times


# ---- Optimizer and schedule


def make_optimizer(policy, args, plan):
    """AdamW, without weight decay on biases and norms, and transformers' schedule: a linear
    warmup, then --lr_scheduler_type."""
    trained = [p for p in policy.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trained if p.ndim >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in trained if p.ndim < 2], "weight_decay": 0.0}]
    fused = next(policy.parameters()).device.type == "cuda"  # one kernel for all parameters
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, fused=fused)
    kind = {"constant": "constant_with_warmup"}.get(args.lr_scheduler_type, args.lr_scheduler_type)
    scheduler = get_scheduler(kind, optimizer, num_warmup_steps=plan.warmup, num_training_steps=plan.total)
    return optimizer, scheduler


def optimizer_step(policy, optimizer, scheduler, args, micro, stop):
    """Stage 7: clip, AdamW, schedule. Every rank skips the update if any rank's loss or gradient
    is NaN/inf or no rank kept a pair, so that replicas stay equal. Returns the gradient norm, the
    status (trained, nonfinite, empty; broken: the update made a weight NaN/inf), and whether any
    rank got a stop signal."""
    max_norm = args.max_grad_norm if args.max_grad_norm else float("inf")  # 0: the norm only
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
        grad_norm = grad_norm.full_tensor()
    nonfinite = ~torch.isfinite(micro.sums["loss"]) | ~torch.isfinite(grad_norm)
    kept_and_stop = torch.tensor([micro.counts["loss"] > 0, stop], device=grad_norm.device)
    flags = torch.stack([nonfinite, *kept_and_stop]).float()
    if dist.is_initialized():  # one all_reduce, MAX: "on any rank"
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    nonfinite, kept, stop = [bool(f) for f in flags.tolist()]
    if nonfinite:
        status = "nonfinite"
    elif not kept:
        status = "empty"
    else:
        status = "trained"
        optimizer.step()
        # Under FSDP2, each rank checks its own shards.
        shards = [p.to_local() if hasattr(p, "to_local") else p for p in policy.parameters()]
        broken = (~torch.isfinite(torch.nn.utils.get_total_norm(shards))).float().reshape(1)
        if isinstance(policy, FSDPModule):
            dist.all_reduce(broken, op=dist.ReduceOp.MAX)
        if broken.item():
            status = "broken"
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, status, stop


@torch.no_grad()
def mix_reference(ref, policy, alpha):
    """TR-DPO's soft update (Gorbatovski et al. 2024): ref = alpha * policy + (1 - alpha) * ref. Under
    FSDP2 both are sharded alike: each rank mixes its own shards."""
    for r, p in zip(ref.parameters(), policy.parameters(), strict=True):  # shaped alike (check_loading)
        r.copy_(alpha * p + (1 - alpha) * r)


# ---- main(): set up, then the training loop


def main(args):
    """Train, and return the policy (sharded under FSDP2). Under torchrun every rank runs this."""
    # 0. Check before any model loads: flags, files, data, models, rewards, the judge.
    check_args(args)
    rank, world, device = init_distributed(args)  # one process per device; rank 0 alone prints and writes
    with all_or_none(UsageError):  # one rank that cannot read a file stops all
        check_output_dir(args)
        resume = resume_point(args, world)  # the checkpoint to continue from, or None
        policy_path = resume or args.model_name_or_path
        reward_funcs = [load_reward_func(spec) for spec in args.reward_funcs]
        dataset, test_set = load_prompts(args)
        tokenizer, config = load_tokenizer(policy_path, args, "--model_name_or_path")
        check_loading(args, config)
        reward_tokenizers = [load_tokenizer(path, args, "--reward_model_path")[0] for path in args.reward_model_path]
        check_prompts(args, dataset, test_set, tokenizer, reward_tokenizers, reward_funcs)
        judge_tokenizer = check_judge(args)  # a local judge's tokenizer; the HTTP judge: a trial question
        plan = make_plan(args, len(dataset), world)
    check_same_resume(resume)
    B, GA, K = args.per_device_train_batch_size, args.gradient_accumulation_steps, args.num_samples  # a step's shape
    set_seed(args.seed)  # Python's, NumPy's and torch's streams, which reward functions may use
    bf16 = wants_bf16(args, device)

    # 1. Models: the policy (or its checkpoint), the frozen reference, the reward models or the judge.
    policy, train_model = load_policy(policy_path, args, device, world, bf16, resume=bool(resume))
    frozen = dict(args=args, device=device, shard=world > 1 and args.distributed == "fsdp", bf16=bf16)
    ref = load_reference(args, policy, resume, frozen)
    reward_models = [(load_frozen(AutoModelForSequenceClassification, path, **frozen, num_labels=1,
                                  pad_token_id=reward_tokenizer.pad_token_id), reward_tokenizer)  # it finds rows' ends
                     for path, reward_tokenizer in zip(args.reward_model_path, reward_tokenizers)]
    judge = load_judge(args, judge_tokenizer, frozen)  # a local judge, or None
    generation, stop_ids = sampling_settings(args, tokenizer, policy)
    packed = check_packing(args, policy, ref)  # a trial forward: do the models apply a 4D attention mask?
    decoder = make_decoder(args.torch_compile, policy, args.max_length, device, say)  # eager, or compiled
    run = Rollout(args=args, tokenizer=tokenizer, rank=rank, world=world, device=device,
                  autocast=torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16), generation=generation,
                  stop_ids=stop_ids, reward_models=reward_models, reward_funcs=reward_funcs, judge=judge,
                  packed=packed, judged=bool(args.judge_model_path or args.judge_api_base), decoder=decoder)
    say(feedback_line(args))
    generator = torch.Generator(device).manual_seed(args.seed + rank)  # each rank samples completions of its own
    optimizer, scheduler = make_optimizer(policy, args, plan)
    checkpoint = functools.partial(save_checkpoint, policy, optimizer, scheduler, tokenizer, args, ref, run.reference)

    state = dict(step=0, epoch=0.0, micro_batches_done=0, world_size=world, nonfinite_steps=0, empty_steps=0,
                 wandb_id=None)  # what trainer_state.json holds
    window = Window()  # the metrics since the last logged line
    if resume:  # the optimizer, schedule, data position, random streams, window
        state, window = load_checkpoint(resume, policy, optimizer, scheduler, generator, rank, run.reference)
    start_output_dir(args, resume, state)
    log = Log(args, plan, state, resume is not None)
    eval_prompts, eval_columns = held_out(args, test_set, rank, world)
    data = micro_batches(dataset, args, plan, rank, world, state["micro_batches_done"])

    with stop_signals() as signals, log.bar:  # SIGTERM, Ctrl-C, SIGHUP: finish the step (or save), exit
        for step in range(state["step"] + 1, plan.total + 1):
            beta = args.beta[min((step - 1) // plan.per_epoch, len(args.beta) - 1)]  # one per epoch, then the last
            micro = Window()  # this step's metrics
            last_good = rank_state(generator, window)  # where a failing reward function or judge rewinds to
            for micro_step in range(GA):
                batch = next(data)
                prompts = batch.pop(args.dataset_prompt_column)

                # 2. Sample K completions per prompt from the policy as it is now: rows [all 1st samples, ..., K-th].
                samples = rollout(run, policy, prompts, generator, K, window)

                # 3-4. Feedback and pairs: per prompt the best and worst sample by reward, or the judge's choice.
                try:
                    pairs = preferences(run, prompts, samples, {k: v * K for k, v in batch.items()})
                except FeedbackError as e:  # saved: the step before, from which a resume is exact
                    before = progress(state, step - 1, plan, args)
                    raise feedback_failed(e, f"step {step}", checkpoint, before, last_good) from None
                pick = torch.cat([pairs.chosen, pairs.rejected])  # (2B,) rows: the chosen completions, the rejected

                # 5. Log-probs of the pairs' completions under the policy (with grad) and the reference, (2B, T).
                sync_gradients(train_model, micro_step == GA - 1)  # DDP: averaged in the last backward only
                inputs = samples.training_inputs(pick, run.packed)
                with run.autocast:
                    logps = completion_logprobs(train_model, *inputs, packed=run.packed)
                    with torch.no_grad():
                        ref_logps = completion_logprobs(ref, *inputs, packed=run.packed)

                # 6. Loss: per pair (dpo_loss, plus RPO's term), averaged over the pairs kept (none kept: 0, and
                # backward keeps DDP in step); divided by GA, the gradients of the micro-batches add up to their mean.
                logp, ref_logp = logps.sum(1), ref_logps.sum(1)  # (2B,) each completion's log-prob
                losses = dpo_loss(logp[:B], logp[B:], ref_logp[:B], ref_logp[B:], beta, args.loss_type,
                                  args.label_smoothing)  # (B,)
                kept = pairs.kept
                parts = {}
                if args.rpo_alpha is not None:  # RPO (Pang et al. 2024): + alpha x the chosen's NLL per token
                    nll = args.rpo_alpha * -logp[:B] / inputs.completion_mask[:B].sum(1)  # (B,)
                    parts = {"loss/dpo": losses[kept].detach(), "loss/nll": nll[kept].detach()}
                    losses = losses + nll
                loss = torch.where(kept, losses, 0.0).sum() / kept.sum().clamp(min=1)
                (loss / GA).backward()
                in_loss = torch.arange(B, device=device)[kept]  # the kept pairs' chosen rows among the 2B
                micro.add(step_metrics(logps.detach(), ref_logps, inputs.completion_mask, pairs.scores, in_loss,
                                       in_loss + B, samples.has_eos[pick], losses[kept], beta) | pairs.metrics | parts)

            # 7. Optimizer step: clip, AdamW, schedule; skipped on all ranks for a NaN/inf, or if no pair was kept.
            grad_norm, status, stopping = optimizer_step(policy, optimizer, scheduler, args, micro, bool(signals))
            halt = count_steps(state, status, step, args, micro)  # why the run must stop now, or None
            if args.sync_ref_model and step % args.ref_model_sync_steps == 0:  # TR-DPO: the reference moves
                reference_answers(run, ref, eval_prompts, eval_columns)  # evaluate(): against the one it was
                mix_reference(ref, policy, args.ref_model_mixup_alpha)
                log.line(step, {"ref_model_sync": 1})
            if status != "nonfinite":
                window.add(micro.sums, micro.counts)
            window.steps += 1
            log.bar.update(1)

            # 8. Log (means over all ranks since the last line), the completions, an evaluation, a checkpoint.
            if step % plan.log == 0 or step == plan.total or halt:
                log.line(step, window.means(
                    learning_rate=scheduler.get_last_lr()[0], grad_norm=float(grad_norm), epoch=step / plan.per_epoch,
                    nonfinite_steps=state["nonfinite_steps"], empty_steps=state["empty_steps"], **decoder.stats()))
                window = Window()
            if plan.eval and step % plan.eval == 0:  # the last micro-batch's pairs; the policy against the reference
                log.pairs(step, prompts, samples.texts, pairs)
                try:
                    if step < plan.total and eval_prompts:
                        log.line(step, *evaluate(run, policy, ref, eval_prompts, eval_columns))
                except FeedbackError as e:
                    done = progress(state, step, plan, args)
                    raise feedback_failed(e, f"step {step}, in the comparison with the reference", checkpoint, done,
                                          rank_state(generator, window)) from None
            if (plan.save and step % plan.save == 0 and step < plan.total) or stopping or halt:
                state = progress(state, step, plan, args)
                saved = checkpoint(state, rank_state(generator, window))
            if halt:
                log.close()
                raise TrainingError(f"{halt}; saved {saved}")
            if stopping:
                say(f"stopped by a signal after step {step}; saved {saved}: go on with --resume_from_checkpoint latest")
                log.close()
                del train_model  # DDP's reducer goes now: freed at exit, it can deadlock gloo
                raise SystemExit(signal_exit(signals))

        # 9. Save the policy for from_pretrained(output_dir).
        save_final(policy, tokenizer, args, progress(state, plan.total, plan, args), rank_state(generator, window),
                   plan, checkpoint)
    say(f"saved the trained model to {args.output_dir}")

    # 10. Before / after: the reference and the trained policy answer the same held-out prompts, scored as in training.
    if eval_prompts:
        logs, records = evaluate(run, policy, ref, eval_prompts, eval_columns)
        log.line(plan.total, logs, records)
        say(before_after(logs, records))
    log.close()
    if args.push_to_hub and is_main():
        push_to_hub(args)
    return policy


# ==== Below: what a first reading can skip


# ---- Skipped steps: counted, and the run stops when they persist

MAX_EMPTY_STEPS = 5  # steps in a row in which no pair carried a preference: the run stops
MAX_NONFINITE_STEPS = 10  # steps in a row with a NaN/inf loss or gradient: the run stops
EMPTY_CAUSES = {  # why no pair was kept: the metric that counts it, and what it means
    "pairs/unscored": "no reward scored the completions (None or NaN)",
    "pairs/ties": "the samples tied",
    "judge/undecided": "the judge was undecided",
    "judge/invalid": "the judge gave no A or B (is it up?)",
}


def count_steps(state, status, step, args, micro):
    """Count the skipped steps into trainer_state, in all and in a row; why the run must stop, or None."""
    for kind in ("nonfinite", "empty"):
        state[f"{kind}_steps"] = state.get(f"{kind}_steps", 0) + (status == kind)
        if status == kind:
            state[f"{kind}_in_a_row"] = state.get(f"{kind}_in_a_row", 0) + 1
        else:
            state[f"{kind}_in_a_row"] = 0
    if status == "broken":
        raise TrainingError(f"the update of step {step} made the weights NaN/inf (not saved); latest checkpoint: "
                            + latest_checkpoint(args))
    if state["nonfinite_in_a_row"] >= MAX_NONFINITE_STEPS:
        return (f"the loss or gradient was NaN/inf in {state['nonfinite_in_a_row']} steps in a row (up to step "
                f"{step}): lower --learning_rate or check the rewards and data")
    if status == "empty":  # kept for the message of this stop and of save_final()'s
        share = {k: float(micro.sums[k]) / micro.counts[k] for k in EMPTY_CAUSES if micro.counts.get(k)}
        state["empty_cause"] = EMPTY_CAUSES[max(share, key=share.get)]
    if state["empty_in_a_row"] >= MAX_EMPTY_STEPS:
        return (f"no pair carried a preference in {MAX_EMPTY_STEPS} steps in a row (up to step {step}): "
                + state["empty_cause"])
    return None


# ---- Loading: rank 0 reads, several nodes; LoRA (--use_peft, dpo_kernels/lora.py)


def from_rank_0(model, whole, device, shard, meta):
    """place(): rank 0's weights `whole` to every rank (FSDP2: its shards alone), then the buffers
    (rotary frequencies), in no state dict."""
    if meta:
        model.to_empty(device=device)  # filled below
    elif not shard:
        model.to(device)
    if meta and not shard:  # to_empty unties them (FSDP2's does not)
        model.tie_weights()
    set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in model.buffers():
        dist.broadcast(buffer, 0)


def device_mesh(device_type):
    """FSDP2's mesh: the ranks; on several nodes (nodes, ranks per node), HSDP: shards within a node,
    replicas across, so that the layers' all-gathers stay on the node's fast links."""
    world = dist.get_world_size()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if per_node == world:
        return init_device_mesh(device_type, (world,))
    return init_device_mesh(device_type, (world // per_node, per_node), mesh_dim_names=("replicate", "shard"))


def add_lora(model, args, resume=None):
    """--use_peft: adapters on the targeted linear layers of the decoder blocks, all else frozen."""
    names = set(args.lora_target_modules) - {"all-linear"}  # empty: every linear layer
    if not add_adapters(model, decoder_blocks(model), names, args.lora_r, args.lora_alpha, args.lora_dropout):
        raise UsageError(f"--lora_target_modules {' '.join(names)}: no linear layer in the decoder blocks is named so")
    if resume and is_main():  # to the others in place()
        load_adapter(model, os.path.join(resume, "adapter"))


# ---- Checks of the inputs

GENERATION_KEYS = "temperature top_k top_p min_p repetition_penalty do_sample suppress_tokens eos_token_id".split()
# What each numeric flag allows (NaN and inf: never).
RULES = {flag: (ok, what) for flags, ok, what in [
    ("max_new_tokens per_device_train_batch_size gradient_accumulation_steps save_total_limit lora_r "
     "judge_api_concurrency ref_model_sync_steps", lambda v: v >= 1, ">= 1"),
    ("beta logging_steps lora_alpha judge_api_timeout", lambda v: v > 0, "> 0"),
    ("temperature repetition_penalty", lambda v: v >= 1e-4, ">= 1e-4 (logits divided by less can overflow)"),
    ("top_k missing_eos_penalty learning_rate warmup_steps weight_decay max_grad_norm save_steps "
     "eval_steps eval_prompts tie_threshold judge_api_retries rpo_alpha", lambda v: v >= 0, ">= 0"),
    ("reward_weights num_train_epochs", lambda v: True, "finite"),
    ("num_samples", lambda v: v >= 2, ">= 2 (a pair needs two completions)"),
    ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("min_p ref_model_mixup_alpha", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("judge_undecided label_smoothing", lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    ("seed", lambda v: 0 <= v < 2**32, "in [0, 2**32)")] for flag in flags.split()}


def bad_number(flag, value):
    """What is wrong with a numeric flag's value (or with one of its values), or None."""
    ok, what = RULES[flag]
    if value is None:
        return None
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and ok(v)):
            return f"{flag} must be {what}, got {value!r}"
    return None


def number_problems(values, prefix):
    """For raise_first(): (True, message) for each value (flag: value) that breaks its rule."""
    messages = [bad_number(flag, value) for flag, value in values.items()]
    return [(True, prefix + message) for message in messages if message]


def raise_first(problems, prefix=""):
    """A UsageError with the first message whose `bad` is true."""
    for bad, message in problems:
        if bad:
            raise UsageError(prefix + message)


def json_dict(text, flag):
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise UsageError(f"--{flag} must be a JSON object such as '{{\"key\": 1}}', got {text!r}")
    return value


PATH_FLAGS = "model_name_or_path ref_model_path judge_model_path dataset_name output_dir resume_from_checkpoint".split()


def check_args(args):
    """Check the flags on their own; fill in the default reward model (the spec's quick start's)."""
    judge = bool(args.judge_model_path or args.judge_api_base)
    if args.reward_model_path is None:
        args.reward_model_path = () if args.reward_funcs or judge else ("trl-lib/Qwen2-0.5B-Reward",)
    for flag in PATH_FLAGS:  # no shell expands the ~ of `--output_dir=~/x`
        value = getattr(args, flag)
        if isinstance(value, str):
            setattr(args, flag, os.path.expanduser(value))
    args.reward_model_path = tuple(os.path.expanduser(path) for path in args.reward_model_path)
    n_rewards = len(args.reward_model_path) + len(args.reward_funcs)
    json_dict(args.model_init_kwargs, "model_init_kwargs")
    generation = json_dict(args.generation_kwargs, "generation_kwargs")
    unknown = sorted(set(generation) - set(GENERATION_KEYS))
    try:
        filled = (args.judge_prompt or JUDGE_PROMPT).format(prompt="\0p", response_a="\0a", response_b="\0b")
        bad_template = not all(f"\0{k}" in filled for k in "pab")
    except (KeyError, IndexError, ValueError):
        bad_template = True
    raise_first([
        (args.loss_type not in ("sigmoid", "ipo", "hinge", "robust"),
         f"--loss_type must be sigmoid, ipo, hinge or robust, got {args.loss_type!r}"),
        (args.label_smoothing and args.loss_type in ("ipo", "hinge"), f"--label_smoothing with --loss_type "
         f"{args.loss_type}: only sigmoid (cDPO) and robust weigh a flipped label; drop one"),
        (args.sync_ref_model and args.use_peft, "--sync_ref_model with --use_peft: the reference, the policy with "
         "its adapters off, has no weights of its own to move; drop one"),
        (not args.beta, "--beta needs one or more values"),
        (args.max_new_tokens >= args.max_length,
         f"--max_new_tokens ({args.max_new_tokens}) must be smaller than --max_length ({args.max_length})"),
        (n_rewards == 0 and not judge, "no reward: give --reward_model_path and/or --reward_funcs, or a judge"),
        (judge and n_rewards > 0, "a judge and rewards both given: drop one"),
        (args.judge_model_path and args.judge_api_base, "--judge_model_path and --judge_api_base: give one judge"),
        (args.judge_api_base is not None and not args.judge_api_model, "--judge_api_base needs --judge_api_model"),
        (judge and args.num_samples != 2, "a judge compares two completions: --num_samples must be 2 with it"),
        (judge and args.missing_eos_penalty is not None, "--missing_eos_penalty lowers reward scores: drop it"),
        (args.reward_weights is not None and len(args.reward_weights) != n_rewards, f"--reward_weights has "
         f"{len(args.reward_weights or ())} values but there are {n_rewards} rewards (models, then functions)"),
        (args.max_steps <= 0 and args.num_train_epochs <= 0, "set --max_steps > 0 or --num_train_epochs > 0"),
        (args.resume_from_checkpoint is not None and args.overwrite_output_dir,
         "--resume_from_checkpoint and --overwrite_output_dir: give one"),
        (os.path.isfile(args.output_dir), f"--output_dir {args.output_dir!r} is a file; give a directory"),
        (args.use_peft and args.ref_model_path, "--ref_model_path with --use_peft: the reference is the policy, "
         "adapters off; drop one"),
        *number_problems({flag: getattr(args, flag) for flag in RULES}, "--"),
        (unknown, f"--generation_kwargs: unsupported keys {unknown}; supported: {', '.join(GENERATION_KEYS)}"),
        (None in generation.values(), "--generation_kwargs: a null value; leave the key out for its default"),
        *number_problems({k: v for k, v in generation.items() if k in RULES}, "--generation_kwargs "),
        (type(generation.get("top_k", 0)) is not int, "--generation_kwargs top_k must be an integer"),
        (generation.get("do_sample", True) is not True, "--generation_kwargs do_sample must be true, got "
         f"{generation.get('do_sample')!r}: greedy decoding makes both samples the same"),
        (bad_template, "--judge_prompt must contain {prompt}, {response_a} and {response_b}, and no other braces "
         "(literal ones: {{ and }})"),
    ])
    if args.push_to_hub and huggingface_hub.get_token() is None:
        raise UsageError("--push_to_hub needs a Hub token: run `hf auth login` or set HF_TOKEN")
    defaults = Args()
    lora = [f"--{k}" for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
            if getattr(args, k) != getattr(defaults, k)]
    if lora and not args.use_peft:
        say(f"note: {', '.join(lora)} ignored without --use_peft")


def check_output_dir(args):
    """output_dir: writable, not a root, not in use, holding no input (it would be overwritten)."""
    out = os.path.realpath(args.output_dir)
    if os.path.dirname(out) == out:  # the model and its .tmp would land in a root
        raise UsageError(f"--output_dir {args.output_dir!r} is a root directory; give a directory inside one")
    if os.path.islink(args.output_dir) and not os.path.exists(args.output_dir):
        raise UsageError(f"--output_dir {args.output_dir!r} is a dangling symlink; remove it or give another")
    paths = [(k, getattr(args, k)) for k in PATH_FLAGS[:4]]  # the inputs
    for flag, path in paths + [("reward_model_path", p) for p in args.reward_model_path]:
        real = os.path.realpath(path) if path and os.path.exists(path) else None
        if real == out or real and args.overwrite_output_dir and real.startswith(out + os.sep):
            raise UsageError(f"--{flag} {path!r} is in --output_dir, which this run would overwrite: give another")
    try:  # on every rank: each node may have a disk of its own
        os.makedirs(args.output_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=args.output_dir).close()
    except OSError as e:
        raise UsageError(f"--output_dir {args.output_dir!r} is not writable ({e.strerror}); give another") from None
    holder = lock_output_dir(args.output_dir) if is_main() else None
    if holder:
        raise UsageError(f"--output_dir {args.output_dir!r} is in use by {holder}: wait for it to end, or give another")


def load_reward_func(spec):
    """A reward function from `module:function` (importable from here) or `file.py:function`."""
    module_name, _, func_name = spec.rpartition(":")
    if not module_name or not func_name:
        raise UsageError(f"--reward_funcs {spec!r}: expected `module:function` or `file.py:function`")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        if module_name.endswith(".py"):
            names = runpy.run_path(module_name)
        else:
            names = vars(importlib.import_module(module_name))
    except USER_FAULTS as e:
        raise UsageError(f"--reward_funcs {spec!r}: cannot import {module_name!r} ({why(e)})") from None
    func = names.get(func_name)
    if not callable(func):
        raise UsageError(f"--reward_funcs {spec!r}: {module_name!r} has no function {func_name!r}")
    return func


def reward_column(out, func, n, device):
    """A reward function's answer as a column (n,) of floats, None as NaN.
    Anything else names the function."""
    name = getattr(func, "__name__", repr(func))
    if not isinstance(out, (list, tuple)) or len(out) != n:
        raise FeedbackError(f"reward function {name} must return a list of {n} numbers (one per completion), got "
                            f"{type(out).__name__} {str(out)[:40]}")
    numbers = all(not isinstance(r, (str, bytes, bool)) for r in out)  # float() takes "1.5" and True
    try:
        values = [math.nan if r is None else float(r) for r in out]
    except (TypeError, ValueError):
        numbers = False
    if not numbers:
        raise FeedbackError(f"reward function {name} returned something that is not a number or None: {out[:4]}...")
    return torch.tensor(values, device=device)


DATA_EXTENSIONS = (".json", ".jsonl", ".parquet", ".csv")


def load_prompts(args):
    """The train and held-out (or None) splits from a file, save_to_disk or the Hub, checked."""
    name = args.dataset_name
    train_split = args.dataset_train_split
    test_split = args.dataset_test_split
    column = args.dataset_prompt_column
    ext = os.path.splitext(name)[1].lower()
    file = os.path.isfile(name)
    local = os.path.isdir(name)
    saved = local and not {"dataset_dict.json", "state.json"}.isdisjoint(os.listdir(name))
    if not os.path.exists(name) and (name.startswith((".", "/")) or ext in DATA_EXTENSIONS):  # not a Hub id
        raise UsageError(f"--dataset_name {name!r}: no such file or directory")
    if file and ext not in DATA_EXTENSIONS:
        raise UsageError(f"--dataset_name {name!r}: a data file must be .json, .jsonl, .parquet or .csv")
    if file and os.path.getsize(name) == 0:  # datasets would raise a bare StopIteration
        raise UsageError(f"--dataset_name {name!r} is an empty file")
    if local and not os.listdir(name):
        raise UsageError(f"--dataset_name {name!r} is an empty directory")
    if (file or saved) and args.dataset_config:
        say(f"note: --dataset_config {args.dataset_config!r} ignored: {name!r} is local")
    try:
        if file:
            builder = {".jsonl": "json"}.get(ext, ext[1:])
            splits = {train_split: datasets.load_dataset(builder, data_files=name, split="train")}
        elif saved:
            splits = datasets.load_from_disk(name)
            if not isinstance(splits, datasets.DatasetDict):
                splits = {train_split: splits}
        else:
            splits = datasets.load_dataset(name, args.dataset_config)
    except Exception as e:  # malformed, no rows, no Hub: the root cause says
        while e.__cause__ or e.__context__:
            e = e.__cause__ or e.__context__
        cache = os.path.abspath(datasets.config.HF_DATASETS_CACHE)
        if isinstance(e, OSError) and os.path.abspath(str(e.filename)).startswith(cache):
            problem = f"the datasets cache {cache!r} is not usable ({why(e)}); set HF_HOME to a writable directory"
        elif file:
            problem = f"could not read it ({why(e)}); is it a valid {ext[1:]} file?"
        elif saved:
            problem = f"could not read this saved dataset ({why(e)}); check that it holds prompts"
        elif local:
            problem = f"could not read the data files in this directory ({why(e)})"
        else:
            problem = f"could not load it ({why(e)}); " + OFFLINE_HINT
        raise UsageError(f"--dataset_name {name!r}: {problem}") from None
    if train_split not in splits:
        raise UsageError(f"--dataset_train_split {train_split!r} is not a split of {name!r}; splits: {list(splits)}")
    train = splits[train_split]
    test = splits.get(test_split) if test_split != train_split else None
    for split, ds in ((train_split, train), (test_split, test)):
        if ds is None:
            continue
        if column not in ds.column_names:
            close = difflib.get_close_matches(column, ds.column_names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"--dataset_prompt_column {column!r} is not a column of {name!r}; columns: "
                             f"{ds.column_names}{hint}")
        check_prompt_rows(ds.select_columns(column)[:][column] if len(ds) else [], name, split)  # one column: cheap
    if len(train) == 0:
        raise UsageError(f"--dataset_name {name!r}: the {train_split!r} split is empty")
    return train, test


def check_prompt_rows(prompts, name, split):
    """All prompts non-empty text, or all conversations; the first that is not is named."""
    kinds = set()
    for i, prompt in enumerate(prompts):
        chat = is_conversational(prompt)
        kinds.add(chat)
        if len(kinds) > 1:
            problem = "conversations and text mixed"
        elif not chat and not (isinstance(prompt, str) and prompt.strip()):
            problem = f"the prompt is {prompt!r:.80}"
        else:
            continue
        raise UsageError(f"--dataset_name {name!r}, split {split!r}, row {i}: {problem}; prompts are all non-empty "
                         "text, or all lists of {role, content} messages")


def is_conversational(prompt):
    """A non-empty list of {role, content} messages, each with some text."""
    if not isinstance(prompt, list) or prompt == []:
        return False
    return all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
               and m["content"].strip() for m in prompt)


TORCHRUN = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def check_torchrun():
    """torchrun's variables: whole numbers, all or none, ranks in order."""
    env = {k: os.environ[k] for k in TORCHRUN if k in os.environ}
    for k, v in env.items():
        if k != "MASTER_ADDR" and not v.isdigit():
            raise UsageError(f"{k}={v!r} is not a whole number: unset it, or use torchrun")
    world = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    if world == 1 and rank == 0 and local_rank == 0:  # one process, torchrun's or not
        return
    missing = [k for k in TORCHRUN if k not in env and k != "LOCAL_WORLD_SIZE"]
    if missing:
        given = ", ".join(f"{k}={v}" for k, v in env.items())
        raise UsageError(f"{given} set but {', '.join(missing)} not: unset them, or use torchrun")
    if not (world >= 1 and rank < world and local_rank <= rank):
        raise UsageError(f"RANK={rank}, LOCAL_RANK={local_rank}, WORLD_SIZE={world}: not 0 <= LOCAL_RANK <= RANK < "
                         "WORLD_SIZE; unset them, or use torchrun")


def load_model(auto_class, path, args, **kwargs):
    # transformers >= 5.25 swaps layers for Hub kernels by default: fetched from the Hub, chosen for the device the
    # model loads on (the CPU here; meta, which they refuse, on ranks > 0). Off: the model's own layers, as before.
    kwargs = {"use_kernels": False} | kwargs
    if not is_main():  # place() sends rank 0's weights (one copy in RAM)
        kwargs["device_map"] = "meta"
    try:
        model = auto_class.from_pretrained(path, trust_remote_code=args.trust_remote_code, **kwargs)
    except OSError as e:
        raise unreachable("model", path, e) from None
    except Exception as e:  # corrupt weights, an argument the model refuses
        raise UsageError(f"could not load the model in {path!r}: {why(e)}") from None
    if not is_main():  # as from_pretrained does after reading weights
        model.tie_weights()
    return model


def wants_bf16(args, device):
    """--bf16; when it is not given, whether the device is a GPU that has bf16."""
    if args.bf16 is not None:
        return args.bf16
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)  # emulated: slow


def unreachable(what, path, error):
    return UsageError(f"could not load {what} {path!r} ({error}). Give a Hub id you can reach or a local directory; "
                      f"{OFFLINE_HINT}")


def load_tokenizer(path, args, flag):
    """The model's tokenizer and config; a missing pad token, or one past the embedding, becomes EOS."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as e:  # ValueError: no tokenizer files
        raise unreachable("the tokenizer of", path, e) from None
    if not tokenizer("Hello world.", add_special_tokens=False)["input_ids"]:  # a directory without its files
        raise UsageError(f"could not load the tokenizer of {path!r}: it has no vocabulary; save it with the model")
    config = model_config(path, args, flag)
    vocab = getattr(config, "vocab_size", None) or math.inf
    if tokenizer.vocab_size > vocab:  # another model's tokenizer
        raise UsageError(f"{flag} {path!r}: its tokenizer has {tokenizer.vocab_size} tokens, its model {vocab} "
                         "embeddings; save the model's own tokenizer with it")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id >= vocab:
        if tokenizer.eos_token_id is None or tokenizer.eos_token_id >= vocab:
            raise UsageError(f"the tokenizer of {path!r} has no pad or EOS token in the model's {vocab} embeddings")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, config


def model_config(path, args, flag):
    """The model's config, checked for its role (in another it would run a random head)."""
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as e:  # ValueError: no model config
        raise unreachable("model", path, e) from None
    kinds = config.architectures or []
    reward = flag == "--reward_model_path"
    heads = [k.endswith("ForSequenceClassification") for k in kinds]
    wrong_kind = not any(heads) if reward else all(heads)
    if kinds and wrong_kind:
        raise UsageError(f"{flag} {path!r} is a {kinds[0]}, not a {'reward model' if reward else 'causal LM'}")
    if reward and config.num_labels != 1:
        raise UsageError(f"--reward_model_path {path!r} has a head with {config.num_labels} outputs, not 1")
    return config


LOADING_KEYS = set("attn_implementation dtype torch_dtype revision low_cpu_mem_usage use_safetensors variant cache_dir "
                   "subfolder local_files_only token".split())  # from_pretrained's own arguments
SHAPE_KEYS = ("model_type vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads "
              "num_key_value_heads head_dim tie_word_embeddings").split()  # what fixes the weights' shapes
ATTENTION = "eager, sdpa, flash_attention_2, flash_attention_3, flex_attention"


def check_loading(args, config):
    """With the policy's config: --generation_kwargs' token ids, --model_init_kwargs, the reference."""
    vocab = getattr(config, "vocab_size", None) or math.inf
    for key, value in json_dict(args.generation_kwargs, "generation_kwargs").items():
        if key not in ("suppress_tokens", "eos_token_id"):
            continue
        if isinstance(value, list):
            ids = value
        elif key == "eos_token_id":  # one id, or a list of them
            ids = [value]
        else:  # suppress_tokens takes a list only
            ids = [None]
        if not all(type(i) is int and 0 <= i < vocab for i in ids):
            raise UsageError(f"--generation_kwargs {key} must be token ids in [0, {vocab}), got {value!r}")
        if key == "eos_token_id" and not ids:
            raise UsageError("--generation_kwargs eos_token_id []: sampling would never stop; give one id or more")
    kwargs = json_dict(args.model_init_kwargs, "model_init_kwargs")
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype", "float32"))
    problems = [(k not in LOADING_KEYS and not hasattr(config, k), f"{k!r} is neither a from_pretrained argument "
                 "nor a config field") for k in kwargs]
    problems += [
        (kwargs.get("attn_implementation", "sdpa") not in ATTENTION.split(", "),
         f"attn_implementation must be one of {ATTENTION}"),
        (dtype not in ("float32", "float64"), f"dtype must be float32 or float64, got {dtype!r} (see --bf16)")]
    raise_first(problems, prefix="--model_init_kwargs: ")
    if not args.ref_model_path:
        return
    ref_config = model_config(args.ref_model_path, args, "--ref_model_path")
    ref_vocab = getattr(ref_config, "vocab_size", None)
    if (ref_vocab or math.inf) < vocab:  # it scores the policy's tokens
        raise UsageError(f"--ref_model_path {args.ref_model_path!r} has {ref_vocab} token embeddings, fewer than "
                         f"the policy's {vocab}")
    differ = [k for k in SHAPE_KEYS if getattr(ref_config, k, None) != getattr(config, k, None)]
    if args.sync_ref_model and differ:  # mixed weight by weight
        raise UsageError(f"--sync_ref_model mixes the policy into --ref_model_path, whose {differ[0]} differs from "
                         "the policy's; give a reference of the policy's shape")


def check_prompts(args, dataset, test_set, tokenizer, reward_tokenizers, reward_funcs, n=512):
    """On the first n prompts: chat templates, lengths, and a trial call of each reward function (two
    prompts, one held out), so that a broken one fails before the models load."""
    columns = dataset[:n]
    prompts = columns.pop(args.dataset_prompt_column)
    chat = is_conversational(prompts[0])
    for path, reward_tokenizer in zip(args.reward_model_path, reward_tokenizers):
        if chat and reward_tokenizer.chat_template is None:
            raise UsageError(f"the prompts are conversations: reward model {path!r} has no chat template")
    try:
        lengths = [len(ids) for ids in prompt_token_ids(tokenizer, prompts)]
    except UsageError as e:
        raise UsageError(f"--dataset_name {args.dataset_name!r} with the tokenizer of {args.model_name_or_path!r}: "
                         f"{e}") from None
    limit = args.max_length - args.max_new_tokens
    if min(lengths) > limit:
        raise UsageError(f"all {len(lengths)} prompts checked are longer than --max_length - --max_new_tokens = "
                         f"{limit} tokens: raise --max_length")
    cut = sum(n > limit for n in lengths)
    if cut:
        say(f"note: {cut} of the first {len(lengths)} prompts are longer than --max_length - --max_new_tokens = "
            f"{limit} tokens and lose their start")
    trials = [(prompts[:2], {k: v[:2] for k, v in columns.items()}, "2 dataset prompts")]
    if test_set is not None and len(test_set) and args.eval_prompts:
        held = test_set[:1]
        trials.append((held.pop(args.dataset_prompt_column), held, f"a {args.dataset_test_split!r} prompt"))
    texts = ["A placeholder answer."] * 2
    completions = texts
    if chat:
        completions = [[{"role": "assistant", "content": t}] for t in texts]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for func in reward_funcs:
        for trial, trial_columns, what in trials:
            rows = len(trial)
            score_completions(trial, completions[:rows], ids[:rows], trial_columns, [], [func], torch.ones(1),
                              when=f" on a trial call ({what}, placeholder completions)")


def check_packing(args, *models):
    """Whether training can pack each pair into a row (training_rows()); if not, says why."""
    if not args.prefix_sharing:
        return False
    for model in models:
        reason = packing_problem(args, model)
        if reason:
            say(f"prefix sharing off in training: {reason}")
            return False
    return True


def packing_problem(args, model):
    """Why the model cannot take packed rows (a 4D mask; eager or sdpa, no short sliding window), or None."""
    config = model.config
    if config._attn_implementation not in ("eager", "sdpa"):
        return f"attn_implementation {config._attn_implementation} takes no 4D attention mask"
    if (getattr(config, "sliding_window", None) or math.inf) < 2 * args.max_length:
        return f"its sliding window ({config.sliding_window} tokens) may be shorter than a row"
    # The trial, 5 sequences of 3 tokens: a rejected completion (5th) gets the same log-probs after either
    # chosen one (2nd, 3rd), which it may not see, and others after another prompt (1st or 2nd), which it sees.
    ids = (torch.arange(15, device=next(model.parameters()).device) % config.vocab_size).view(5, 3)
    one = torch.ones_like(ids)
    was_training = model.training
    try:  # eval mode: no dropout; gathered: FSDP2 reshards afterwards
        rejected = []
        with torch.no_grad(), gathered(model.eval()):
            for prompt, chosen in ((0, 2), (0, 3), (1, 2)):
                logps = completion_logprobs(model, ids[[prompt]], one[:1], ids[[chosen, 4]], one[:2], packed=True)
                rejected.append(logps[1, 1:])  # its first token is predicted by the prompt alone
        applied = torch.equal(rejected[0], rejected[1]) and not torch.equal(rejected[0], rejected[2])
        reason = None if applied else "the model does not apply a 4D mask"
    except Exception as e:
        reason = f"the model refuses a 4D attention mask ({why(e)})"
    model.train(was_training)
    return reason


# Steps per epoch, in all, of warmup; how often to log, save and evaluate (0: never).
Plan = collections.namedtuple("Plan", "per_epoch total warmup log save eval")


def make_plan(args, n_prompts, world):
    B = args.per_device_train_batch_size
    GA = args.gradient_accumulation_steps
    per_epoch = n_prompts // (B * GA * world)
    if per_epoch == 0:
        raise UsageError(f"the dataset has {n_prompts} prompts but one optimizer step needs per_device_train_batch_size"
                         f" x gradient_accumulation_steps x processes = {B} x {GA} x {world} = {B * GA * world}")
    total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * per_epoch)
    return Plan(per_epoch=per_epoch, total=total, warmup=steps_of(args.warmup_steps, total),
                log=max(1, steps_of(args.logging_steps, total)), save=steps_of(args.save_steps, total),
                eval=steps_of(args.eval_steps, total))


def steps_of(value, total):
    """A number of steps, as TrainingArguments reads one: below 1, a fraction of all steps."""
    return math.ceil(value * total) if 0 < value < 1 else int(value)


def sampling_settings(args, tokenizer, policy):
    """sample()'s keyword arguments, and the stop ids (default: the tokenizer's and model's EOS)."""
    generation = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
                  "repetition_penalty": args.repetition_penalty, "do_sample": True, "suppress_tokens": None}
    generation |= json_dict(args.generation_kwargs, "generation_kwargs")
    eos = generation.pop("eos_token_id", None)
    if eos is None:
        configured = getattr(getattr(policy, "generation_config", None), "eos_token_id", None)
        if not isinstance(configured, list):
            configured = [configured]
        eos = sorted(i for i in {tokenizer.eos_token_id, *configured} - {None})
    if isinstance(eos, int):
        eos = [eos]
    return generation, list(eos)


# ---- Checkpoints, resume, the final save

# Args that change neither completions nor updates: a resumed run may change them.
RESUMABLE_CHANGES = set("""preset output_dir resume_from_checkpoint overwrite_output_dir logging_steps save_steps
    save_total_limit eval_prompts report_to run_name push_to_hub hub_model_id bf16 gradient_checkpointing
    distributed prefix_sharing eval_steps judge_api_concurrency judge_api_timeout judge_api_retries
    torch_compile""".split())
CHECKPOINT_FILES = ("trainer_state.json", "online_dpo_args.json", "config.json", "optimizer.pt", "rank_states.pt")


def progress(state, step, plan, args):
    return state | {"step": step, "epoch": step / plan.per_epoch,
                    "micro_batches_done": step * args.gradient_accumulation_steps}


def latest_checkpoint(args):
    """The path of the newest checkpoint in output_dir, or "none"."""
    with contextlib.suppress(OSError), open(os.path.join(args.output_dir, "latest")) as f:
        return os.path.join(args.output_dir, f.read().strip())
    return "none"


def checkpoint_steps(directory):
    return sorted(int(d[11:]) for d in os.listdir(directory) if re.fullmatch(r"checkpoint-\d+", d))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def resume_point(args, world):
    """The checkpoint to resume from (None: start afresh), whole and of this run. An earlier run's
    output_dir needs resume or overwrite."""
    out = args.output_dir
    latest = latest_checkpoint(args)
    shared = SEVERAL_NODES if int(os.environ.get("LOCAL_WORLD_SIZE", world)) < world else ""
    if args.resume_from_checkpoint is None:
        earlier = [n for n in ("config.json", "metrics.jsonl") if os.path.isfile(os.path.join(out, n))]
        if (earlier or latest != "none") and not args.overwrite_output_dir:
            if latest != "none":
                what = (f"checkpoints of an earlier run (latest: {os.path.basename(latest)}): add "
                        "--resume_from_checkpoint latest to continue it, or")
            else:
                what = f"an earlier run's {' and '.join(earlier)}: give another --output_dir, or"
            raise UsageError(f"--output_dir {out!r} holds {what} --overwrite_output_dir to start afresh")
        return None
    path = args.resume_from_checkpoint
    if path == "latest":
        path = latest
    if path == "none":
        raise UsageError(f"--resume_from_checkpoint latest: {out!r} has no checkpoint yet{shared}")
    if not os.path.basename(path):  # `latest` names none
        steps = checkpoint_steps(out)
        raise UsageError(f"--resume_from_checkpoint latest: {os.path.join(out, 'latest')!r} is empty; give "
                         f"{out}/checkpoint-N (there: {', '.join(f'checkpoint-{n}' for n in steps) or 'none'})")
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        what = "not a checkpoint of online_dpo.py" if os.path.isdir(path) else "no such directory"
        raise UsageError(f"--resume_from_checkpoint {path!r}: {what}; give output_dir/checkpoint-N, or `latest`"
                         f"{shared}")
    try:  # flags first: a changed one explains a missing file (--use_peft: no adapter)
        saved = read_json(os.path.join(path, "online_dpo_args.json"))
        ran_on = read_json(os.path.join(path, "trainer_state.json"))
    except (OSError, ValueError):
        check_checkpoint_files(path, args)  # names the damaged file
        raise
    defaults = json.loads(json.dumps(asdict(Args())))  # a flag newer than the checkpoint: as if at its default
    here = json.loads(json.dumps(asdict(args)))
    differ = [f"--{k} is {saved.get(k, defaults[k])!r} there and {v!r} here" for k, v in here.items()
              if k not in RESUMABLE_CHANGES and saved.get(k, defaults[k]) != v]
    if ran_on["world_size"] != world:  # the data order and the random streams are per rank
        differ.append(f"it ran on {ran_on['world_size']} processes and this run has {world}")
    if differ:
        raise UsageError(f"--resume_from_checkpoint {path!r} belongs to another run: {'; '.join(differ)}")
    check_checkpoint_files(path, args)
    return path


SEVERAL_NODES = "; several nodes need an --output_dir that all of them see"


def check_same_resume(resume):
    """Every rank resumes from one checkpoint (each node reads its own)."""
    names = gather_lists([None if resume is None else os.path.basename(resume)])
    if len(set(names)) > 1:
        seen = ", ".join(f"rank {r}: {name}" for r, name in enumerate(names))
        raise UsageError(f"--resume_from_checkpoint: ranks see different checkpoints ({seen}){SEVERAL_NODES}")


def check_checkpoint_files(path, args):
    """Every file a resume reads opens; a damaged one is named, with the checkpoint before it."""
    files = list(CHECKPOINT_FILES)
    if args.use_peft:
        files.append("adapter/adapter_model.safetensors")
    if args.sync_ref_model:  # TR-DPO's reference
        files.append("reference/config.json")
    files += [os.path.relpath(os.path.join(folder, f), path) for folder, _, names in os.walk(path) for f in names
              if f.endswith(".safetensors")]
    name = files[0]
    try:
        for name in files:
            file = os.path.join(path, name)
            if name.endswith(".json"):
                read_json(file)
            elif name.endswith(".pt"):
                torch.load(file, weights_only=True, mmap=True)
            else:
                safetensors.safe_open(file, "pt")
    except Exception as e:
        match = re.search(r"checkpoint-(\d+)$", path.rstrip("/"))
        step = int(match.group(1)) if match else math.inf
        before = [n for n in checkpoint_steps(os.path.dirname(os.path.abspath(path))) if n < step]
        hint = f"resume from checkpoint-{max(before)}, the one before" if before else "and there is none before it"
        raise UsageError(f"--resume_from_checkpoint {path!r}: {name} is missing or damaged ({why(e)}); "
                         + hint) from None


def start_output_dir(args, resume, state):
    """Resuming: `latest` names the checkpoint. Overwriting: earlier ones go after the first save."""
    if resume and is_main():
        replace_file(os.path.join(args.output_dir, "latest"), os.path.basename(os.path.normpath(resume)))
    elif args.overwrite_output_dir:
        state["earlier"] = [n for n in os.listdir(args.output_dir) if re.fullmatch(r"checkpoint-\d+(\.tmp)?|latest", n)]


def remove_earlier(args, state, keep):
    names = set(state.pop("earlier", [])) if is_main() else set()
    for name in names - {keep, "latest" if keep else ""}:
        remove(os.path.join(args.output_dir, name))


def gather_lists(items):
    """All ranks' lists, concatenated in rank order."""
    if not dist.is_initialized():
        return items
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def rank_state(generator, window):
    """This rank's random streams and metric window, for a resume."""
    python, (name, keys, pos, has_gauss, gauss), cpu = global_streams()
    return {"python": python, "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "torch": cpu, "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
            "sampling": generator.get_state(), "sums": dict(window.sums), "counts": dict(window.counts)}


def save_checkpoint(policy, optimizer, scheduler, tokenizer, args, ref, reference, trainer_state, mine):
    """output_dir/checkpoint-{step}, complete before it takes its name; then `latest`. Rank 0 writes.
    --sync_ref_model: the reference too, in reference/ (TR-DPO has moved it)."""
    state_dict = full_state_dict(policy)
    ref_state = full_state_dict(ref) if args.sync_ref_model else None
    # FSDP2: a collective. DDP: rank 0 reads it, but reading an empty one (no update yet) takes a zero-lr
    # step, which every rank must take, or their step counts part.
    if is_main() or isinstance(policy, FSDPModule) or not optimizer.state:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optimizer_state = get_optimizer_state_dict(policy, optimizer, options=options)
    ranks = gather_lists([mine | {"sums": {k: v.cpu() for k, v in mine["sums"].items()}, "reference": reference}])
    step = trainer_state["step"]
    earlier = {"earlier": trainer_state.pop("earlier", [])}
    name = f"checkpoint-{step}"
    with all_or_none(TrainingError):  # rank 0's failed write stops all
        if is_main():
            try:
                with written_in_place(os.path.join(args.output_dir, name)) as tmp:
                    write_model(policy, state_dict, tokenizer, args, tmp)
                    optimizer_pt = {"optimizer": optimizer_state, "scheduler": scheduler.state_dict()}
                    torch.save(optimizer_pt, f"{tmp}/optimizer.pt")
                    torch.save(ranks, f"{tmp}/rank_states.pt")
                    if args.sync_ref_model:
                        ref.save_pretrained(f"{tmp}/reference", state_dict=ref_state)
                    with open(f"{tmp}/trainer_state.json", "w") as f:
                        json.dump(trainer_state, f, indent=2)
                replace_file(os.path.join(args.output_dir, "latest"), name)
            except (OSError, RuntimeError) as e:  # a full disk: torch.save raises RuntimeError
                raise TrainingError(f"could not write {name} ({why(e)}); the latest checkpoint is intact "
                                    f"({latest_checkpoint(args)})") from None
    if not is_main():
        return name
    remove_earlier(args, earlier, name)
    steps = checkpoint_steps(args.output_dir)
    too_old = steps[: -args.save_total_limit] if args.save_total_limit else []
    for old in set(too_old) - {step}:
        remove(os.path.join(args.output_dir, f"checkpoint-{old}"))
    return name


def load_checkpoint(path, policy, optimizer, scheduler, generator, rank, reference):
    """Restore the optimizer, schedule, random streams and the reference's held-out answers; return
    trainer_state and the window."""
    device = generator.device
    saved = torch.load(f"{path}/optimizer.pt", weights_only=True, mmap=True)
    try:
        set_optimizer_state_dict(policy, optimizer, saved["optimizer"], options=StateDictOptions(full_state_dict=True))
        error = next((f"{tuple(m.shape)} for a weight of {tuple(p.shape)}" for p, moments in optimizer.state.items()
                      for m in moments.values() if m.dim() and m.shape != p.shape), None)
    except (RuntimeError, ValueError, KeyError) as e:
        error = why(e)
    if error:
        raise UsageError(f"--resume_from_checkpoint {path!r}: optimizer.pt does not fit the model's weights ({error})")
    scheduler.load_state_dict(saved["scheduler"])
    mine = torch.load(f"{path}/rank_states.pt", weights_only=True)[rank]
    name, keys, pos, has_gauss, gauss = mine["numpy"]
    set_global_streams((mine["python"], (name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss), mine["torch"]))
    if mine["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"])
    generator.set_state(mine["sampling"])
    reference.extend(mine.get("reference", []))  # none in checkpoints before 12-03
    state = read_json(f"{path}/trainer_state.json")
    say(f"resuming from {path} at step {state['step']}")
    return state, Window({k: v.to(device) for k, v in mine["sums"].items()}, mine["counts"])


def write_model(model, state_dict, tokenizer, args, directory, merge=False):
    """save_pretrained's layout, the tokenizer, the Args; no NaN/inf. --use_peft: adds adapter/ (peft's)."""
    tensors = state_dict if state_dict is not None else model.state_dict()
    broken = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if broken:
        raise TrainingError(f"refusing to save weights with NaN/inf ({', '.join(broken[:3])}...)")
    adapters = {}  # with merge: in the weights while they are written
    if args.use_peft:
        state_dict = save_adapter(tensors, os.path.join(directory, "adapter"), args.model_name_or_path, args.lora_r,
                                  args.lora_alpha, args.lora_dropout)
    if args.use_peft and merge:
        adapters = tensors
    with merged(state_dict, adapters, args.lora_alpha / args.lora_r):
        model.save_pretrained(directory, state_dict=state_dict)
    tokenizer.save_pretrained(directory)
    with open(f"{directory}/online_dpo_args.json", "w") as f:
        json.dump(asdict(args), f, indent=2)


def full_state_dict(model):
    """FSDP2: the whole model's weights, gathered onto the CPU (a collective); otherwise None."""
    if isinstance(model, FSDPModule):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return None


def save_final(policy, tokenizer, args, state, mine, plan, checkpoint):
    """The trained model into output_dir; if that fails, a checkpoint, which the error names."""
    if state["nonfinite_steps"] + state["empty_steps"] >= plan.total:
        cause = f"; the last: {state['empty_cause']}" if "empty_cause" in state else ""
        raise TrainingError(f"every one of the {plan.total} steps was skipped ({state['nonfinite_steps']} NaN/inf, "
                            f"{state['empty_steps']} with no preference{cause}): nothing to save")
    error = None
    state_dict = full_state_dict(policy)
    try:
        if is_main():
            with written_in_place(args.output_dir, merge=True) as tmp:
                write_model(policy, state_dict, tokenizer, args, tmp, merge=True)
    except (OSError, RuntimeError) as e:
        error = why(e)
    errors = [e for e in gather_lists([error]) if e]  # rank 0 wrote; every rank learns how that went
    if errors:
        try:
            where = f"they are in {checkpoint(state, mine)}"
        except TrainingError:
            where = f"so did a checkpoint (the latest: {latest_checkpoint(args)})"
        raise TrainingError(f"could not write the trained model into {args.output_dir!r} ({errors[0]}); {where}")
    remove_earlier(args, state, "")
    SAVED.append(args.output_dir)
    if STOP:  # a signal during the save, which has finished
        raise Stopped(STOP[0])


SAVED: list[str] = []  # output_dir, once save_final() has written the model into it
EVERYWHERE: list[str] = []  # all_or_none()'s error (all ranks)


# ---- The judges: the HTTP client (the local judge's mechanics: dpo_kernels/judge.py)

JUDGE_WAIT_S = 30  # a step waiting this long on the HTTP judge says so, every 30 s


def check_judge(args):
    """Before any model loads: the local judge's tokenizer (None without one), or a trial question to the
    HTTP judge."""
    if args.judge_api_base:
        check_judge_api(args)
    if not args.judge_model_path:
        return None
    return load_tokenizer(args.judge_model_path, args, "--judge_model_path")[0]


def load_judge(args, tokenizer, frozen):
    """A local judge: its model, its tokenizer, the ids of "A" and "B". None without one."""
    if tokenizer is None:
        return None
    model = load_frozen(AutoModelForCausalLM, args.judge_model_path, **frozen)
    return model, tokenizer, judge_answer_ids(tokenizer)


def judge_over_http(texts, args):
    """Every question to the API judge, concurrently; q, mass (1 or 0) and the failures."""
    pool = concurrent.futures.ThreadPoolExecutor(args.judge_api_concurrency)
    futures = [pool.submit(judge_request, text, args) for text in texts]
    start = noted = time.perf_counter()
    while (waiting := concurrent.futures.wait(futures, timeout=1.0).not_done) and not STOP:
        if time.perf_counter() - noted >= JUDGE_WAIT_S:
            noted = time.perf_counter()
            say(f"waiting for the judge at {args.judge_api_base}: {len(futures) - len(waiting)} of {len(futures)} "
                f"answers in {noted - start:.0f} s (timeout: {args.judge_api_timeout:g} s)")
    pool.shutdown(wait=False, cancel_futures=True)
    answers = [f.result() if f.done() and not f.cancelled() and f.exception() is None else None for f in futures]
    # An answer other than exactly A or B, or none, is invalid: never guessed at.
    letters = [(a or "").strip() for a in answers]
    q = torch.tensor([float(x in "A") for x in letters])
    mass = torch.tensor([float(x in ("A", "B")) for x in letters])
    return q, mass, torch.tensor([a is None for a in answers])


def judge_request(text, args):
    """One question, retried with backoff after a timeout, 408, 429 or 5xx; the answer."""
    key = os.environ.get("OPENAI_API_KEY")
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    body = json.dumps({"model": args.judge_api_model, "messages": [{"role": "user", "content": text}],
                       "temperature": 0, "max_tokens": 4}).encode()
    for attempt in range(args.judge_api_retries + 1):
        if attempt:  # the jitter's own stream: Python's is in checkpoints, for an exact resume
            time.sleep(min(0.25 * 2 ** attempt, 8.0) * (0.5 + random.Random().random()))
        try:
            request = urllib.request.Request(args.judge_api_base.rstrip("/") + "/chat/completions", body, headers)
            with urllib.request.urlopen(request, timeout=args.judge_api_timeout) as response:
                return str(json.load(response)["choices"][0]["message"]["content"])
        except urllib.error.HTTPError as e:
            error = e
            if e.code not in (408, 429) and e.code < 500:
                break
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:  # timeout, connection, malformed body
            error = e
        if STOP:
            break
    raise error


def check_judge_api(args):
    """A trial question before any model loads: a wrong URL, model or key fails now."""
    say(f"asking the judge at {args.judge_api_base} a trial question")
    question = (args.judge_prompt or JUDGE_PROMPT).format(prompt="2 + 2?", response_a="4", response_b="5")
    try:
        judge_request(question, args)
    except Exception as e:
        raise UsageError(f"--judge_api_base {args.judge_api_base!r}: a trial question failed ({why(e)});"
                         " is it running? Check --judge_api_model and $OPENAI_API_KEY") from None


# ---- Evaluation


def held_out(args, test_set, rank, world):
    """This rank's share of the held-out prompts (equal shares), and their other columns."""
    available = len(test_set) if test_set is not None else 0
    n = min(args.eval_prompts, available) // world * world
    if args.eval_prompts and n == 0:
        say(f"no policy/reference comparison: no {args.dataset_test_split!r} split of {world}+ prompts")
    columns = test_set[rank * n // world : (rank + 1) * n // world] if n else {}
    return columns.pop(args.dataset_prompt_column, []), columns


def global_streams():
    """The global random streams (Python, NumPy, torch), which reward functions may use."""
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def set_global_streams(streams):
    random.setstate(streams[0])
    np.random.set_state(streams[1])
    torch.set_rng_state(streams[2])


def answers(run, model, prompts, columns, seed):
    """An answer from `model` to each prompt, 2B at a time, and its score (NaN if judged)."""
    texts = []
    scores = []
    chunk_size = 2 * run.args.per_device_train_batch_size
    generator = torch.Generator(run.device).manual_seed(seed)
    for i in range(0, len(prompts), chunk_size):
        chunk = slice(i, i + chunk_size)
        samples = rollout(run, model, prompts[chunk], generator)
        texts += samples.texts
        if run.judged:
            scores += [math.nan] * len(samples.texts)
        else:
            chunk_columns = {k: v[chunk] for k, v in columns.items()}
            scores += score(run, prompts[chunk], samples, chunk_columns).tolist()
    return texts, torch.tensor(scores, dtype=torch.float64)


def reference_answers(run, ref, prompts, columns):
    """The reference's answers to the held-out prompts and their scores, sampled once into run.reference
    (and checkpoints), before TR-DPO first moves it."""
    streams = global_streams()
    texts = run.reference[0] if run.reference else []
    if prompts and len(texts) != len(prompts):  # none yet, or resumed with another --eval_prompts
        run.reference[:] = answers(run, ref, prompts, columns, run.args.seed + 1 + run.rank)
    set_global_streams(streams)
    return run.reference


def evaluate(run, policy, ref, prompts, columns):
    """The policy against the reference as it began, on held-out prompts, judged as in training (a tie
    counts 1/2). Returns the eval/* logs and all ranks' records."""
    ref_texts, ref_scores = reference_answers(run, ref, prompts, columns)
    streams = global_streams()
    texts, scores = answers(run, policy, prompts, columns, run.args.seed + 1 + run.rank + run.world)
    if run.judged:
        p, counted, decided, _ = (t.cpu() for t in judge(run, prompts, texts, ref_texts))
        wins = torch.where(decided, (p > 0.5).double(), 0.5)
    else:
        wins = (scores > ref_scores) + 0.5 * (scores == ref_scores)
        counted = ~(scores.isnan() | ref_scores.isnan())
    set_global_streams(streams)
    mine = []
    for i, prompt in enumerate(prompts):
        question = prompt[-1]["content"] if is_conversational(prompt) else prompt
        mine.append({"prompt": question, "reference": ref_texts[i], "reference_reward": float(ref_scores[i]),
                     "trained": texts[i], "trained_reward": float(scores[i]),
                     "win": float(wins[i]) if counted[i] else math.nan})
    records = gather_lists(mine)
    won = [r["win"] for r in records if not math.isnan(r["win"])]
    logs = {"eval/win_rate": sum(won) / len(won) if won else math.nan, "eval/judged": len(won) / len(records)}
    if not run.judged:
        logs["eval/reward_reference"] = float(np.nanmean([r["reference_reward"] for r in records]))
        logs["eval/reward_trained"] = float(np.nanmean([r["trained_reward"] for r in records]))
    return logs, records


# ---- Logs, reports, the command line


class Log:
    """Rank 0's record: lines, metrics.jsonl, completions.jsonl, wandb (NaN as null)."""

    def __init__(self, args, plan, state, resumed):
        self.on = is_main()
        self.total = plan.total
        self.dir = args.output_dir
        self.files = {}  # name: the open file
        self.keep = state["step"] if resumed else None  # a resumed run keeps the lines up to its checkpoint
        self.ties_noted = args.drop_ties
        self.wandb = None
        if self.on and args.report_to == "wandb":
            import wandb

            run = wandb.init(project=os.environ.get("WANDB_PROJECT", "online-dpo"), name=args.run_name,
                             config=asdict(args), id=state["wandb_id"], resume="allow" if state["wandb_id"] else None)
            state["wandb_id"] = run.id
            self.wandb = wandb
        self.bar = tqdm(total=plan.total, initial=state["step"], desc="online-dpo", dynamic_ncols=True,
                        disable=not self.on)

    def write(self, name, records):
        if name not in self.files:
            path = os.path.join(self.dir, name)
            kept = []
            if self.keep is not None and os.path.exists(path):
                with open(path) as f:
                    for line in f:
                        with contextlib.suppress(ValueError):  # a line cut short by a crash
                            if json.loads(line)["step"] <= self.keep:
                                kept.append(line)
            replace_file(path, "".join(kept))
            self.files[name] = open(path, "a")
        for r in records:
            r = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()}
            self.files[name].write(json.dumps(r, allow_nan=False) + "\n")
        self.files[name].flush()

    def line(self, step, logs, records=None):
        if not self.on:
            return
        self.bar.write(f"step {step}/{self.total} " + " ".join(f"{k}={v:.4g}" for k, v in logs.items()))
        if logs.get("pairs/ties") == 1 and not self.ties_noted:
            self.ties_noted = True
            self.bar.write("note: every pair tied, so chosen and rejected were arbitrary: --drop_ties leaves ties out "
                           "of the loss")
        self.write("metrics.jsonl", [{"step": step, **logs}])
        if self.wandb:
            tables = {"eval/completions": self.table(records)} if records else {}
            self.wandb.log(logs | tables, step=step)

    def pairs(self, step, prompts, texts, pairs):
        records = []
        for i, prompt in enumerate(prompts):
            record = {"step": step, "prompt": as_text(prompt), "chosen": texts[pairs.chosen[i]],
                      "rejected": texts[pairs.rejected[i]], "in_loss": bool(pairs.kept[i])}
            records.append(record | {k: float(v[i]) for k, v in pairs.logged.items()})
        if self.on:
            self.write("completions.jsonl", records)
            if self.wandb:
                self.wandb.log({"completions": self.table(records)}, step=step)

    def table(self, records):
        return self.wandb.Table(columns=list(records[0]), data=[list(r.values()) for r in records])

    def close(self):
        self.bar.close()
        for file in self.files.values():
            file.close()
        if self.wandb:
            self.wandb.finish()


def feedback_line(args):
    if args.judge_model_path or args.judge_api_base:
        return f"preferences from the judge {args.judge_model_path or args.judge_api_model}"
    rewards = " + ".join(args.reward_model_path + args.reward_funcs)
    return f"preferences from the best and worst of {args.num_samples} samples by {rewards}"


def feedback_failed(error, where, checkpoint, state, mine):
    """A reward function or the judge failed (on every rank): save `state`; name the step."""
    saved = None
    if state["step"] > 0:
        saved = checkpoint(state, mine)
    return TrainingError(f"{where}: {error}; {resume_hint(saved)}")


@contextlib.contextmanager
def all_or_none(kind=FeedbackError):
    """Under torchrun, an error of `kind` on one rank is raised on all (the first one's line), which
    would wait in their next collective for the rank that ended."""
    error = None
    try:
        yield
    except kind as e:
        if not dist.is_initialized():
            raise
        error = str(e)
    if dist.is_initialized():
        error = next((f"{e} (on rank {r})" for r, e in enumerate(gather_lists([error])) if e), None)
    if error and dist.is_initialized():
        EVERYWHERE.append(error)
    if error:
        raise kind(error)


def resume_hint(saved):
    """What to do after a failure, given the checkpoint saved (or None)."""
    if saved:
        return f"saved {saved}: fix it, then resume with --resume_from_checkpoint latest"
    return "nothing saved"


def cut(text, n=100):
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def before_after(logs, records, show=4):
    """The report at the end: held-out prompts, both answers, the mean rewards, the win rate (evaluate())."""
    rewarded = ", reward in brackets" if not math.isnan(records[0]["reference_reward"]) else ""
    lines = [f"before (reference) / after (trained) on held-out prompts{rewarded}:"]
    for i, r in enumerate(records[:show]):
        lines.append(f"[{i + 1}] {cut(r['prompt'])}")
        for name in ("reference", "trained"):
            reward = "" if math.isnan(r[name + "_reward"]) else f"({r[name + '_reward']:+.2f})  "
            lines.append(f"    {name:9} {reward}{cut(r[name])}")
    if rewarded:
        lines.append(f"mean reward over {len(records)} held-out prompts: reference {logs['eval/reward_reference']:+.3f}"
                     f", trained {logs['eval/reward_trained']:+.3f}")
    if logs["eval/judged"]:
        lines.append(f"win rate of the trained policy over the reference: {logs['eval/win_rate']:.3f} on "
                     f"{round(logs['eval/judged'] * len(records))} prompts (a tie counts 1/2)")
    return "\n".join(lines)


def push_to_hub(args):
    repo = args.hub_model_id
    if not repo:
        repo = os.path.basename(os.path.abspath(args.output_dir))
    api = huggingface_hub.HfApi()
    api.create_repo(repo, exist_ok=True)
    api.upload_folder(folder_path=args.output_dir, repo_id=repo, ignore_patterns=["checkpoint-*", "latest", ".lock"])
    print(f"pushed to https://huggingface.co/{repo}")


def cli(argv=None):
    """The Args from the command line; a preset's values are defaults that later flags override."""
    argv = sys.argv[1:] if argv is None else list(argv)
    preset = None
    for i, word in enumerate(argv):
        if word == "--preset" and i + 1 < len(argv):
            preset = argv[i + 1]
        elif word.startswith("--preset="):
            preset = word.split("=", 1)[1]
    default = Args(preset=preset, **PRESETS[preset]) if preset in PRESETS else Args()  # tyro reports a bad name
    return tyro.cli(Args, args=argv, default=default, use_underscores=True, config=(tyro.conf.FlagConversionOff,),
                    description=__doc__.split("\n\n")[0])


class FlagError(UsageError):
    """A flag the parser refuses: exit code 2, as argparse's."""


def parse_flags(argv):
    """cli(), with the parser's box of lines as one line that keeps its suggestions."""
    box = io.StringIO()
    try:
        with contextlib.redirect_stderr(box):
            return cli(argv)
    except SystemExit as e:
        if e.code in (0, None) or not box.getvalue().strip():
            raise
        lines = [line.strip(" ╭╮╰╯│") for line in box.getvalue().strip().splitlines()]
        text = " ".join(line if line.strip("-─") else "\0" for line in lines[1:] if line)  # sections between rules
        sections = [" ".join(section.split()) for section in text.split("\0") if section.strip()]
        message = sections[0] if sections else lines[0].strip("─ ")
        near = [re.findall(r"--[\w-]+", s) for s in sections if s.strip().startswith("Perhaps you meant")]
        if near:
            message += f" (did you mean {' or '.join(near[0])}?)"
        raise FlagError(f"{message}; see --help") from None


def run(argv=None):
    """The command line. Exit code: 1 after an error, 2 for a flag, 128 + N for signal N before anything
    was saved, else signal_exit()'s."""
    STOP.clear()
    SAVED.clear()
    EVERYWHERE.clear()
    handlers = {sig: signal.signal(sig, on_signal) for sig in SIGNALS}
    where = f" (rank {os.environ['RANK']})" if "RANK" in os.environ else ""
    for stream in (sys.stdout, sys.stderr):  # under LC_ALL=C, a prompt may not be ASCII
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    try:
        main(parse_flags(argv))
        return 0
    except (UsageError, TrainingError, OSError) as e:
        kept = f"; the trained model is saved in {SAVED[0]}" if SAVED else ""  # the closing comparison failed
        print(f"online_dpo.py: error{where}: {' '.join(str(e).splitlines())}{kept}", file=sys.stderr)
        if EVERYWHERE:  # none exits (torchrun stops the rest) before all said it
            dist.barrier()
        return 2 if isinstance(e, FlagError) else 1
    except SystemExit as e:  # --help, or the loop's stop after a signal, the step saved
        return 0 if e.code is None else e.code
    except (Stopped, KeyboardInterrupt) as e:
        signum = e.args[0] if isinstance(e, Stopped) else signal.SIGINT
        name = signal.Signals(signum).name
        if SAVED:
            say(f"stopped by {name} after the final save: the trained model is in {SAVED[0]}")
            return signal_exit([signum])
        print(f"online_dpo.py: error{where}: stopped by {name} before training began: nothing saved",
              file=sys.stderr)
        return 128 + signum
    finally:
        unlock_output_dir()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(run())
