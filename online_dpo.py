"""Online DPO in one file: Online AI Feedback (Guo et al. 2024, arXiv 2402.04792).

Each optimizer step, for every prompt of the batch:
  sample K (2) completions from the *current* policy -> reward models and/or reward functions score them, or an LLM
  judge compares them -> the better is "chosen", the worse "rejected" -> DPO (sigmoid) or IPO loss against a frozen
  reference model.

    python online_dpo.py --preset tiny               # the embedded offline world (flags after it override it)
    python online_dpo.py --preset qwen2-0.5b         # the spec's quick start: Qwen2-0.5B-Instruct on UltraFeedback
    torchrun --nproc_per_node 8 online_dpo.py --beta 0.1    # one process per GPU: DDP, or --distributed fsdp to shard
    python online_dpo.py --beta 0.1 --resume_from_checkpoint latest   # after a stop: the same flags, plus this

Flags are spelled as in TRL's OnlineDPOConfig and transformers' TrainingArguments.

How to read this file: main() first, the training loop in it, one step in numbered stages (2 sample, 3-4 feedback
and pairs, 5 log-probs, 6 loss, 7 optimizer step, 8 log, evaluate, save). Above main(), in the order a step uses
them: Args, loading, prompts, sampling, feedback, pairing, log-probs and loss, metrics. Below it, what a first
reading can skip: checks, checkpoints, the judges' mechanics, evaluation, logs, the Hub. One change, one place:
a new loss in dpo_loss, a new reward as a reward function, a new pair rule in pair, a new source of preferences
in preferences.
"""

import concurrent.futures
import contextlib
import difflib
import importlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Annotated, Callable, Literal

import datasets
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import tyro
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          StaticCache, set_seed)
from tyro.constructors import PrimitiveConstructorSpec

from kernels import linear_logprobs, naive_token_logprobs

QUICK_START_REWARD_MODEL = "trl-lib/Qwen2-0.5B-Reward"
TINY_WORLD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmarks", "tiny")  # benchmarks/tiny_world.py
OFFLINE_HINT = "no network or no Hub access? `python online_dpo.py --preset tiny` trains the embedded world offline"


# ------------------------------------------------------------------------------
# Args


def _parse_bool(words: list[str]) -> bool:
    if not words:  # a bare `--flag` means True, as with HfArgumentParser
        return True
    if words[0].lower() in ("true", "1", "yes"):
        return True
    if words[0].lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"expected True or False, got {words[0]!r}")


# Booleans accept `--flag`, `--flag True` and `--flag False`, the way TRL's commands write them.
Bool = Annotated[bool, PrimitiveConstructorSpec(nargs=(0, 1), metavar="{True,False}", instance_from_str=_parse_bool,
                                                is_instance=lambda x: isinstance(x, bool),
                                                str_from_instance=lambda x: [str(x)])]


@dataclass
class Args:
    preset: Literal["tiny", "qwen2-0.5b", "pythia-1b-tldr"] | None = None
    """a named setup (online_dpo.PRESETS) whose values become the defaults; other flags override them"""

    # --- models and data
    model_name_or_path: str = "Qwen/Qwen2-0.5B-Instruct"
    """policy to train: a Hub id or a local directory"""
    ref_model_path: str | None = None
    """frozen reference model, Hub id or local directory; None: a frozen copy of the policy"""
    reward_model_path: tuple[str, ...] | None = None
    """reward models (sequence classifiers, one score); None: trl-lib/Qwen2-0.5B-Reward, unless rewards are given"""
    reward_funcs: tuple[str, ...] = ()
    """Python reward functions by import path, `my_rewards:length_penalty` or `path/to/file.py:length_penalty`"""
    reward_weights: tuple[float, ...] | None = None
    """one weight per reward, reward models first, then reward functions; None: all 1.0"""
    dataset_name: str = "trl-lib/ultrafeedback-prompt"
    """prompt dataset: a Hub name, a `save_to_disk` directory, or a .json/.jsonl/.parquet/.csv file"""
    dataset_config: str | None = None
    """dataset configuration name (Hub datasets with several configurations)"""
    dataset_train_split: str = "train"
    """split to train on"""
    dataset_test_split: str = "test"
    """split of held-out prompts on which reference and trained policy are compared (skipped if absent)"""
    eval_prompts: int = 64
    """how many held-out prompts both models answer in a comparison (0: none)"""
    dataset_prompt_column: str = "prompt"
    """column holding the prompts: text (standard) or a list of {role, content} messages (conversational)"""
    model_init_kwargs: str | None = None
    """JSON dict for from_pretrained of the policy and reference, e.g. '{"attn_implementation": "sdpa"}'"""
    trust_remote_code: Bool = False
    """let models and tokenizers run Python code from their Hub repository (only for sources you trust)"""

    # --- online DPO (OnlineDPOConfig)
    beta: tuple[float, ...] = (0.1,)
    """KL strength (tau for IPO); several values: one per epoch, the last one for the remaining epochs"""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: the DPO loss; ipo: the IPO loss"""
    max_new_tokens: int = 64
    """maximum number of tokens sampled per completion"""
    max_length: int = 256
    """maximum prompt + completion tokens; prompts are cut from the left to max_length - max_new_tokens"""
    temperature: float = 0.9
    """sampling temperature"""
    top_p: float = 1.0
    """nucleus sampling: keep the smallest set of tokens whose probability sums to top_p (1.0: off)"""
    top_k: int = 0
    """keep only the top_k most likely tokens (0: off)"""
    min_p: float | None = None
    """drop tokens whose probability is below min_p times the most likely token's (None: off)"""
    repetition_penalty: float = 1.0
    """penalise tokens already in the prompt or completion (>1 discourages repeats, 1.0: off)"""
    generation_kwargs: str | None = None
    """JSON dict overriding the sampling flags above, plus do_sample, suppress_tokens and eos_token_id"""
    missing_eos_penalty: float | None = None
    """subtracted from the score of a completion that ends without an EOS token (>= 0)"""
    disable_dropout: Bool = True
    """turn dropout off in the policy and the reference"""
    num_samples: int = 2
    """completions sampled per prompt; the pair is the best and the worst by reward (a judge compares 2)"""
    drop_ties: Bool = False
    """leave out of the loss (and count) prompts whose best and worst rewards differ by <= --tie_threshold"""
    tie_threshold: float = 0.0
    """reward difference at or below which the best and the worst completion tie"""
    judge_model_path: str | None = None
    """AI feedback instead of rewards: a causal LM (Hub id or local) judges which completion is better"""
    judge_prompt: str | None = None
    """the judge's instruction, with {prompt}, {response_a} and {response_b}; None: online_dpo.JUDGE_PROMPT"""
    judge_api_base: str | None = None
    """the judge over an OpenAI-compatible API, e.g. http://localhost:8000/v1 (a vLLM server), or a hosted one"""
    judge_api_model: str | None = None
    """model name sent to --judge_api_base"""
    judge_api_key_env: str = "OPENAI_API_KEY"
    """environment variable that holds the API key (unset: no Authorization header)"""
    judge_api_concurrency: int = 16
    """judge requests in flight at once"""
    judge_api_timeout: float = 60.0
    """seconds before a judge request is abandoned (then retried)"""
    judge_api_retries: int = 3
    """retries of a judge request after a timeout, a connection error, 429 or 5xx, with exponential backoff"""
    judge_undecided: float = 0.05
    """a pair with |P(first is better) - 0.5| at or below this is undecided: left out of the loss, counted"""
    logprob_impl: Literal["fused", "naive"] = "fused"
    """fused: log-probs from hidden states and lm_head weight tile by tile (no [N, V] logits); naive: logits"""

    # --- training (TrainingArguments)
    output_dir: str = "Qwen2-0.5B-OnlineDPO"
    """where the trained model, checkpoints and metrics.jsonl go"""
    learning_rate: float = 5e-7
    """AdamW peak learning rate"""
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = "linear"
    """decay after warmup: linear to 0, cosine to 0, or constant"""
    warmup_steps: float = 0
    """linear warmup: a number of steps, or a fraction of all steps when < 1"""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norm weights)"""
    max_grad_norm: float = 1.0
    """clip the gradient to this global norm (0: no clipping)"""
    per_device_train_batch_size: int = 8
    """prompts per micro-batch (each gives 2 completions)"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    num_train_epochs: float = 3.0
    """passes over the prompts (ignored when max_steps > 0)"""
    max_steps: int = -1
    """total optimizer steps; overrides num_train_epochs when > 0"""
    logging_steps: float = 10
    """log every N steps, or a fraction of all steps when < 1"""
    save_steps: float = 500
    """save output_dir/checkpoint-N every N steps, or a fraction of all steps (0: only the final save)"""
    eval_steps: float = 0
    """compare policy and reference on held-out prompts every N steps or fraction (0: only at the end)"""
    log_completions_steps: float = 0
    """every N steps (or fraction) write a micro-batch's pairs to output_dir/completions.jsonl, wandb (0: never)"""
    save_total_limit: int | None = None
    """keep only the newest N checkpoints (None: keep all)"""
    resume_from_checkpoint: str | None = None
    """continue a stopped run exactly: a checkpoint directory, or `latest` (output_dir's newest complete one)"""
    overwrite_output_dir: Bool = False
    """start afresh in an output_dir holding an earlier run's checkpoints (deletes them; refused without it)"""
    max_nonfinite_steps: int = 10
    """a step with a NaN/inf loss or gradient is skipped; stop with an error after this many in a row"""
    seed: int = 42
    """seed for the data order, sampling and initialisation"""
    use_cpu: Bool = False
    """train on the CPU even when a GPU is present (several processes then talk over gloo)"""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """under torchrun: ddp keeps a whole policy per rank; fsdp shards it (FSDP2, ZeRO-3) for larger models"""
    shard_frozen_models: Bool = False
    """with --distributed fsdp: shard the reference and reward models too (else whole on every rank)"""
    bf16: Bool | None = None
    """bf16 mixed precision (fp32 master weights); None: on where the GPU supports it, off on CPU"""
    gradient_checkpointing: Bool = True
    """recompute activations in the training forward to save memory (sampling keeps its KV cache)"""
    report_to: Literal["none", "wandb"] = "none"
    """also send metrics to Weights & Biases (project from $WANDB_PROJECT, default online-dpo)"""
    run_name: str | None = None
    """run name shown in wandb"""
    push_to_hub: Bool = False
    """upload the final model and tokenizer to the Hugging Face Hub"""
    hub_model_id: str | None = None
    """Hub repository for --push_to_hub; None: the name of output_dir"""


PRESETS = {
    # The embedded world (benchmarks/tiny_world.py): shop-assistant answers, a reward model that likes them positive,
    # short and properly ended. Offline, CPU, fp32; about 3 minutes on 2 cores.
    "tiny": dict(model_name_or_path=f"{TINY_WORLD}/policy", reward_model_path=(f"{TINY_WORLD}/reward",),
                 dataset_name=f"{TINY_WORLD}/prompts", output_dir="tiny-OnlineDPO", use_cpu=True, bf16=False,
                 gradient_checkpointing=False, max_new_tokens=64, max_length=128, learning_rate=1e-4,
                 warmup_steps=0.1, per_device_train_batch_size=16, max_steps=150, logging_steps=10, save_steps=0),
    # The spec's quick start (Qwen2-0.5B-Instruct, trl-lib/Qwen2-0.5B-Reward, UltraFeedback): the Args defaults.
    "qwen2-0.5b": dict(),
    # The spec's 1B TL;DR benchmark command (add --push_to_hub to upload the result as it does).
    "pythia-1b-tldr": dict(model_name_or_path="trl-lib/pythia-1b-deduped-tldr-sft",
                           reward_model_path=("trl-lib/pythia-1b-deduped-tldr-rm",), dataset_name="trl-lib/tldr",
                           learning_rate=5e-7, output_dir="pythia-1b-deduped-tldr-online-dpo", beta=(0.1,),
                           per_device_train_batch_size=8, gradient_accumulation_steps=2, num_train_epochs=3,
                           max_new_tokens=53, warmup_steps=0.1, missing_eos_penalty=1.0, save_steps=0.1),
}


class UsageError(ValueError):
    """Bad input: the message names the argument and says what to do."""


class TrainingError(RuntimeError):
    """Training cannot go on (NaN/inf steps in a row, weights that must not be saved); the message says what to do."""


# ------------------------------------------------------------------------------
# Loading: tokenizers and models (prompts and reward functions: with their checks, below main())


def load_tokenizer(path: str, trust_remote_code: bool):
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # ValueError: a directory without tokenizer files
        raise unreachable("the tokenizer of", path, e) from None
    if not tokenizer("Hello world.", add_special_tokens=False)["input_ids"]:  # what a directory without its files gives
        raise UsageError(f"could not load the tokenizer of {path!r}: it has no vocabulary (no tokenizer.json or "
                         "vocabulary files there?); save the tokenizer next to the model")
    if tokenizer.pad_token is None:  # batches need one; padding is masked out everywhere
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(auto_class, path: str, args: Args, **kwargs):
    try:
        return auto_class.from_pretrained(path, trust_remote_code=args.trust_remote_code, **kwargs)
    except OSError as e:
        raise unreachable("model", path, e) from None


def load_policy(path: str, args: Args, device: torch.device, world: int, bf16: bool):
    """The model that trains (fp32 master weights). -> the policy, and what each forward with gradient goes through:
    DDP's wrapper (the module inside it would skip the gradient all-reduce without a word), or the policy."""
    kwargs = {"dtype": torch.float32} | json_dict(args.model_init_kwargs, "model_init_kwargs")
    policy = load_model(AutoModelForCausalLM, path, args, **kwargs)
    if args.disable_dropout:
        for module in policy.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    if args.gradient_checkpointing:  # active only in train mode: sampling (eval mode) keeps its KV cache
        policy.activation_checkpointing_enable()
    policy.train()  # from_pretrained returns eval mode, in which checkpointing (and any kept dropout) is off
    fsdp = world > 1 and args.distributed == "fsdp"
    mixed_precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    policy = place(policy, device, fsdp, mixed_precision)
    if world == 1 or fsdp:
        return policy, policy
    return policy, DDP(policy, device_ids=[device.index] if device.type == "cuda" else None)


def load_frozen(auto_class, path: str, args: Args, device: torch.device, shard: bool, bf16: bool, **kwargs):
    """A model that only runs forward: no gradients, eval mode, bf16 when the policy's matmuls are."""
    kwargs = {"dtype": torch.float32} | kwargs | ({"dtype": torch.bfloat16} if bf16 else {})
    return place(load_model(auto_class, path, args, **kwargs).requires_grad_(False).eval(), device, shard)


# ------------------------------------------------------------------------------
# Several processes: torchrun, DDP, FSDP2. With one process (no torchrun) every helper here does nothing.


def init_distributed(args: Args) -> tuple[int, int, torch.device]:
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; one device per rank. -> rank, world size, device."""
    rank, local_rank = (int(os.environ.get(k, "0")) for k in ("RANK", "LOCAL_RANK"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and not args.use_cpu
    if cuda and local_rank >= torch.cuda.device_count():
        raise UsageError(f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} GPUs: "
                         "lower torchrun --nproc_per_node to the number of GPUs")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return rank, world, device


def is_main() -> bool:  # rank 0, or the only process: it alone prints, writes files and talks to wandb
    return os.environ.get("RANK", "0") == "0"


def say(text: str) -> None:
    if is_main():
        print(text)


def place(model, device: torch.device, shard: bool, mixed_precision: MixedPrecisionPolicy | None = None):
    """To this rank's device, or sharded over all ranks with FSDP2 (each decoder layer a unit gathered just before it
    runs, the root unit the rest), from the copy in CPU memory: a model larger than one device never lands on one."""
    if not shard:
        return model.to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = mixed_precision or MixedPrecisionPolicy()
    for module in model.modules():
        if type(module).__name__ in (getattr(model, "_no_split_modules", None) or ()):  # e.g. Qwen2DecoderLayer
            fully_shard(module, mesh=mesh, mp_policy=policy)
    return fully_shard(model, mesh=mesh, mp_policy=policy)


@contextlib.contextmanager
def gathered(model):
    """FSDP2: every unit gathered once for a decode, freed after. Decoding then runs no collectives, so a rank whose
    completions all end early never leaves the others waiting."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:  # fully_shard's defaults again: layers free their weights after forward, the root keeps them
            unit.set_reshard_after_forward(unit is not model, recurse=False)
            unit.reshard()


def sync_gradients(model, sync: bool) -> None:
    """Gradient accumulation: the all-reduce (DDP) or reduce-scatter (FSDP2) runs only when sync is set."""
    if isinstance(model, DDP):
        model.require_backward_grad_sync = sync  # what DDP's no_sync() context sets
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)


# ------------------------------------------------------------------------------
# Prompts: micro-batches of them, then left-padded token ids


def micro_batches(dataset, args: Args, plan: "Plan", rank: int, world: int, start: int):
    """This rank's micro-batches of B prompts (dicts of columns) from global micro-batch `start` on, shuffled each
    epoch alike on all ranks; rank r takes the r-th B of each global one, as one process with world x B would."""
    B, per_epoch = args.per_device_train_batch_size, plan.per_epoch * args.gradient_accumulation_steps
    for epoch in range(start // per_epoch, math.ceil(plan.total / plan.per_epoch)):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
        for i in range(start % per_epoch if epoch == start // per_epoch else 0, per_epoch):
            first = (i * world + rank) * B
            yield dataset[order[first : first + B]]


def is_conversational(prompt) -> bool:
    return isinstance(prompt, list) and len(prompt) > 0 and isinstance(prompt[0], dict) and "role" in prompt[0]


def prompt_token_ids(tokenizer, prompts: list) -> list[list[int]]:
    """Each prompt's token ids, whole: conversations through the chat template with the assistant turn opened."""
    texts = []
    for p in prompts:
        if is_conversational(p):
            if tokenizer.chat_template is None:
                raise UsageError("conversational prompts need a tokenizer with a chat template; this one has none "
                                 "(use standard text prompts or a chat model's tokenizer)")
            p = tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        texts.append(p)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if min(map(len, ids)) == 0:
        raise UsageError("a prompt is empty after tokenization; remove empty prompts from the dataset")
    return ids


def encode_prompts(tokenizer, prompts: list, max_prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat template for conversational prompts, then keep the last max_prompt_len tokens. -> ids, mask (N, P)."""
    seqs = [ids[-max_prompt_len:] for ids in prompt_token_ids(tokenizer, prompts)]
    P = max(map(len, seqs))
    ids = torch.full((len(seqs), P), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), P), dtype=torch.long)
    for i, row in enumerate(seqs):  # left padding: every row's last token is real, so decoding appends in step
        ids[i, P - len(row):] = torch.tensor(row)
        mask[i, P - len(row):] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:  # (N, L) left-padded rows: 0 at each row's first real token
    return (mask.cumsum(-1) - 1).clamp(min=0)


# ------------------------------------------------------------------------------
# Sampling with a KV cache


@torch.no_grad()
def sample(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int, stop_ids: list[int],
           pad_id: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float | None = None,
           repetition_penalty: float = 1.0, do_sample: bool = True, suppress_tokens: list[int] | None = None,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched decoding over a preallocated KV cache, from prompt_ids, prompt_mask (N, P) left-padded. -> completion
    ids and mask (N, T <= max_new_tokens): a row ends at its first stop token (kept, mask 1), then pad_id, mask 0."""
    N, P = prompt_ids.shape
    device = prompt_ids.device
    stop = torch.tensor(stop_ids, device=device)
    cache = StaticCache(config=model.config, max_cache_len=P + max_new_tokens)
    mask = torch.cat([prompt_mask, prompt_mask.new_zeros(N, max_new_tokens)], 1)  # (N, P+T): a column opens per step
    logits = model(input_ids=prompt_ids, attention_mask=mask, position_ids=positions(prompt_mask), cache=cache,
                   logits_to_keep=1).logits[:, -1]
    next_position = prompt_mask.sum(-1, keepdim=True)  # (N, 1)
    seen = None
    if repetition_penalty != 1.0:  # tokens already in the prompt or completion; padding does not count
        seen = torch.zeros(N, logits.size(-1), dtype=torch.bool, device=device)
        seen.scatter_(1, prompt_ids.where(prompt_mask.bool(), prompt_ids[:, -1:]), True)
    tokens = prompt_ids.new_full((N, max_new_tokens), pad_id)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        scores = logits.float()
        if seen is not None:
            penalised = torch.where(scores > 0, scores / repetition_penalty, scores * repetition_penalty)
            scores = torch.where(seen, penalised, scores)
        if suppress_tokens:
            scores[:, suppress_tokens] = float("-inf")
        if do_sample:
            scores = filter_logits(scores / temperature, top_k, top_p, min_p)
            token = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
        else:
            token = scores.argmax(-1)
        token = token.masked_fill(done, pad_id)
        tokens[:, t] = token
        done |= torch.isin(token, stop)
        if t == max_new_tokens - 1 or done.all():
            break
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        mask[:, P + t] = 1
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_position + t,
                       cache=cache).logits[:, -1]
    tokens = tokens[:, : t + 1]
    is_stop = torch.isin(tokens, stop).long()
    after_stop = (is_stop.cumsum(-1) - is_stop) > 0
    return tokens.masked_fill(after_stop, pad_id), (~after_stop).long()


@dataclass
class Rollout:
    """What sampling and feedback need; main() sets it up."""
    args: Args
    tokenizer: object
    rank: int
    world: int
    device: torch.device
    autocast: torch.autocast  # bf16 matmuls, or off
    generation: dict  # sample()'s keyword arguments
    stop_ids: list[int]
    reward_models: list  # (model, its tokenizer) pairs
    reward_funcs: list
    judge: tuple | None  # a local judge: model, tokenizer, ids of the tokens "A" and "B"

    @property
    def judged(self) -> bool:  # preferences come from an LLM judge, local or over HTTP, not from rewards
        return bool(self.args.judge_model_path or self.args.judge_api_base)


@dataclass
class Samples:
    """N completions, a row each, with their prompts."""
    prompt_ids: torch.Tensor  # (N, P) left-padded
    prompt_mask: torch.Tensor  # (N, P)
    completion_ids: torch.Tensor  # (N, T) right-padded
    completion_mask: torch.Tensor  # (N, T)
    has_eos: torch.Tensor  # (N,) ended with a stop token
    token_ids: list[list[int]]  # each completion's real tokens
    texts: list[str]
    completions: list  # what rewards read: the texts, or assistant messages for conversational prompts

    def rows(self, pick: torch.Tensor) -> tuple:  # the four tensors, rows `pick` only
        return self.prompt_ids[pick], self.prompt_mask[pick], self.completion_ids[pick], self.completion_mask[pick]


def rollout(run: Rollout, model, prompts: list, generator: torch.Generator, window: "Window | None" = None) -> Samples:
    """One completion per prompt from `model` as it is now, from the prompt cut to max_length - max_new_tokens (so
    the context that sampled a completion is the one that scores it)."""
    args = run.args
    ids, mask = encode_prompts(run.tokenizer, prompts, args.max_length - args.max_new_tokens)
    ids, mask = ids.to(run.device), mask.to(run.device)
    was_training, t0 = model.training, time.perf_counter()
    model.eval()
    with gathered(model), run.autocast:  # FSDP2: the shards gathered once for the whole decode
        completion_ids, completion_mask = sample(model, ids, mask, args.max_new_tokens, run.stop_ids,
                                                 run.tokenizer.pad_token_id, generator=generator, **run.generation)
    model.train(was_training)
    if window is not None:
        window.sampling += time.perf_counter() - t0
    stop = torch.tensor(run.stop_ids, device=run.device)
    has_eos = (torch.isin(completion_ids, stop) & (completion_mask == 1)).any(1)
    token_ids = [row[m.bool()].tolist() for row, m in zip(completion_ids, completion_mask)]
    texts = run.tokenizer.batch_decode(token_ids, skip_special_tokens=True)
    completions = [[{"role": "assistant", "content": t}] for t in texts] if is_conversational(prompts[0]) else texts
    return Samples(ids, mask, completion_ids, completion_mask, has_eos, token_ids, texts, completions)


# ------------------------------------------------------------------------------
# Feedback from rewards: reward models and reward functions score each completion


@torch.no_grad()
def score_completions(prompts: list, completions: list, completion_ids: list[list[int]], extra_columns: dict,
                      reward_models: list, reward_funcs: list, weights: torch.Tensor):
    """Every reward of each (prompt, completion), weighted and NaN-summed. -> total (N,), per reward (N, R). Reward
    models re-encode the texts with their own tokenizer and chat template; reward functions get TRL's keywords
    (prompts, completions, completion_ids, the other dataset columns) and may answer None: no opinion."""
    device = weights.device
    columns = []
    for model, tokenizer in reward_models:
        if is_conversational(prompts[0]):
            texts = [tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions)]
        else:
            texts = [p + c for p, c in zip(prompts, completions)]
        batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
        columns.append(model(**batch.to(device)).logits[:, 0].float())
    for func in reward_funcs:
        out = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **extra_columns)
        columns.append(reward_column(out, func, len(prompts), device))
    per_reward = torch.stack(columns, 1)  # (N, R)
    return (per_reward * weights).nansum(1), per_reward


def score(run: Rollout, prompts: list, samples: Samples, columns: dict) -> torch.Tensor:
    """(N,) the weighted rewards, minus --missing_eos_penalty where a completion has no stop token."""
    weights = torch.tensor(run.args.reward_weights or [1.0] * (len(run.reward_models) + len(run.reward_funcs)),
                           device=run.device)
    with run.autocast:
        scores, _ = score_completions(prompts, samples.completions, samples.token_ids, columns, run.reward_models,
                                      run.reward_funcs, weights)
    if run.args.missing_eos_penalty is not None:
        scores = scores - run.args.missing_eos_penalty * (~samples.has_eos).float()
    return scores


# ------------------------------------------------------------------------------
# Feedback from an LLM judge (the paper's annotator): which of two completions answers the prompt better

JUDGE_MIN_MASS = 0.5  # P(A) + P(B) below this in either order: the judge is not answering the question (invalid)


def judge_decisions(q: torch.Tensor, mass: torch.Tensor, undecided: float):
    """q, mass (2N,) from the two orders of N pairs -> p (N,) = P(first is better), the two orders averaged (a judge
    that always says A gives 0.5); valid: it answered A or B in both orders; decided: valid, |p - 0.5| > undecided."""
    N = q.numel() // 2
    p = (q[:N] + 1 - q[N:]) / 2
    valid = (mass[:N] >= JUDGE_MIN_MASS) & (mass[N:] >= JUDGE_MIN_MASS)
    return p, valid, valid & ((p - 0.5).abs() > undecided)


def judge(run: Rollout, prompts: list, first: list, second: list):
    """Each pair asked in both orders (judge_texts), to the local judge or over HTTP (below main()). -> p, valid,
    decided (N,) as in judge_decisions; failed (2N,): requests that got no answer."""
    args = run.args
    texts = judge_texts(args.judge_prompt or JUDGE_PROMPT, prompts, first, second)
    if args.judge_api_base:
        q, mass, failed = judge_over_http(texts, args)
    else:
        model, tokenizer, answer_ids = run.judge
        with run.autocast:
            q, mass = judge_locally(model, tokenizer, texts, answer_ids, 2 * args.per_device_train_batch_size)
        failed = torch.zeros(len(texts), dtype=torch.bool)
    return *judge_decisions(q.to(run.device), mass.to(run.device), args.judge_undecided), failed.to(run.device)


# ------------------------------------------------------------------------------
# Pairing: which two samples of a prompt the loss compares


def pair(scores: torch.Tensor, num_samples: int = 2, tie_threshold: float = 0.0):
    """scores (K*B,) laid out [sample 1 of prompts 0..B-1, ..., sample K of prompts 0..B-1] -> chosen, rejected (B,)
    row indices and tie (B,): per prompt the best and the worst sample; among equal scores the earliest is the best
    and the latest the worst (so K = 2 and a tie: the first is chosen). A completion that no reward scored (NaN)
    ranks last. tie: best - worst <= tie_threshold."""
    s = scores.view(num_samples, -1).nan_to_num(nan=-math.inf)  # (K, B)
    rows = torch.arange(s.size(1), device=scores.device)
    best, worst = s.argmax(0), num_samples - 1 - s.flip(0).argmin(0)
    tie = s[best, rows] - s[worst, rows] <= tie_threshold
    return best * s.size(1) + rows, worst * s.size(1) + rows, tie


@dataclass
class Pairs:
    """A micro-batch's preferences, as rows of its K*B samples."""
    chosen: torch.Tensor  # (B,) each prompt's chosen completion
    rejected: torch.Tensor  # (B,) and its rejected one
    kept: torch.Tensor  # (B,) bool: the pair goes into the loss
    scores: torch.Tensor | None  # (2B,) scores of the chosen, then of the rejected; None: a judge decided
    metrics: dict  # per-pair feedback metrics: pairs/ties, or judge/*
    logged: dict  # (B,) each for completions.jsonl: score_chosen and score_rejected, or p_chosen


def preferences(run: Rollout, prompts: list, samples: Samples, columns: dict) -> Pairs:
    """Stages 3-4 for the K*B samples of B prompts. Rewards: per prompt the best and the worst of its K samples
    (ties out of the loss with --drop_ties); a judge: the one of 2 it prefers (undecided and invalid judgements out of
    the loss). The one place that knows where preferences come from: add a new source here."""
    args, B = run.args, len(prompts)
    if run.judged:
        p, valid, kept, failed = judge(run, prompts, samples.texts[:B], samples.texts[B:])
        rows, first, p_chosen = torch.arange(B, device=run.device), p >= 0.5, torch.maximum(p, 1 - p)
        metrics = {"judge/p_chosen": p_chosen[kept], "judge/invalid": (~valid).float(),
                   "judge/undecided": (valid & ~kept).float()}
        if args.judge_api_base:
            metrics["judge/api_failures"] = failed.float()
        return Pairs(torch.where(first, rows, rows + B), torch.where(first, rows + B, rows), kept, None, metrics,
                     {"p_chosen": p_chosen})
    scores = score(run, prompts * args.num_samples, samples, columns)  # (K*B,)
    chosen, rejected, tie = pair(scores, args.num_samples, args.tie_threshold)
    kept = ~tie if args.drop_ties else torch.ones_like(tie)
    return Pairs(chosen, rejected, kept, scores[torch.cat([chosen, rejected])], {"pairs/ties": tie.float()},
                 {"score_chosen": scores[chosen], "score_rejected": scores[rejected]})


# ------------------------------------------------------------------------------
# Log-probs and loss


def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, impl: str = "fused"):
    """Per-token log p(completion token | prompt, earlier tokens), (N, T), 0 at padding. fused: no logits at all, the
    last hidden states folded with the lm_head weight tile by tile (kernels/); naive: float32 logits (the oracle)."""
    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([prompt_mask, completion_mask], 1)
    T = completion_ids.size(1)
    inner = getattr(model, "module", model)  # DDP wraps the model; FSDP2 shards it in place
    head, config = inner.get_output_embeddings(), inner.config
    plain_head = head.bias is None and getattr(config, "final_logit_softcapping", None) is None \
        and getattr(config, "logit_scale", None) in (None, 1.0)  # Gemma 2 and Cohere transform their logits
    if impl == "naive" or not plain_head:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False,
                       logits_to_keep=T + 1).logits
        return naive_token_logprobs(logits[:, :-1], completion_ids).masked_fill(completion_mask == 0, 0.0)
    no_logits = torch.empty(0, dtype=torch.long, device=ids.device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False,
                logits_to_keep=no_logits, output_hidden_states=True)
    hidden = out.hidden_states[-1][:, -T - 1 : -1]  # (N, T, H) after the final norm; position P-1+t predicts token t
    real = completion_mask.bool()
    # The head's weight is read after the forward: under FSDP2 the root keeps it gathered until backward.
    logps = linear_logprobs(hidden[real], head.weight, completion_ids[real])  # (real tokens,)
    return logps.new_zeros(completion_ids.shape).index_put((real,), logps)


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float, loss_type: str):
    """Per-pair loss (B,) from completion log-probs summed over tokens; h: how much more than the reference the policy
    prefers the chosen completion to the rejected one."""
    h = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "ipo":  # squared distance of h from 1 / (2 beta)
        return (h - 1 / (2 * beta)) ** 2
    return -F.logsigmoid(beta * h)  # sigmoid: the DPO loss


# ------------------------------------------------------------------------------
# Metrics


@torch.no_grad()
def step_metrics(logps, ref_logps, completion_mask, scores, chosen, rejected, has_eos, losses, beta) -> dict:
    """Per-sample values of every logged metric (TRL's names and formulas), logged as means since the last log.
    logps, ref_logps (2B, T), summed over real tokens (TRL also sums padding); chosen, rejected: rows of the pairs in
    the loss; scores None (a judge decided): no score metrics."""
    logp, ref_logp = (logps * completion_mask).sum(1), (ref_logps * completion_mask).sum(1)  # (2B,)
    kl = logp - ref_logp
    non_score_reward = -beta * kl
    reward_chosen = beta * (logp[chosen] - ref_logp[chosen])
    reward_rejected = beta * (logp[rejected] - ref_logp[rejected])
    scored = {} if scores is None else {
        "objective/rlhf_reward": scores + non_score_reward,
        "objective/scores": scores,
        "objective/scores_margin": scores[chosen] - scores[rejected],
    }
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
    """What a logged metric averages over: per metric the sum of its per-sample values and their count; the clock."""
    sums: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    start: float = field(default_factory=time.perf_counter)
    sampling: float = 0.0  # seconds in rollout()
    steps: int = 0

    def add(self, values: dict, counts: dict | None = None) -> None:  # per-sample tensors, or a window's sums, counts
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + (v if counts is not None else v.sum())
            self.counts[k] = self.counts.get(k, 0) + (counts[k] if counts is not None else v.numel())

    def means(self, **extra) -> dict:
        """Each metric's mean over all ranks' samples (one all_reduce: what one process would log for the global
        batch), then `extra` and the times."""
        elapsed, keys = time.perf_counter() - self.start, list(self.sums)
        means, tokens = {}, 0.0
        if keys:  # none when every step since the last log was skipped (NaN/inf); the same on every rank
            device = self.sums[keys[0]].device
            counts = torch.tensor([float(self.counts[k]) for k in keys], dtype=torch.float64, device=device)
            packed = torch.stack([torch.stack([self.sums[k].double() for k in keys]), counts])  # (2, metrics)
            if dist.is_initialized():
                dist.all_reduce(packed)
            total, count = packed.tolist()
            means = {k: s / c if c else math.nan for k, s, c in zip(keys, total, count)}
            tokens = dict(zip(keys, total)).get("completions/mean_length", 0)  # all ranks' completion tokens
        return means | extra | {"time/step": elapsed / self.steps, "time/sampling": self.sampling / self.steps,
                                "time/tokens_per_s": tokens / elapsed}


# ------------------------------------------------------------------------------
# Schedule and optimizer


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the peak learning rate before optimizer step `step` (0-based), as transformers' schedulers."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return 1.0


def make_optimizer(policy, args: Args, plan: "Plan"):
    """AdamW without weight decay on biases and norm weights; warmup, then the decay of --lr_scheduler_type."""
    decay = [p for p in policy.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in policy.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, fused=next(policy.parameters()).device.type == "cuda")
    return optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, plan.warmup, plan.total, args.lr_scheduler_type))


def optimizer_step(policy, optimizer, scheduler, max_grad_norm: float, loss_sum: torch.Tensor, stop: bool):
    """Clip, AdamW, schedule; a NaN/inf loss or gradient on any rank skips the step on all, but the schedule still
    advances (its data was used). The same all_reduce spreads a stop signal. -> grad norm, skipped, stop."""
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm or float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: a DTensor
    flags = torch.stack([~torch.isfinite(loss_sum) | ~torch.isfinite(grad_norm),
                         torch.tensor(stop, device=grad_norm.device)]).float()
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    skipped, stop = (bool(f) for f in flags.tolist())
    if not skipped:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped, stop


# ------------------------------------------------------------------------------
# main(): set up, then the training loop


def main(args: Args):
    """Train; returns the policy (sharded under FSDP2). Under torchrun every rank runs this; the process group
    stays up for the caller (the command line closes it)."""
    # 0. Check what can be checked before a model loads: flags, resume point, output_dir, data, reward functions.
    check_args(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    resume = resume_point(args, world)  # the checkpoint to continue from, or None
    check_output_dir(args)
    reward_funcs = [load_reward_func(spec) for spec in args.reward_funcs]
    dataset, test_set = load_prompts(args)
    tokenizer = load_tokenizer(resume or args.model_name_or_path, args.trust_remote_code)
    for path in args.reward_model_path:
        check_reward_model(path, args)
    reward_tokenizers = [load_tokenizer(path, args.trust_remote_code) for path in args.reward_model_path]
    check_prompts(args, dataset, tokenizer, reward_tokenizers, reward_funcs)
    judge_tokenizer = load_tokenizer(args.judge_model_path, args.trust_remote_code) if args.judge_model_path else None
    answer_ids = judge_answer_ids(judge_tokenizer) if judge_tokenizer else None
    plan = make_plan(args, len(dataset), world)
    B, GA, K = args.per_device_train_batch_size, args.gradient_accumulation_steps, args.num_samples

    # One process per device; rank 0 alone prints, writes files and talks to wandb (is_main()).
    rank, world, device = init_distributed(args)
    set_seed(args.seed)  # Python's, NumPy's and torch's streams: reward functions may draw too
    bf16 = args.bf16 if args.bf16 is not None else device.type == "cuda" and torch.cuda.is_bf16_supported()

    # 1. Models: the policy (a resumed run's from its checkpoint), the frozen reference, the reward models or judge.
    policy, train_model = load_policy(resume or args.model_name_or_path, args, device, world, bf16)
    frozen = dict(args=args, device=device, shard=world > 1 and args.shard_frozen_models, bf16=bf16)
    ref = load_frozen(AutoModelForCausalLM, args.ref_model_path or args.model_name_or_path, **frozen,
                      **json_dict(args.model_init_kwargs, "model_init_kwargs"))
    reward_models = [(load_frozen(AutoModelForSequenceClassification, path, **frozen, num_labels=1,
                                  pad_token_id=tok.pad_token_id), tok)  # it finds each row's end by the pad id
                     for path, tok in zip(args.reward_model_path, reward_tokenizers)]
    judge_model = load_frozen(AutoModelForCausalLM, args.judge_model_path, **frozen) if judge_tokenizer else None
    run = Rollout(args, tokenizer, rank, world, device, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16),
                  *sampling_settings(args, tokenizer, policy), reward_models, reward_funcs,
                  (judge_model, judge_tokenizer, answer_ids) if judge_model else None)
    say("preferences from: " + feedback_source(args))
    generator = torch.Generator(device).manual_seed(args.seed + rank)  # each rank samples its own completions
    optimizer, scheduler = make_optimizer(policy, args, plan)

    state = {"step": 0, "epoch": 0.0, "micro_batches_done": 0, "world_size": world, "nonfinite_steps": 0,
             "nonfinite_in_a_row": 0, "wandb_id": None}  # trainer_state.json
    window = Window()  # the metrics since the last log
    if resume:  # where the checkpoint left: optimizer, schedule, data position, random streams, metric sums
        state, window = load_checkpoint(resume, policy, optimizer, scheduler, generator, rank, device)
    start_output_dir(args, resume)
    log = Log(args, plan, state, resume is not None)
    eval_prompts, eval_columns = held_out(args, test_set, rank, world)
    reference = []  # the reference's answers to them, sampled once: it never changes
    data = micro_batches(dataset, args, plan, rank, world, state["micro_batches_done"])

    with stop_signals() as signals:  # SIGTERM (preemption), Ctrl-C: finish the step, save a checkpoint, exit
        for step in range(state["step"] + 1, plan.total + 1):
            beta = args.beta[min((step - 1) // plan.per_epoch, len(args.beta) - 1)]  # one per epoch, then the last
            micro = Window()  # this step's metrics; they join the window unless the step is skipped
            for micro_step in range(GA):
                batch = next(data)
                prompts = batch.pop(args.dataset_prompt_column)

                # 2. Sample K completions per prompt from the policy as it is now; rows [all 1st samples, ..., K-th].
                samples = rollout(run, policy, prompts * K, generator, window)

                # 3-4. Feedback and pairs: per prompt the best and the worst sample by reward, or the one the judge
                # prefers. The other dataset columns go to the reward functions.
                pairs = preferences(run, prompts, samples, {k: v * K for k, v in batch.items()})
                pick = torch.cat([pairs.chosen, pairs.rejected])  # (2B,) rows: chosen completions, then rejected

                # 5. Log-probs of the pairs' completions under the policy (with grad) and the reference, (2B, T).
                sync_gradients(train_model, micro_step == GA - 1)  # ranks average gradients in the last backward
                sampled = samples.rows(pick)
                with run.autocast:
                    logps = completion_logprobs(train_model, *sampled, args.logprob_impl)
                    with torch.no_grad():
                        ref_logps = completion_logprobs(ref, *sampled, args.logprob_impl)

                # 6. Loss: DPO or IPO per pair, averaged over the pairs kept (none kept: 0; every rank still runs
                # backward, so DDP and FSDP stay in step).
                logp, ref_logp = logps.sum(1), ref_logps.sum(1)  # (2B,)
                losses = dpo_loss(logp[:B], logp[B:], ref_logp[:B], ref_logp[B:], beta, args.loss_type)  # (B,)
                kept = pairs.kept
                (torch.where(kept, losses, 0.0).sum() / kept.sum().clamp(min=1) / GA).backward()
                in_loss = torch.arange(B, device=device)[kept]  # rows of the kept pairs' chosen; rejected: + B
                micro.add(step_metrics(logps.detach(), ref_logps, sampled[3], pairs.scores, in_loss, in_loss + B,
                                       samples.has_eos[pick], losses[kept], beta) | pairs.metrics)

            # 7. Optimizer step: clip, AdamW, schedule; skipped on every rank if the loss or gradient is NaN/inf on one.
            grad_norm, skipped, stopping = optimizer_step(policy, optimizer, scheduler, args.max_grad_norm,
                                                          micro.sums["loss"], bool(signals))
            count_skipped(state, skipped, step, args.max_nonfinite_steps)  # an error after too many in a row
            if not skipped:
                window.add(micro.sums, micro.counts)
            window.steps += 1
            log.bar.update(1)

            # 8. Log (means over all ranks since the last log), the completions, an evaluation, a checkpoint.
            if step % plan.log == 0 or step == plan.total:
                log.line(step, window.means(learning_rate=scheduler.get_last_lr()[0], grad_norm=float(grad_norm),
                                            epoch=step / plan.per_epoch, nonfinite_steps=state["nonfinite_steps"]))
                window = Window()
            if plan.completions and step % plan.completions == 0:
                log.pairs(step, prompts, samples.texts, pairs)  # the last micro-batch's
            if plan.eval and step % plan.eval == 0 and step < plan.total and eval_prompts:
                log.line(step, *evaluate(run, policy, ref, eval_prompts, eval_columns, reference))
            if (plan.save and step % plan.save == 0 and step < plan.total) or stopping:
                state |= {"step": step, "epoch": step / plan.per_epoch, "micro_batches_done": step * GA}
                mine = rank_state(generator, window)
                saved = save_checkpoint(policy, optimizer, scheduler, tokenizer, args, state, mine)
            if stopping:
                say(f"stopped by a signal after step {step}; saved {saved}: continue with "
                    "--resume_from_checkpoint latest")
                log.close()
                del train_model  # DDP's reducer goes now: freed at interpreter exit, it can deadlock with gloo
                raise SystemExit(128 + signal.SIGINT if signal.SIGINT in signals else 0)

    # 9. Save the policy where from_pretrained(output_dir) finds it.
    log.bar.close()
    save_model(policy, tokenizer, args, args.output_dir)
    say(f"saved the trained model to {args.output_dir}")

    # 10. Before / after: the reference and the trained policy answer the same held-out prompts, scored as in training.
    if eval_prompts:
        logs, records = evaluate(run, policy, ref, eval_prompts, eval_columns, reference)
        log.line(plan.total, logs, records)
        say(before_after(records))
    log.close()
    if args.push_to_hub and is_main():
        push_to_hub(args)
    return policy


# ==============================================================================
# Below: what a first reading can skip. Checks of the inputs, checkpoints and resume, the judges' mechanics,
# evaluation, logs and reports, the Hub, the command line.
# ==============================================================================


# ------------------------------------------------------------------------------
# Checks of the flags and of what they point at, before any model loads

GENERATION_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "do_sample", "suppress_tokens",
                   "eos_token_id")


def json_dict(text: str | None, flag: str) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--{flag} must be a JSON object such as '{{\"key\": 1}}', got {text!r} ({e})") from None
    if not isinstance(value, dict):
        raise UsageError(f"--{flag} must be a JSON object such as '{{\"key\": 1}}', got {text!r}")
    return value


# Lower bounds of numeric flags, (bound, comparison); a NaN passes none.
LOWER_BOUNDS = {
    "max_new_tokens": (1, ">="), "per_device_train_batch_size": (1, ">="), "gradient_accumulation_steps": (1, ">="),
    "num_samples": (2, ">="), "temperature": (0, ">"), "top_k": (0, ">="), "repetition_penalty": (0, ">"),
    "missing_eos_penalty": (0, ">="), "tie_threshold": (0, ">="), "judge_api_concurrency": (1, ">="),
    "judge_api_retries": (0, ">="), "judge_api_timeout": (0, ">"), "learning_rate": (0, ">="),
    "warmup_steps": (0, ">="), "logging_steps": (0, ">"), "save_steps": (0, ">="), "eval_steps": (0, ">="),
    "log_completions_steps": (0, ">="), "save_total_limit": (1, ">="), "max_nonfinite_steps": (1, ">="),
    "eval_prompts": (0, ">="),
}
LOWER_BOUND_HINTS = {"num_samples": " (a pair needs two completions)", "top_k": " (0 turns it off)",
                     "temperature": " (for greedy: --generation_kwargs '{\"do_sample\": false}')",
                     "missing_eos_penalty": " (it is subtracted)", "save_total_limit": " (or None to keep every one)",
                     "eval_prompts": " (0 skips the before/after comparison)"}


def check_args(args: Args) -> None:
    """Fail before anything is loaded. Fills in the default reward model."""
    judge = args.judge_model_path or args.judge_api_base
    if args.reward_model_path is None:
        args.reward_model_path = () if args.reward_funcs or judge else (QUICK_START_REWARD_MODEL,)
    n_rewards = len(args.reward_model_path) + len(args.reward_funcs)
    for flag, (bound, op) in LOWER_BOUNDS.items():
        value = getattr(args, flag)
        if value is not None and not (value > bound if op == ">" else value >= bound):
            raise UsageError(f"--{flag} must be {op} {bound}{LOWER_BOUND_HINTS.get(flag, '')}, got {value}")
    problems = [
        (args.loss_type not in ("sigmoid", "ipo"), f"--loss_type must be sigmoid or ipo, got {args.loss_type!r}"),
        (len(args.beta) == 0 or min(args.beta, default=0) <= 0,
         f"--beta needs one or more positive values, got {args.beta}"),
        (args.max_new_tokens >= args.max_length,
         f"--max_new_tokens ({args.max_new_tokens}) must be smaller than --max_length ({args.max_length}): "
         "prompts get max_length - max_new_tokens tokens; raise --max_length or lower --max_new_tokens"),
        (not 0 < args.top_p <= 1, f"--top_p must be in (0, 1], got {args.top_p}"),
        (args.min_p is not None and not 0 <= args.min_p <= 1, f"--min_p must be in [0, 1], got {args.min_p}"),
        (not 0 <= args.judge_undecided < 0.5, f"--judge_undecided must be in [0, 0.5), got {args.judge_undecided}"),
        (n_rewards == 0 and not judge, "no reward: give --reward_model_path and/or --reward_funcs, or a judge"),
        (judge and n_rewards > 0, "a judge and rewards both given: preferences come from one or the other; drop "
                                  "--judge_* or --reward_model_path/--reward_funcs"),
        (args.judge_model_path and args.judge_api_base, "--judge_model_path and --judge_api_base: give one judge"),
        (args.judge_api_base is not None and not args.judge_api_model, "--judge_api_base needs --judge_api_model"),
        (judge and args.num_samples != 2, f"a judge compares two completions: --num_samples must be 2 with it, got "
                                          f"{args.num_samples} (best-and-worst of K needs rewards)"),
        (judge and args.missing_eos_penalty is not None, "--missing_eos_penalty lowers reward scores; a judge gives "
                                                         "none: drop it (the judge sees unfinished answers)"),
        (args.reward_weights is not None and len(args.reward_weights) != n_rewards,
         f"--reward_weights has {len(args.reward_weights or ())} values but there are {n_rewards} rewards "
         f"({len(args.reward_model_path)} reward models + {len(args.reward_funcs)} reward functions)"),
        (args.max_steps <= 0 and args.num_train_epochs <= 0, "set --max_steps > 0 or --num_train_epochs > 0"),
        (args.resume_from_checkpoint is not None and args.overwrite_output_dir,
         "--resume_from_checkpoint continues a run and --overwrite_output_dir starts afresh: give one of them"),
        (os.path.isfile(args.output_dir), f"--output_dir {args.output_dir!r} is a file; give a directory"),
        (args.shard_frozen_models and args.distributed != "fsdp",
         "--shard_frozen_models shards with FSDP2: add --distributed fsdp, or drop the flag"),
    ]
    for bad, message in problems:
        if bad:
            raise UsageError(message)
    json_dict(args.model_init_kwargs, "model_init_kwargs")
    try:
        (args.judge_prompt or JUDGE_PROMPT).format(prompt="", response_a="", response_b="")
    except (KeyError, IndexError, ValueError) as e:
        raise UsageError(f"--judge_prompt may use {{prompt}}, {{response_a}} and {{response_b}} and no other braces "
                         f"(write {{{{ and }}}} for literal ones): {type(e).__name__}: {e}") from None
    if args.judge_prompt is not None and not all(f"{{{k}}}" in args.judge_prompt
                                                 for k in ("prompt", "response_a", "response_b")):
        raise UsageError("--judge_prompt must contain {prompt}, {response_a} and {response_b}")
    unknown = set(json_dict(args.generation_kwargs, "generation_kwargs")) - set(GENERATION_KEYS)
    if unknown:
        raise UsageError(f"--generation_kwargs: unsupported keys {sorted(unknown)}; supported: "
                         f"{', '.join(GENERATION_KEYS)}")
    if args.push_to_hub:
        import huggingface_hub

        if huggingface_hub.get_token() is None:
            raise UsageError("--push_to_hub needs a Hub token: run `hf auth login` or set HF_TOKEN")


def check_output_dir(args: Args) -> None:
    try:  # every rank: on several nodes each has its own disk
        os.makedirs(args.output_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=args.output_dir).close()
    except OSError as e:
        raise UsageError(f"--output_dir {args.output_dir!r} is not writable ({e.strerror}); give a directory you can "
                         "write to") from None


def load_reward_func(spec: str) -> Callable:
    """`module:function` (importable from the working directory) or `path/to/file.py:function`."""
    module_name, _, func_name = spec.rpartition(":")
    if not module_name or not func_name:
        raise UsageError(f"--reward_funcs {spec!r}: expected `module:function` or `file.py:function`")
    try:
        if module_name.endswith(".py"):
            loader = importlib.util.spec_from_file_location(os.path.basename(module_name)[:-3], module_name)
            if loader is None or not os.path.isfile(module_name):
                raise FileNotFoundError(module_name)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except Exception as e:
        raise UsageError(f"--reward_funcs {spec!r}: cannot import {module_name!r} ({type(e).__name__}: {e})") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise UsageError(f"--reward_funcs {spec!r}: {module_name!r} has no function {func_name!r}")
    return func


def reward_column(out, func, n: int, device: torch.device) -> torch.Tensor:
    """A reward function's return value as (n,) scores, None as NaN; anything else is refused, naming the function."""
    name = getattr(func, "__name__", repr(func))
    if not isinstance(out, (list, tuple)) or len(out) != n:
        raise UsageError(f"reward function {name} must return a list of {n} numbers (one per completion), "
                         f"got {type(out).__name__} of length {len(out) if hasattr(out, '__len__') else '?'}")
    try:
        return torch.tensor([math.nan if r is None else float(r) for r in out], device=device)
    except (TypeError, ValueError):
        raise UsageError(f"reward function {name} returned something that is not a number or None: "
                         f"{out[:4]}...") from None


def load_prompts(args: Args):
    """Train and held-out prompts (None without a test split): from the Hub, a save_to_disk directory, a directory of
    split files (train.jsonl, test.jsonl) or one data file."""
    name, train_split, test_split = args.dataset_name, args.dataset_train_split, args.dataset_test_split
    ext = os.path.splitext(name)[1].lower()
    builders = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
    if os.path.isfile(name) and ext in builders:
        if os.path.getsize(name) == 0:  # datasets fails on it with a bare StopIteration
            raise UsageError(f"--dataset_name {name!r} is an empty file; give a file with one prompt per row")
        splits = {train_split: datasets.load_dataset(builders[ext], data_files=name, split="train")}
    elif os.path.isdir(name) and {"dataset_dict.json", "state.json"} & set(os.listdir(name)):
        try:
            splits = datasets.load_from_disk(name)
        except (IndexError, OSError, ValueError) as e:  # a dataset saved with no rows at all fails with IndexError
            raise UsageError(f"--dataset_name {name!r}: datasets could not read this saved dataset "
                             f"({type(e).__name__}: {e}); check that it holds prompts") from None
        splits = splits if isinstance(splits, datasets.DatasetDict) else {train_split: splits}
    else:
        try:
            splits = datasets.load_dataset(name, args.dataset_config)
        except (OSError, ValueError) as e:
            raise UsageError(f"--dataset_name {name!r}: could not load it ({type(e).__name__}: {e}). Give a Hub "
                             "dataset you can reach, a local directory or a .jsonl/.parquet file; "
                             f"{OFFLINE_HINT}") from None
    if train_split not in splits:
        raise UsageError(f"--dataset_train_split {train_split!r} is not a split of {name!r}; splits: {list(splits)}")
    train, test = splits[train_split], splits.get(test_split) if test_split != train_split else None
    for ds in (train, test) if test is not None else (train,):
        if args.dataset_prompt_column not in ds.column_names:
            close = difflib.get_close_matches(args.dataset_prompt_column, ds.column_names, n=1)
            raise UsageError(f"--dataset_prompt_column {args.dataset_prompt_column!r} is not a column of {name!r}; "
                             f"columns: {ds.column_names}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    if len(train) == 0:
        raise UsageError(f"--dataset_name {name!r}: the {train_split!r} split is empty")
    return train, test


def unreachable(what: str, path: str, error: OSError) -> UsageError:
    return UsageError(f"could not load {what} {path!r} ({error}). Give a Hub id you can reach or a local directory; "
                      f"{OFFLINE_HINT}")


def check_reward_model(path: str, args: Args) -> None:
    """From its config: a sequence classifier with one output (a causal LM would get a random score head, silently)."""
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as e:  # ValueError: a directory without a model config
        raise unreachable("model", path, e) from None
    kinds = config.architectures or []
    if kinds and not any(k.endswith("ForSequenceClassification") for k in kinds):
        raise UsageError(f"--reward_model_path {path!r} is a {kinds[0]}, not a reward model: loaded as one it would "
                         "score with a randomly initialised head. Give a sequence-classification model with one output")
    if config.num_labels != 1:
        raise UsageError(f"--reward_model_path {path!r} has a head with {config.num_labels} outputs; a reward model "
                         "gives one score per text (num_labels = 1)")


def check_prompts(args: Args, dataset, tokenizer, reward_tokenizers: list, reward_funcs: list, n: int = 512) -> None:
    """The first n prompts, before the models load: chat templates for conversations, prompt lengths, and a trial
    call of every reward function on placeholder completions."""
    columns = dataset[: min(n, len(dataset))]
    prompts = columns.pop(args.dataset_prompt_column)
    chat = is_conversational(prompts[0])
    for path, reward_tokenizer in zip(args.reward_model_path, reward_tokenizers):
        if chat and reward_tokenizer.chat_template is None:
            raise UsageError(f"the prompts are conversations but the tokenizer of reward model {path!r} has no chat "
                             "template to lay them out with; use a reward model trained on chat data, or text prompts")
    try:
        lengths = [len(ids) for ids in prompt_token_ids(tokenizer, prompts)]
    except UsageError as e:
        raise UsageError(f"--dataset_name {args.dataset_name!r} with the tokenizer of {args.model_name_or_path!r}: "
                         f"{e}") from None
    limit = args.max_length - args.max_new_tokens
    if min(lengths) > limit:
        raise UsageError(f"all {len(lengths)} prompts checked are longer than --max_length - --max_new_tokens = "
                         f"{limit} tokens (the shortest has {min(lengths)}), so every one would lose its beginning: "
                         "raise --max_length")
    cut = sum(length > limit for length in lengths)
    if cut:
        say(f"note: {cut} of the first {len(lengths)} prompts are longer than {limit} tokens and lose their beginning")
    texts = ["A placeholder answer."] * min(2, len(prompts))
    completions = [[{"role": "assistant", "content": t}] for t in texts] if chat else texts
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for func in reward_funcs:
        try:
            score_completions(prompts[:2], completions, ids, {k: v[:2] for k, v in columns.items()}, [], [func],
                              torch.ones(1))
        except UsageError:
            raise
        except Exception as e:
            raise UsageError(f"reward function {getattr(func, '__name__', func)} fails on a trial call (2 dataset "
                             f"prompts, placeholder completions): {type(e).__name__}: {e}") from None


@dataclass
class Plan:
    """Steps per epoch, in all, of warmup; every how many steps to log, save, evaluate, write completions (0: never)."""
    per_epoch: int
    total: int
    warmup: int
    log: int
    save: int
    eval: int
    completions: int


def make_plan(args: Args, n_prompts: int, world: int) -> Plan:
    B, GA = args.per_device_train_batch_size, args.gradient_accumulation_steps
    per_epoch = n_prompts // (B * GA * world)
    if per_epoch == 0:
        raise UsageError(f"the dataset has {n_prompts} prompts but one optimizer step needs per_device_train_batch_size"
                         f" x gradient_accumulation_steps x processes = {B} x {GA} x {world} = {B * GA * world}; "
                         "lower them")
    total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * per_epoch)
    steps = [steps_of(v, total) for v in (args.warmup_steps, args.logging_steps, args.save_steps, args.eval_steps,
                                          args.log_completions_steps)]
    return Plan(per_epoch, total, steps[0], max(1, steps[1]), *steps[2:])


def steps_of(value: float, total: int) -> int:
    """TrainingArguments' convention: a value < 1 is a fraction of all steps."""
    return math.ceil(value * total) if 0 < value < 1 else int(value)


def sampling_settings(args: Args, tokenizer, policy) -> tuple[dict, list[int]]:
    """sample()'s keyword arguments: the flags, --generation_kwargs over them; and the stop ids (its eos_token_id)."""
    generation = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
                  "repetition_penalty": args.repetition_penalty, "do_sample": True, "suppress_tokens": None}
    generation |= json_dict(args.generation_kwargs, "generation_kwargs")
    eos = generation.pop("eos_token_id", None)
    stop_ids = stop_token_ids(tokenizer, policy) if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return generation, stop_ids


def stop_token_ids(tokenizer, model) -> list[int]:
    """The tokenizer's EOS plus the model's generation-config EOS ids (end-of-turn tokens of chat models)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


def count_skipped(state: dict, skipped: bool, step: int, limit: int) -> None:
    """trainer_state.json's counters of steps skipped for a NaN/inf loss or gradient; too many in a row: an error."""
    state["nonfinite_steps"] += skipped
    state["nonfinite_in_a_row"] = state["nonfinite_in_a_row"] + 1 if skipped else 0
    if state["nonfinite_in_a_row"] >= limit:
        raise TrainingError(f"the loss or gradient was NaN/inf in {state['nonfinite_in_a_row']} steps in a row (up "
                            f"to step {step}); each was skipped, so no weights changed. Lower --learning_rate or check "
                            "the rewards and data, then resume from the last checkpoint")


# ------------------------------------------------------------------------------
# Checkpoints, resume, the final save

# Args that change neither which completions are drawn nor which update is made: a resumed run may change them.
RESUMABLE_CHANGES = {"preset", "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "logging_steps",
                     "save_steps", "save_total_limit", "max_nonfinite_steps", "eval_prompts", "report_to", "run_name",
                     "push_to_hub", "hub_model_id", "bf16", "gradient_checkpointing", "distributed",
                     "shard_frozen_models", "logprob_impl", "eval_steps", "log_completions_steps", "judge_api_key_env",
                     "judge_api_concurrency", "judge_api_timeout", "judge_api_retries"}


def resume_point(args: Args, world: int) -> str | None:
    """The checkpoint to continue from (None: a fresh run), checked against this run before anything loads."""
    latest = os.path.join(args.output_dir, "latest")
    path = args.resume_from_checkpoint
    if path is None:
        if os.path.isfile(latest) and not args.overwrite_output_dir:
            with open(latest) as f:
                raise UsageError(f"--output_dir {args.output_dir!r} holds checkpoints of an earlier run (latest: "
                                 f"{f.read().strip()}): add --resume_from_checkpoint latest to continue it, or "
                                 "--overwrite_output_dir to delete them and start afresh")
        return None
    if path == "latest":
        if not os.path.isfile(latest):
            raise UsageError(f"--resume_from_checkpoint latest: {args.output_dir!r} has no checkpoint yet (no `latest` "
                             "file); give a checkpoint directory, or start without the flag")
        with open(latest) as f:
            path = os.path.join(args.output_dir, f.read().strip())
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        what = "not a checkpoint of online_dpo.py (no trainer_state.json)" if os.path.isdir(path) else \
            "no such directory"
        raise UsageError(f"--resume_from_checkpoint {path!r}: {what}; give output_dir/checkpoint-N, or `latest`")
    with open(os.path.join(path, "online_dpo_args.json")) as f:
        saved = json.load(f)
    with open(os.path.join(path, "trainer_state.json")) as f:
        saved_world = json.load(f)["world_size"]
    now = json.loads(json.dumps(asdict(args)))
    differ = [f"--{k} is {saved.get(k)!r} there and {v!r} here" for k, v in now.items()
              if k not in RESUMABLE_CHANGES and saved.get(k) != v]
    if saved_world != world:  # the data order and the random streams are per rank
        differ.append(f"it ran on {saved_world} processes and this run has {world}")
    if differ:
        raise UsageError(f"--resume_from_checkpoint {path!r} belongs to another run: {'; '.join(differ)}. Resume with "
                         "the same values, or start a new run without --resume_from_checkpoint")
    return path


def start_output_dir(args: Args, resume: str | None) -> None:
    """Resumed: `latest` points back at the checkpoint (later ones may be written again). --overwrite_output_dir:
    old checkpoints go, `latest` first, so that it never names a deleted one."""
    if not is_main():
        return
    if resume:
        replace_file(os.path.join(args.output_dir, "latest"), os.path.basename(os.path.normpath(resume)))
    elif args.overwrite_output_dir:
        remove(os.path.join(args.output_dir, "latest"))
        for name in os.listdir(args.output_dir):
            if re.fullmatch(r"checkpoint-\d+(\.tmp)?", name):
                remove(os.path.join(args.output_dir, name))


def gather_lists(items: list) -> list:
    """Each rank's list, concatenated in rank order (on every rank)."""
    if not dist.is_initialized():
        return items
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def rank_state(generator: torch.Generator, window: Window) -> dict:
    """What this rank alone knows: its random streams and its metric sums since the last log."""
    python, (name, keys, pos, has_gauss, gauss), cpu = global_streams()
    return {"python": python, "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "torch": cpu, "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
            "sampling": generator.get_state(), "sums": {k: v.cpu() for k, v in window.sums.items()},
            "counts": dict(window.counts)}


def save_checkpoint(policy, optimizer, scheduler, tokenizer, args: Args, trainer_state: dict, mine: dict) -> str:
    """output_dir/checkpoint-{step}: the policy (save_pretrained layout), tokenizer, Args, optimizer.pt (whole tensors
    by parameter name, whatever the sharding), rank_states.pt, trainer_state.json; complete before it takes its name,
    then `latest` names it, then save_total_limit prunes. Every rank calls it; rank 0 writes."""
    state_dict = full_state_dict(policy)
    if is_main() or isinstance(policy, FSDPModule):  # FSDP2: a collective; DDP: the other ranks' copies are the same
        optimizer_state = get_optimizer_state_dict(policy, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                               cpu_offload=True))
    ranks = gather_lists([mine])
    step = trainer_state["step"]
    name = f"checkpoint-{step}"
    if not is_main():
        return name
    with written_in_place(os.path.join(args.output_dir, name)) as tmp:
        write_model(policy, state_dict, tokenizer, args, tmp)
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict()},
                   os.path.join(tmp, "optimizer.pt"))
        torch.save(ranks, os.path.join(tmp, "rank_states.pt"))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(trainer_state, f, indent=2)
    replace_file(os.path.join(args.output_dir, "latest"), name)
    if args.save_total_limit:
        steps = sorted(int(d[11:]) for d in os.listdir(args.output_dir) if re.fullmatch(r"checkpoint-\d+", d))
        for old in steps[: -args.save_total_limit]:
            if old != step:
                remove(os.path.join(args.output_dir, f"checkpoint-{old}"))
    return name


def load_checkpoint(path: str, policy, optimizer, scheduler, generator, rank: int, device) -> tuple[dict, Window]:
    """Optimizer, schedule and this rank's random streams set in place. -> trainer state, this rank's metric window
    (its clock starts afresh: time/* measure the resumed run)."""
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    saved = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True, mmap=True)
    set_optimizer_state_dict(policy, optimizer, saved["optimizer"], options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(saved["scheduler"])
    mine = torch.load(os.path.join(path, "rank_states.pt"), weights_only=True)[rank]
    name, keys, pos, has_gauss, gauss = mine["numpy"]
    set_global_streams((mine["python"], (name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss), mine["torch"]))
    if mine["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"])
    generator.set_state(mine["sampling"])
    say(f"resuming from {path} at step {state['step']}")
    return state, Window({k: v.to(device) for k, v in mine["sums"].items()}, mine["counts"])


def write_model(model, state_dict: dict | None, tokenizer, args: Args, directory: str) -> None:
    """save_pretrained layout (safetensors) plus the tokenizer and the Args. Refuses NaN/inf weights."""
    tensors = state_dict if state_dict is not None else model.state_dict()
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise TrainingError(f"refusing to save weights with NaN/inf ({', '.join(bad[:3])}...); the last checkpoint "
                            "is untouched: resume from it with a lower --learning_rate")
    model.save_pretrained(directory, state_dict=state_dict)
    tokenizer.save_pretrained(directory)
    with open(os.path.join(directory, "online_dpo_args.json"), "w") as f:
        json.dump(asdict(args), f, indent=2)


def full_state_dict(model) -> dict | None:
    """FSDP2: rank 0 gets the whole state dict in CPU memory, every rank sending its shards. Else None."""
    if isinstance(model, FSDPModule):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return None


def save_model(model, tokenizer, args: Args, path: str) -> None:
    """The final model: its files move into `path` (which holds checkpoints and logs too) once all are written."""
    state_dict = full_state_dict(model)
    if is_main():
        with written_in_place(path, merge=True) as tmp:
            write_model(model, state_dict, tokenizer, args, tmp)


@contextlib.contextmanager
def written_in_place(path: str, merge: bool = False):
    """Write a file or directory at the yielded temporary path; when the block ends it is on disk and takes `path`'s
    place in one rename (merge: its files move into the directory `path`), so the old or the new is there, never a
    part. A block that fails leaves nothing behind."""
    tmp = path.rstrip("/") + ".tmp"
    remove(tmp)  # left by a crash
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        remove(tmp)
        raise
    if merge:
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
        os.rmdir(tmp)
    else:
        if os.path.isdir(path):  # a step saved again after resuming from an earlier one; `latest` names another
            remove(path)
        os.replace(tmp, path)


def replace_file(path: str, text: str) -> None:
    with written_in_place(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def fsync_tree(path: str) -> None:
    """A file, or a directory and every file in it, on disk (before the rename that publishes it)."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def open_log(path: str, keep_to_step: int | None):
    """A .jsonl log to append to: empty for a fresh run (None), else its lines up to the step (a torn line goes)."""
    kept = []
    if keep_to_step is not None and os.path.exists(path):
        with open(path) as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    if json.loads(line)["step"] <= keep_to_step:
                        kept.append(line)
    replace_file(path, "".join(kept))
    return open(path, "a")


@contextlib.contextmanager
def stop_signals():
    """Yields a list that SIGTERM (preemption) or Ctrl-C appends to; the loop checks it after each step, saves and
    exits. A second signal kills at once."""
    got = []

    def on_signal(signum, frame):
        if got:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        got.append(signum)

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield got
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------------------
# Sampling filters


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float | None = None) -> torch.Tensor:
    """Set the logits of tokens outside top_k / top_p / min_p to -inf, in that order (as transformers does)."""
    if top_k > 0 and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        mass_before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)
        drop_sorted = mass_before >= top_p  # the token that crosses top_p is kept, so at least one survives
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    if min_p is not None and min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


# ------------------------------------------------------------------------------
# The judges: their question, asked locally (P(A) against P(B), one forward) or over HTTP

JUDGE_PROMPT = ("Which of the two responses below answers the request better: more helpful, accurate and harmless?\n\n"
                "Request:\n{prompt}\n\nResponse A:\n{response_a}\n\nResponse B:\n{response_b}\n\n"
                "Answer with one letter, A or B.")


def as_text(x) -> str:  # a prompt or completion as the judge reads it: messages as `role: content` lines
    return "\n".join(f"{m['role']}: {m['content']}" for m in x) if is_conversational(x) else x


def judge_texts(template: str, prompts: list, first: list, second: list) -> list[str]:
    """Each pair twice, to cancel the judge's position bias: (first as A, second as B) for every pair, then swapped."""
    fill = [dict(prompt=as_text(p), response_a=as_text(a), response_b=as_text(b))
            for p, a, b in zip(prompts, first, second)]
    swapped = [f | dict(response_a=f["response_b"], response_b=f["response_a"]) for f in fill]
    return [template.format(**f) for f in fill + swapped]


def judge_answer_ids(tokenizer) -> list[int]:
    """The tokens "A" and "B" as the judge's answer starts: right after the chat template's assistant header, or
    after "Answer:" (with a space) for a judge without a chat template."""
    lead = "" if tokenizer.chat_template is not None else " "
    ids = [tokenizer.encode(lead + letter, add_special_tokens=False)[-1] for letter in "AB"]
    if ids[0] == ids[1]:
        raise UsageError("the judge's tokenizer gives the same token for A and B; use another --judge_model_path")
    return ids


@torch.no_grad()
def judge_locally(model, tokenizer, texts: list[str], answer_ids: list[int], batch_size: int):
    """One forward per question, no generation. -> q = P(A) / (P(A) + P(B)) and mass = P(A) + P(B), (M,) each."""
    chat = tokenizer.chat_template is not None
    if chat:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                               add_generation_prompt=True) for t in texts]
    else:
        texts = [t + "\nAnswer:" for t in texts]
    q, mass = [], []
    device = next(model.parameters()).device
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, padding_side="left",
                          add_special_tokens=not chat).to(device)
        logits = model(**batch, position_ids=positions(batch["attention_mask"]), use_cache=False,
                       logits_to_keep=1).logits[:, -1].float()
        p = logits.softmax(-1)[:, answer_ids]  # (b, 2)
        q.append(p[:, 0] / p.sum(1).clamp(min=1e-30))
        mass.append(p.sum(1))
    return torch.cat(q), torch.cat(mass)


def judge_over_http(texts: list[str], args: Args):
    """The questions to an OpenAI-compatible chat-completions endpoint, temperature 0, many in flight. An answer that
    is not exactly A or B, or a request that failed its retries, is invalid, never guessed. -> q, mass, failed (M,)."""
    url = args.judge_api_base.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json"}
    if os.environ.get(args.judge_api_key_env):
        headers["Authorization"] = f"Bearer {os.environ[args.judge_api_key_env]}"

    def ask(text: str) -> str | None:
        body = json.dumps({"model": args.judge_api_model, "messages": [{"role": "user", "content": text}],
                           "temperature": 0, "max_tokens": 4}).encode()
        for attempt in range(args.judge_api_retries + 1):
            if attempt:
                time.sleep(min(0.25 * 2 ** attempt, 8.0) * (0.5 + random.random()))  # backoff with jitter
            try:
                request = urllib.request.Request(url, data=body, headers=headers)
                with urllib.request.urlopen(request, timeout=args.judge_api_timeout) as response:
                    return str(json.load(response)["choices"][0]["message"]["content"])
            except urllib.error.HTTPError as e:
                if e.code not in (408, 429) and e.code < 500:  # the request itself is wrong: retrying will not help
                    return None
            except (OSError, ValueError, KeyError, IndexError, TypeError):  # timeout, connection, malformed body
                pass
        return None

    with concurrent.futures.ThreadPoolExecutor(args.judge_api_concurrency) as pool:
        answers = list(pool.map(ask, texts))
    letters = [m.group(1) if a is not None and (m := re.fullmatch(r"\s*([AB])\s*", a)) else None for a in answers]
    q = torch.tensor([1.0 if x == "A" else 0.0 for x in letters])
    mass = torch.tensor([0.0 if x is None else 1.0 for x in letters])
    return q, mass, torch.tensor([a is None for a in answers])


# ------------------------------------------------------------------------------
# Evaluation: the policy against the reference on held-out prompts


def held_out(args: Args, test_set, rank: int, world: int) -> tuple[list, dict]:
    """This rank's equal share of the first --eval_prompts held-out prompts, and their other columns."""
    n = min(args.eval_prompts, len(test_set) if test_set is not None else 0) // world * world
    if args.eval_prompts and n == 0:
        say(f"no policy/reference comparison: {args.dataset_name!r} has no {args.dataset_test_split!r} split with at "
            f"least {world} prompts")
    columns = test_set[rank * n // world : (rank + 1) * n // world] if n else {}
    return columns.pop(args.dataset_prompt_column, []), columns


def global_streams() -> tuple:
    """Python's, NumPy's and torch's global random states (reward functions may draw from them)."""
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def set_global_streams(streams: tuple) -> None:
    random.setstate(streams[0])
    np.random.set_state(streams[1])
    torch.set_rng_state(streams[2])


def answers(run: Rollout, model, prompts: list, columns: dict, seed: int) -> tuple[list[str], torch.Tensor]:
    """`model`'s answers, 2B prompts at a time, scored as in training (NaN with a judge). -> texts, scores (N,)."""
    texts, scores, generator = [], [], torch.Generator(run.device).manual_seed(seed)
    for i in range(0, len(prompts), 2 * run.args.per_device_train_batch_size):
        chunk = slice(i, i + 2 * run.args.per_device_train_batch_size)
        samples = rollout(run, model, prompts[chunk], generator)
        texts += samples.texts
        if run.judged:
            scores += [math.nan] * len(samples.texts)
        else:
            scores += score(run, prompts[chunk], samples, {k: v[chunk] for k, v in columns.items()}).tolist()
    return texts, torch.tensor(scores, dtype=torch.float64)


def evaluate(run: Rollout, policy, ref, prompts: list, columns: dict, reference: list):
    """Policy and reference answer this rank's held-out prompts from their own random streams (the reference once,
    into `reference`). A win counts 1, a tie or undecided judgement 1/2, an invalid one not at all. The global random
    streams stay as they were. -> logs, records (a dict per prompt, all ranks')."""
    streams, seed = global_streams(), run.args.seed + 1 + run.rank
    if not reference:
        reference.extend(answers(run, ref, prompts, columns, seed))
    (ref_texts, ref_scores), (texts, scores) = reference, answers(run, policy, prompts, columns, seed + run.world)
    if run.judged:
        p, counted, decided, _ = (t.cpu() for t in judge(run, prompts, texts, ref_texts))
        wins = torch.where(decided, (p > 0.5).double(), 0.5)
    else:
        wins = (scores > ref_scores).double() + 0.5 * (scores == ref_scores).double()
        counted = ~(scores.isnan() | ref_scores.isnan())
    set_global_streams(streams)
    records = gather_lists([{"prompt": pr[-1]["content"] if is_conversational(pr) else pr,  # the question asked
                          "reference": rt, "reference_reward": float(rs), "trained": t, "trained_reward": float(s),
                          "win": float(w) if c else math.nan}
                         for pr, rt, rs, t, s, w, c in zip(prompts, ref_texts, ref_scores, texts, scores, wins,
                                                           counted)])
    won = [r["win"] for r in records if not math.isnan(r["win"])]
    logs = {"eval/win_rate": sum(won) / len(won) if won else math.nan, "eval/judged": len(won) / len(records)}
    if not run.judged:
        logs |= {"eval/reward_reference": float(np.nanmean([r["reference_reward"] for r in records])),
                 "eval/reward_trained": float(np.nanmean([r["trained_reward"] for r in records]))}
    return logs, records


# ------------------------------------------------------------------------------
# Logs and reports, the Hub, the command line


class Log:
    """Rank 0's record: a printed line per log step and metrics.jsonl, a micro-batch's pairs in completions.jsonl,
    the same in wandb. On the other ranks it records nothing."""

    def __init__(self, args: Args, plan: Plan, state: dict, resumed: bool):
        self.on, self.total, self.wandb = is_main(), plan.total, None
        keep = state["step"] if resumed else None
        self.metrics = open_log(os.path.join(args.output_dir, "metrics.jsonl"), keep) if self.on else None
        self.completions = None
        if self.on and plan.completions:
            self.completions = open_log(os.path.join(args.output_dir, "completions.jsonl"), keep)
        if self.on and args.report_to == "wandb":
            import wandb

            run = wandb.init(project=os.environ.get("WANDB_PROJECT", "online-dpo"), name=args.run_name,
                             config=asdict(args), id=state["wandb_id"], resume="allow" if state["wandb_id"] else None)
            state["wandb_id"], self.wandb = run.id, wandb
        self.bar = tqdm(total=plan.total, initial=state["step"], desc="online-dpo", dynamic_ncols=True,
                        disable=not self.on)

    def line(self, step: int, logs: dict, records: list[dict] | None = None) -> None:
        """A step's metrics (an evaluation's records: the wandb table eval/completions)."""
        if not self.on:
            return
        self.bar.write(f"step {step}/{self.total} " + " ".join(f"{k}={v:.4g}" for k, v in logs.items()))
        self.metrics.write(json.dumps({"step": step, **logs}) + "\n")
        self.metrics.flush()
        if self.wandb:
            self.wandb.log(logs | ({"eval/completions": self.table(records)} if records else {}), step=step)

    def pairs(self, step: int, prompts: list, texts: list[str], pairs: Pairs) -> None:
        """A micro-batch's pairs: prompt, chosen, rejected, their scores or the judge's p_chosen, in_loss."""
        if not self.on:
            return
        records = [{"step": step, "prompt": as_text(prompts[i]), "chosen": texts[pairs.chosen[i]],
                    "rejected": texts[pairs.rejected[i]], "in_loss": bool(pairs.kept[i])}
                   | {k: float(v[i]) for k, v in pairs.logged.items()} for i in range(len(prompts))]
        self.completions.write("".join(json.dumps(r) + "\n" for r in records))
        self.completions.flush()
        if self.wandb:
            self.wandb.log({"completions": self.table(records)}, step=step)

    def table(self, records: list[dict]):
        return self.wandb.Table(columns=list(records[0]), data=[list(r.values()) for r in records])

    def close(self) -> None:
        self.bar.close()
        for file in (self.metrics, self.completions):
            if file is not None:
                file.close()
        if self.wandb:
            self.wandb.finish()


def feedback_source(args: Args) -> str:
    if args.judge_model_path:
        return f"the judge {args.judge_model_path} (P(A) against P(B), both orders)"
    if args.judge_api_base:
        return f"the judge {args.judge_api_model} at {args.judge_api_base} (A or B, both orders)"
    rewards = " + ".join([*args.reward_model_path, *args.reward_funcs])
    return f"the best and the worst of {args.num_samples} samples by {rewards}"


def before_after(records: list[dict], show: int = 4, width: int = 100) -> str:
    """Some held-out prompts with both answers, both mean rewards with the standard error of their difference, the
    win rate."""
    def cut(text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= width else text[: width - 3] + "..."

    def tag(score: float) -> str:
        return "" if math.isnan(score) else f"({score:+.2f})  "

    rewarded = not math.isnan(records[0]["reference_reward"])
    lines = ["before (reference) / after (trained) on held-out prompts" + (", reward in brackets:" if rewarded
                                                                          else ":")]
    for i, r in enumerate(records[:show]):
        lines += [f"[{i + 1}] {cut(r['prompt'])}", f"    reference {tag(r['reference_reward'])}{cut(r['reference'])}",
                  f"    trained   {tag(r['trained_reward'])}{cut(r['trained'])}"]
    a, b = (torch.tensor([r[k] for r in records if not math.isnan(r[k])], dtype=torch.float64)
            for k in ("reference_reward", "trained_reward"))
    if len(a):  # two independent samples: the variances add
        stderr = math.sqrt(a.var() / len(a) + b.var() / len(b)) if min(len(a), len(b)) > 1 else math.nan
        lines.append(f"mean reward over {len(records)} held-out prompts: reference {a.mean():+.3f}, trained "
                     f"{b.mean():+.3f} (difference {b.mean() - a.mean():+.3f} +- {stderr:.3f} standard error)")
    won = [r["win"] for r in records if not math.isnan(r["win"])]
    if won:
        lines.append(f"win rate of the trained policy over the reference: {sum(won) / len(won):.3f} on {len(won)} "
                     f"prompts (a tie counts 1/2)")
    return "\n".join(lines)


def push_to_hub(args: Args) -> None:
    from huggingface_hub import HfApi

    repo = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    api.upload_folder(folder_path=args.output_dir, repo_id=repo, ignore_patterns=["checkpoint-*", "latest"])
    print(f"pushed to https://huggingface.co/{repo}")


def cli(argv: list[str] | None = None) -> Args:
    """Parse flags; a --preset supplies the defaults that the other flags override (and that --help shows)."""
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


if __name__ == "__main__":
    try:
        main(cli())
    except (UsageError, TrainingError) as e:  # under torchrun every rank says it; the first to exit stops the others
        sys.exit(f"online_dpo.py: error{' (rank ' + os.environ['RANK'] + ')' if 'RANK' in os.environ else ''}: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
