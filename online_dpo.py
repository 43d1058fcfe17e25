"""Online DPO in one file: Online AI Feedback (Guo et al. 2024, arXiv 2402.04792).

Each step, for every prompt of the batch: sample K (2) completions from the *current* policy -> reward models and/or
functions score them, or an LLM judge compares them -> the better is "chosen", the worse "rejected" -> DPO (sigmoid)
or IPO loss against a frozen reference model.

    python online_dpo.py --preset tiny               # the embedded offline world (later flags override it)
    torchrun --nproc_per_node 8 online_dpo.py --beta 0.1    # one process per GPU: DDP, or --distributed fsdp to shard

Flags are spelled as in TRL's OnlineDPOConfig and TrainingArguments. Read main() first: its loop is one step in
numbered stages; above it, what a step uses, in order; below, what a first reading can skip.
"""

import collections
import concurrent.futures
import contextlib
import difflib
import importlib
import json
import math
import os
import random
import re
import runpy
import shutil
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
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          MinPLogitsWarper, StaticCache, TopKLogitsWarper, TopPLogitsWarper, get_scheduler, set_seed)
from tyro.constructors import PrimitiveConstructorSpec

from kernels import linear_logprobs, naive_token_logprobs

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
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: the DPO loss; ipo: the IPO loss"""
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
    """leave out of the loss (and count) prompts whose best and worst tie (differ by TIE_THRESHOLD at most)"""
    judge_model_path: str | None = None
    """AI feedback: a causal LM judges which completion is better"""
    judge_prompt: str | None = None
    """the judge's instruction with {prompt}, {response_a}, {response_b}; None: JUDGE_PROMPT"""
    judge_api_base: str | None = None
    """the judge over an OpenAI-compatible API, e.g. http://localhost:8000/v1 (vLLM)"""
    judge_api_model: str | None = None
    """model name for --judge_api_base"""
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
    report_to: Literal["none", "wandb"] = "none"
    """also send metrics to Weights & Biases (project: $WANDB_PROJECT or online-dpo)"""
    run_name: str | None = None
    """run name shown in wandb"""
    push_to_hub: Bool = False
    """upload the final model and tokenizer to the Hub"""
    hub_model_id: str | None = None
    """Hub repository for --push_to_hub; None: output_dir's name"""


PRESETS = {
    # The embedded world (benchmarks/tiny_world.py): the reward likes positive, short, ended answers.
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


def why(e):  # an exception as the error line shows it
    return f"{type(e).__name__}: {e}"


class FeedbackError(UsageError):
    """A reward function or the judge failed on the completions."""


# ---- Loading models


def load_model(auto_class, path, args, **kwargs):
    try:
        return auto_class.from_pretrained(path, trust_remote_code=args.trust_remote_code, **kwargs)
    except OSError as e:
        raise unreachable("model", path, e) from None
    except Exception as e:  # corrupt weights, an argument the model refuses
        raise UsageError(f"could not load the model in {path!r}: {why(e)}") from None


def load_policy(path, args, device, world, bf16, resume=False):
    """The model that trains (fp32). -> it, and what forwards with gradient use (DDP's wrapper, or it)."""
    kwargs = {"dtype": torch.float32} | json_dict(args.model_init_kwargs, "model_init_kwargs")
    policy = load_model(AutoModelForCausalLM, path, args, **kwargs)
    if args.use_peft:  # before disable_dropout, which zeroes the adapters' dropout too (as TRL's does)
        add_lora(policy, args)
        if resume:  # a checkpoint: the base weights, adapter/
            adapter = safetensors.torch.load_file(os.path.join(path, "adapter", "adapter_model.safetensors"))
            policy.load_state_dict({k.removeprefix("base_model.model."): v for k, v in adapter.items()}, strict=False)
    if args.disable_dropout:
        for module in policy.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    if args.gradient_checkpointing:  # train mode only: sampling (eval mode) keeps its KV cache
        policy.activation_checkpointing_enable()
    policy.train()
    fsdp = world > 1 and args.distributed == "fsdp"
    mixed_precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    policy = place(policy, device, fsdp, mixed_precision)
    if world == 1 or fsdp:
        return policy, policy
    return policy, DDP(policy, device_ids=[device.index] if device.type == "cuda" else None)


def load_frozen(auto_class, path, args, device, shard, bf16, **kwargs):
    """A forward-only model: no gradients, eval mode, bf16 when the policy's matmuls are."""
    kwargs = {"dtype": torch.float32} | kwargs | ({"dtype": torch.bfloat16} if bf16 else {})
    return place(load_model(auto_class, path, args, **kwargs).requires_grad_(False).eval(), device, shard)


class LoRALinear(torch.nn.Linear):
    """W x + b + (alpha / r) B A dropout(x), from an nn.Linear in place (same weights and names): W, b frozen;
    A (r, in) Kaiming-uniform (nn.Linear's init), B (out, r) zeros: it starts as the base layer."""
    on = True  # False: every adapter off (AdaptersOff)

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        return out + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scale if LoRALinear.on else out


def add_lora(model, args):
    """--use_peft: adapters on the targeted linear layers of the decoder blocks; all other weights frozen."""
    names, blocks = set(args.lora_target_modules) - {"all-linear"}, getattr(model, "_no_split_modules", None) or ()
    layers = [m for block in model.modules() if type(block).__name__ in blocks for n, m in block.named_modules()
              if type(m) is torch.nn.Linear and (not names or n.split(".")[-1] in names)]
    if not layers:
        raise UsageError(f"--lora_target_modules {' '.join(names)}: no linear layer in the decoder blocks is named so")
    model.requires_grad_(False)
    for layer in layers:
        kw = dict(bias=False, device=layer.weight.device, dtype=layer.weight.dtype)
        layer.__class__, layer.scale, layer.lora_dropout = LoRALinear, args.lora_alpha / args.lora_r, \
            torch.nn.Dropout(args.lora_dropout)
        layer.lora_A, layer.lora_B = torch.nn.Linear(layer.in_features, args.lora_r, **kw), \
            torch.nn.Linear(args.lora_r, layer.out_features, **kw)
        torch.nn.init.zeros_(layer.lora_B.weight)


class AdaptersOff(torch.nn.Module):
    """--use_peft's reference: the policy with its adapters off, in eval mode (no second copy of the weights)."""

    def __init__(self, policy):
        super().__init__()
        self.module, self.config = policy, policy.config

    def forward(self, **kwargs):
        was_training, LoRALinear.on = self.module.training, False
        try:
            return self.module.eval()(**kwargs)
        finally:
            LoRALinear.on = True
            self.module.train(was_training)


# ---- Several processes: torchrun, DDP, FSDP2 (one process: no-ops)


def init_distributed(args):
    """torchrun sets RANK, LOCAL_RANK, WORLD_SIZE; one device per rank. -> rank, world size, device."""
    rank, local_rank = (int(os.environ.get(k, "0")) for k in ("RANK", "LOCAL_RANK"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and not args.use_cpu
    if cuda and local_rank >= torch.cuda.device_count():
        raise UsageError(f"LOCAL_RANK {local_rank} but {torch.cuda.device_count()} GPUs: lower --nproc_per_node")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():  # torchrun, not a stale WORLD_SIZE
        if missing := [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]:
            raise UsageError(f"WORLD_SIZE is {world} but {', '.join(missing)} not set: unset it, or use torchrun")
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return rank, world, device


def is_main():  # rank 0 alone prints and writes
    return os.environ.get("RANK", "0") == "0"


def say(text):
    if is_main():
        print(text)


def place(model, device, shard, mixed_precision=None):
    """To this rank's device, or sharded over all ranks with FSDP2 (a unit per decoder layer)."""
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
    """FSDP2: all units gathered once for a decode, which then needs no collectives (ranks may end early)."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:  # fully_shard's defaults: layers reshard after forward, not the root
            unit.set_reshard_after_forward(unit is not getattr(model, "module", model), recurse=False)
            unit.reshard()


def sync_gradients(model, sync):
    """Gradient accumulation: all-reduce (DDP) or reduce-scatter (FSDP2) only when sync is set."""
    if isinstance(model, DDP):
        model.require_backward_grad_sync = sync  # what DDP's no_sync() context sets
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)


# ---- Prompts


def micro_batches(dataset, args, plan, rank, world, start):
    """This rank's micro-batches of B prompts from global micro-batch `start` on: rank r takes the r-th B."""
    B, per_epoch = args.per_device_train_batch_size, plan.per_epoch * args.gradient_accumulation_steps
    for epoch in range(start // per_epoch, math.ceil(plan.total / plan.per_epoch)):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
        for i in range(start % per_epoch if epoch == start // per_epoch else 0, per_epoch):
            first = (i * world + rank) * B
            yield dataset[order[first : first + B]]


def is_conversational(prompt):
    return isinstance(prompt, list) and len(prompt) > 0 and isinstance(prompt[0], dict) and "role" in prompt[0]


def prompt_token_ids(tokenizer, prompts):
    """Each prompt's token ids, whole: conversations through the chat template, assistant turn open."""
    if is_conversational(prompts[0]) and tokenizer.chat_template is None:
        raise UsageError("conversational prompts need a tokenizer with a chat template; this one has none")
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) if is_conversational(p)
             else p for p in prompts]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if min(map(len, ids)) == 0:
        raise UsageError("a prompt is empty after tokenization")
    return ids


def encode_prompts(tokenizer, prompts, max_prompt_len):
    """The last max_prompt_len tokens of each prompt. -> ids, mask (N, P) left-padded."""
    seqs = [ids[-max_prompt_len:] for ids in prompt_token_ids(tokenizer, prompts)]
    # Left padding: every row ends in a real token, so decoding appends in step.
    batch = tokenizer.pad({"input_ids": seqs}, padding_side="left", return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def positions(mask):  # (N, L) left-padded rows: 0 at each row's first real token
    return (mask.cumsum(-1) - 1).clamp(min=0)


# ---- Sampling with a KV cache


@torch.no_grad()
def sample(model, prompt_ids, prompt_mask, max_new_tokens, stop_ids, pad_id, num_samples=1, temperature=1.0, top_k=0,
           top_p=1.0, min_p=None, repetition_penalty=1.0, do_sample=True, suppress_tokens=None, generator=None):
    """Batched decoding over a preallocated KV cache, K = num_samples per prompt. -> completion ids, mask (K*N, T),
    rows [all 1st samples, ..., all K-th], each ending at its stop token."""
    (N, P), device, K = prompt_ids.shape, prompt_ids.device, num_samples
    stop = torch.tensor(stop_ids, device=device)
    cache = StaticCache(config=model.config, max_cache_len=P + max_new_tokens)
    mask = torch.cat([prompt_mask, prompt_mask.new_zeros(N, max_new_tokens)], 1)  # (N, P+T): a column opens per step
    logits = model(input_ids=prompt_ids, attention_mask=mask, position_ids=positions(prompt_mask), cache=cache,
                   logits_to_keep=1).logits[:, -1]
    if K > 1:  # each prompt prefilled once, its keys and values copied to its K samples' rows: N -> K*N
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys.repeat(K, 1, 1, 1), layer.values.repeat(K, 1, 1, 1)
        prompt_ids, prompt_mask, mask, logits = (x.repeat(K, 1) for x in (prompt_ids, prompt_mask, mask, logits))
        N *= K
    next_position = prompt_mask.sum(-1, keepdim=True)  # (N, 1)
    seen = None
    if repetition_penalty != 1.0:  # tokens in the prompt or completion, padding aside
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
    """What sampling and feedback need (from main())."""
    args: Args
    tokenizer: object
    rank: int
    world: int
    device: torch.device
    autocast: torch.autocast  # bf16 matmuls, or off
    generation: dict  # sample()'s keyword arguments
    stop_ids: list[int]
    reward_models: list  # (model, tokenizer) pairs
    reward_funcs: list
    judge: tuple | None  # a local judge: model, tokenizer, ids of "A", "B"
    packed: bool = False  # training: one row per pair (check_packing)
    judged: bool = False  # preferences from a judge, not rewards


@dataclass
class Samples:
    """K completions of each of B prompts, a row each: [all 1st samples, ..., all K-th]."""
    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    completion_ids: torch.Tensor  # (K*B, T) right-padded
    completion_mask: torch.Tensor  # (K*B, T)
    has_eos: torch.Tensor  # (K*B,) ended with a stop token
    token_ids: list[list[int]]  # each completion's real tokens
    texts: list[str]
    completions: list  # for rewards: the texts, or assistant messages

    def rows(self, pick, packed):  # pick (2B,): chosen, then rejected; a prompt row per pair, or per completion
        n = 1 if packed else 2
        return self.prompt_ids.repeat(n, 1), self.prompt_mask.repeat(n, 1), self.completion_ids[pick], \
            self.completion_mask[pick]


def rollout(run, model, prompts, generator, k=1, window=None):
    """k completions per prompt from `model` as it is now; prompts cut to max_length - max_new_tokens."""
    args = run.args
    ids, mask = encode_prompts(run.tokenizer, prompts, args.max_length - args.max_new_tokens)
    ids, mask = ids.to(run.device), mask.to(run.device)
    was_training, t0 = model.training, time.perf_counter()
    model.eval()
    n = 1 if args.prefix_sharing else k  # unshared: each sample prefills its own prompt copy
    with gathered(model), run.autocast:
        completion_ids, completion_mask = sample(
            model, ids.repeat(n, 1), mask.repeat(n, 1), args.max_new_tokens, run.stop_ids, run.tokenizer.pad_token_id,
            k // n, generator=generator, **run.generation)
    model.train(was_training)
    if window is not None:
        window.sampling += time.perf_counter() - t0
    stop = torch.tensor(run.stop_ids, device=run.device)
    has_eos = (torch.isin(completion_ids, stop) & (completion_mask == 1)).any(1)
    token_ids = [row[m.bool()].tolist() for row, m in zip(completion_ids, completion_mask)]
    texts = run.tokenizer.batch_decode(token_ids, skip_special_tokens=True)
    completions = [[{"role": "assistant", "content": t}] for t in texts] if is_conversational(prompts[0]) else texts
    return Samples(ids, mask, completion_ids, completion_mask, has_eos, token_ids, texts, completions)


# ---- Feedback from rewards


@torch.no_grad()
def score_completions(prompts, completions, completion_ids, extra_columns, reward_models, reward_funcs, weights,
                      when=""):
    """Every reward of each (prompt, completion), weighted, NaN-summed. -> total (N,), per reward (N, R)."""
    device, columns, chat = weights.device, [], is_conversational(prompts[0])
    for model, tokenizer in reward_models:
        texts = [tokenizer.apply_chat_template(p + c, tokenize=False) if chat else p + c
                 for p, c in zip(prompts, completions)]
        batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
        columns.append(model(**batch.to(device)).logits[:, 0].float())
    for func in reward_funcs:
        try:
            out = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **extra_columns)
        except Exception as e:
            name = getattr(func, "__name__", func)
            raise FeedbackError(f"reward function {name} fails{when}: {why(e)}") from None
        columns.append(reward_column(out, func, len(prompts), device))
    per_reward = torch.stack(columns, 1)  # (N, R)
    total = (per_reward * weights).nansum(1)  # none scored it: NaN, ranks last
    return total.masked_fill(per_reward.isnan().all(1), math.nan), per_reward


def score(run, prompts, samples, columns):
    """(N,) weighted rewards, minus --missing_eos_penalty where a completion has no stop token."""
    n = len(run.reward_models) + len(run.reward_funcs)
    weights = torch.tensor(run.args.reward_weights or [1.0] * n, device=run.device)
    with run.autocast:
        scores, _ = score_completions(
            prompts, samples.completions, samples.token_ids, columns, run.reward_models, run.reward_funcs, weights)
    if run.args.missing_eos_penalty is not None:
        scores = scores - run.args.missing_eos_penalty * (~samples.has_eos).float()
    return scores


# ---- Feedback from an LLM judge (the paper's annotator)

JUDGE_MIN_MASS = 0.5  # P(A) + P(B) below this in either order: invalid
JUDGE_UNDECIDED = 0.05  # |P(first is better) - 0.5| at most this: undecided, out of the loss


def judge_decisions(q, mass, undecided):
    """q, mass (2N,) from both orders -> p (N,) = P(first is better), valid, decided (|p - 0.5| > undecided)."""
    N = q.numel() // 2
    p = (q[:N] + 1 - q[N:]) / 2
    valid = (mass[:N] >= JUDGE_MIN_MASS) & (mass[N:] >= JUDGE_MIN_MASS)
    return p, valid, valid & ((p - 0.5).abs() > undecided)


def judge(run, prompts, first, second):
    """Each pair in both orders, locally or over HTTP. -> p, valid, decided (N,), failed (2N,)."""
    args = run.args
    texts = judge_texts(args.judge_prompt or JUDGE_PROMPT, prompts, first, second)
    if args.judge_api_base:
        q, mass, failed = judge_over_http(texts, args)
    else:
        model, tokenizer, answer_ids = run.judge
        with run.autocast:
            q, mass = judge_locally(model, tokenizer, texts, answer_ids, 2 * args.per_device_train_batch_size)
        failed = torch.zeros(len(texts), dtype=torch.bool)
    return *judge_decisions(q.to(run.device), mass.to(run.device), JUDGE_UNDECIDED), failed.to(run.device)


# ---- Pairing


TIE_THRESHOLD = 0.0  # best and worst scores this close or closer: a tie (--drop_ties)


def pair(scores, num_samples=2, tie_threshold=0.0):
    """scores (K*B,) -> per prompt the rows of the best and the worst sample (NaN ranks last), and tie (B,)."""
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
    scores: torch.Tensor | None  # (2B,) chosen, then rejected; None: a judge decided
    metrics: dict  # per-pair feedback metrics: pairs/* or judge/*
    logged: dict  # (B,) each, for completions.jsonl


def preferences(run, prompts, samples, columns):
    """Stages 3-4 for K*B samples of B prompts: the one place that knows where preferences come from."""
    args, B = run.args, len(prompts)
    if run.judged:
        p, valid, kept, failed = judge(run, prompts, samples.texts[:B], samples.texts[B:])
        rows, first, p_chosen = torch.arange(B, device=run.device), p >= 0.5, torch.maximum(p, 1 - p)
        metrics = {"judge/p_chosen": p_chosen[kept], "judge/invalid": (~valid).float(),
                   "judge/undecided": (valid & ~kept).float()} | (
            {"judge/api_failures": failed.float()} if args.judge_api_base else {})
        return Pairs(torch.where(first, rows, rows + B), torch.where(first, rows + B, rows), kept, None, metrics,
                     {"p_chosen": p_chosen})
    scores = score(run, prompts * args.num_samples, samples, columns)  # (K*B,)
    chosen, rejected, tie = pair(scores, args.num_samples, TIE_THRESHOLD)
    unscored = scores[chosen].isnan()  # the best unscored: so are all its prompt's samples
    kept = ~unscored & ~(tie & args.drop_ties)
    return Pairs(chosen, rejected, kept, scores[torch.cat([chosen, rejected])],
                 {"pairs/ties": tie.float(), "pairs/unscored": unscored.float()},
                 {"score_chosen": scores[chosen], "score_rejected": scores[rejected]})


# ---- Log-probs and loss


def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, impl="fused", packed=False):
    """Per-token log p of the completion tokens, (N, T), 0 at padding; fused: no logits at all (kernels/).
    packed: the N = 2B completions are B pairs (chosen, then rejected), a row each."""
    ids, mask, position_ids, row, column = training_rows(
        prompt_ids, prompt_mask, completion_ids, completion_mask, packed)
    inner = getattr(model, "module", model)  # DDP wraps the model; FSDP2 shards in place
    if mask.dim() == 4:  # additive: 0 where a query may look, else the dtype's min
        dtype = inner.dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=ids.device).masked_fill(~mask, torch.finfo(dtype).min)
    real = completion_mask.bool()
    row, column, targets = row[real], column[real], completion_ids[real]  # (n,) per real completion token
    head, config = inner.get_output_embeddings(), inner.config
    plain_head = head.bias is None and getattr(config, "final_logit_softcapping", None) is None \
        and getattr(config, "logit_scale", None) in (None, 1.0)  # Gemma 2 and Cohere transform their logits
    naive, first = impl == "naive" or not plain_head, prompt_ids.size(1) - 1  # outputs from the prompt's last token
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                logits_to_keep=ids.size(1) - first if naive else torch.empty(0, dtype=torch.long, device=ids.device),
                output_hidden_states=not naive)
    if naive:
        logps = naive_token_logprobs(out.logits[row, column - first], targets)
    else:  # head.weight after the forward: FSDP2's root keeps it gathered until backward
        logps = linear_logprobs(out.hidden_states[-1][row, column], head.weight, targets)  # after the final norm
    return logps.new_zeros(completion_ids.shape).index_put((real,), logps)


def training_rows(prompt_ids, prompt_mask, completion_ids, completion_mask, packed):
    """-> ids, mask, position ids, and per completion token (N, T) the row and column whose output predicts it.
    Unpacked: N rows [prompt | completion]. Packed: B prompts, 2B completions (chosen, then rejected) -> B rows
    [prompt | chosen | rejected]; the rejected see the prompt and themselves, positions restart after the prompt."""
    (B, P), (N, T), device = prompt_ids.shape, completion_ids.shape, prompt_ids.device
    L, t = P + 2 * T, torch.arange(T, device=device)
    if not packed:
        mask = torch.cat([prompt_mask, completion_mask], 1)
        return torch.cat([prompt_ids, completion_ids], 1), mask, positions(mask), \
            torch.arange(N, device=device)[:, None].expand(N, T), (P - 1 + t).expand(N, T)
    real = torch.cat([prompt_mask, completion_mask[:B], completion_mask[B:]], 1).bool()  # (B, L)
    i = torch.arange(L, device=device)
    part = (i >= P).long() + (i >= P + T).long()  # (L,) 0: prompt, 1: chosen, 2: rejected
    sees = (i[None] <= i[:, None]) & ~((part[:, None] == 2) & (part[None] == 1))  # (L, L) query x key
    mask = sees & real[:, None, :] | torch.eye(L, dtype=torch.bool, device=device)  # a query always sees itself
    start = prompt_mask.sum(1, keepdim=True)  # (B, 1) first completion position
    position_ids = torch.cat([positions(prompt_mask), start + t, start + t], 1)
    # Chosen token t is predicted at column P-1+t; rejected token t at P+T-1+t, but its first at P-1 too.
    column = torch.stack([P - 1 + t, torch.where(t == 0, P - 1, P + T - 1 + t)]).repeat_interleave(B, 0)  # (2B, T)
    return torch.cat([prompt_ids, completion_ids[:B], completion_ids[B:]], 1), mask[:, None], position_ids, \
        torch.arange(B, device=device).repeat(2)[:, None].expand(N, T), column


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, loss_type):
    """Per-pair loss (B,); h: how much more than the reference the policy prefers the chosen."""
    h = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "ipo":  # squared distance of h from 1 / (2 beta)
        return (h - 1 / (2 * beta)) ** 2
    return -F.logsigmoid(beta * h)  # sigmoid: the DPO loss


# ---- Metrics


@torch.no_grad()
def step_metrics(logps, ref_logps, completion_mask, scores, chosen, rejected, has_eos, losses, beta):
    """Per-sample values of every logged metric (TRL's names and formulas); scores None: a judge decided."""
    logp, ref_logp = (logps * completion_mask).sum(1), (ref_logps * completion_mask).sum(1)  # (2B,)
    kl = logp - ref_logp
    non_score_reward = -beta * kl
    reward_chosen = beta * (logp[chosen] - ref_logp[chosen])
    reward_rejected = beta * (logp[rejected] - ref_logp[rejected])
    scored = {} if scores is None else {"objective/rlhf_reward": scores + non_score_reward, "objective/scores": scores,
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


# ---- Schedule and optimizer


def make_optimizer(policy, args, plan):
    """AdamW, no weight decay on biases and norms; linear warmup, then --lr_scheduler_type (transformers')."""
    trained = [p for p in policy.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trained if p.ndim >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in trained if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, fused=next(policy.parameters()).device.type == "cuda")
    kind = {"constant": "constant_with_warmup"}.get(args.lr_scheduler_type, args.lr_scheduler_type)
    return optimizer, get_scheduler(kind, optimizer, num_warmup_steps=plan.warmup, num_training_steps=plan.total)


# ---- main(): set up, then the training loop


def main(args):
    """Train; -> the policy (sharded under FSDP2). Under torchrun every rank runs this."""
    # 0. Check before any model loads: flags, files, data, models, rewards, the judge.
    check_args(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_output_dir(args)
    resume = resume_point(args, world)  # the checkpoint to continue, or None
    reward_funcs = [load_reward_func(spec) for spec in args.reward_funcs]
    dataset, test_set = load_prompts(args)
    tokenizer, config = load_tokenizer(resume or args.model_name_or_path, args, "--model_name_or_path")
    check_loading(args, config)
    reward_tokenizers = [load_tokenizer(path, args, "--reward_model_path")[0] for path in args.reward_model_path]
    check_prompts(args, dataset, tokenizer, reward_tokenizers, reward_funcs)
    judge_tokenizer = args.judge_model_path and load_tokenizer(args.judge_model_path, args, "--judge_model_path")[0]
    if args.judge_api_base:
        check_judge_api(args)
    plan = make_plan(args, len(dataset), world)
    B, GA, K = args.per_device_train_batch_size, args.gradient_accumulation_steps, args.num_samples

    # One process per device; rank 0 alone prints and writes.
    rank, world, device = init_distributed(args)
    set_seed(args.seed)  # Python, NumPy, torch: reward functions may draw
    bf16 = args.bf16 if args.bf16 is not None else device.type == "cuda" and torch.cuda.is_bf16_supported()

    # 1. Models: the policy (or its checkpoint), the frozen reference, the reward models or judge.
    policy, train_model = load_policy(resume or args.model_name_or_path, args, device, world, bf16, bool(resume))
    frozen = dict(args=args, device=device, shard=world > 1 and args.distributed == "fsdp", bf16=bf16)
    ref = AdaptersOff(policy) if args.use_peft else load_frozen(
        AutoModelForCausalLM, args.ref_model_path or args.model_name_or_path, **frozen,
        **json_dict(args.model_init_kwargs, "model_init_kwargs"))
    reward_models = [(load_frozen(AutoModelForSequenceClassification, path, **frozen, num_labels=1,
                                  pad_token_id=tok.pad_token_id), tok)  # it finds rows' ends by the pad id
                     for path, tok in zip(args.reward_model_path, reward_tokenizers)]
    judge = judge_tokenizer and (load_frozen(AutoModelForCausalLM, args.judge_model_path, **frozen), judge_tokenizer,
                                 judge_answer_ids(judge_tokenizer))
    run = Rollout(args, tokenizer, rank, world, device, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16),
                  *sampling_settings(args, tokenizer, policy), reward_models, reward_funcs, judge or None,
                  check_packing(args, policy, ref), bool(args.judge_model_path or args.judge_api_base))
    feedback = args.judge_model_path or args.judge_api_model or " + ".join(args.reward_model_path + args.reward_funcs)
    say(f"preferences from {'the judge' if run.judged else f'the best and worst of {K} samples by'} {feedback}")
    generator = torch.Generator(device).manual_seed(args.seed + rank)  # each rank samples its own completions
    optimizer, scheduler = make_optimizer(policy, args, plan)

    state = dict(step=0, epoch=0.0, micro_batches_done=0, world_size=world, nonfinite_steps=0, empty_steps=0,
                 wandb_id=None)  # trainer_state.json
    window = Window()  # the metrics since the last log
    if resume:  # optimizer, schedule, data, random streams, sums
        state, window = load_checkpoint(resume, policy, optimizer, scheduler, generator, rank, device)
    start_output_dir(args, resume, state)
    log = Log(args, plan, state, resume is not None)
    eval_prompts, eval_columns = held_out(args, test_set, rank, world)
    reference = []  # the reference's answers, sampled once: it never changes
    data = micro_batches(dataset, args, plan, rank, world, state["micro_batches_done"])

    with stop_signals() as signals, log.bar:  # SIGTERM (preemption), Ctrl-C: finish the step, save, exit
        for step in range(state["step"] + 1, plan.total + 1):
            beta = args.beta[min((step - 1) // plan.per_epoch, len(args.beta) - 1)]  # one per epoch, then the last
            micro = Window()  # this step's metrics
            last_good = rank_state(generator, window)  # where a broken reward function or judge rewinds
            for micro_step in range(GA):
                batch = next(data)
                prompts = batch.pop(args.dataset_prompt_column)

                # 2. Sample K completions per prompt from the policy as it is now: rows [all 1st samples, ..., K-th].
                samples = rollout(run, policy, prompts, generator, K, window)

                # 3-4. Feedback and pairs: per prompt the best and worst sample by reward, or the judge's choice.
                try:
                    pairs = preferences(run, prompts, samples, {k: v * K for k, v in batch.items()})
                except FeedbackError as e:  # one process: save the step before (resume is exact)
                    saved = world == 1 and step > 1 and save_checkpoint(
                        policy, optimizer, scheduler, tokenizer, args, progress(state, step - 1, plan, args), last_good)
                    raise TrainingError(f"step {step}: {e}; " + (f"saved {saved}: fix it, then resume with "
                                        "--resume_from_checkpoint latest" if saved else "nothing saved")) from None
                pick = torch.cat([pairs.chosen, pairs.rejected])  # (2B,) rows: chosen completions, then rejected

                # 5. Log-probs of the pairs' completions under the policy (with grad) and the reference, (2B, T).
                sync_gradients(train_model, micro_step == GA - 1)  # ranks average gradients in the last backward
                sampled = samples.rows(pick, run.packed)
                with run.autocast:
                    logps = completion_logprobs(train_model, *sampled, packed=run.packed)
                    with torch.no_grad():
                        ref_logps = completion_logprobs(ref, *sampled, packed=run.packed)

                # 6. Loss: DPO or IPO per pair, mean over the pairs kept (none: 0, and backward keeps DDP in step).
                logp, ref_logp = logps.sum(1), ref_logps.sum(1)  # (2B,)
                losses = dpo_loss(logp[:B], logp[B:], ref_logp[:B], ref_logp[B:], beta, args.loss_type)  # (B,)
                kept = pairs.kept
                (torch.where(kept, losses, 0.0).sum() / kept.sum().clamp(min=1) / GA).backward()
                in_loss = torch.arange(B, device=device)[kept]  # the kept pairs' rows among the 2B
                micro.add(step_metrics(logps.detach(), ref_logps, sampled[3], pairs.scores, in_loss, in_loss + B,
                                       samples.has_eos[pick], losses[kept], beta) | pairs.metrics)

            # 7. Optimizer step: clip, AdamW, schedule; skipped on all ranks for a NaN/inf, or if no pair was kept.
            grad_norm, status, stopping = optimizer_step(policy, optimizer, scheduler, args, micro, bool(signals))
            halt = count_steps(state, status, step, args, micro)  # why the run stops now, or None
            if status != "nonfinite":
                window.add(micro.sums, micro.counts)
            window.steps += 1
            log.bar.update(1)

            # 8. Log (means over all ranks since the last log), the completions, an evaluation, a checkpoint.
            if step % plan.log == 0 or step == plan.total or halt:
                log.line(step, window.means(
                    learning_rate=scheduler.get_last_lr()[0], grad_norm=float(grad_norm), epoch=step / plan.per_epoch,
                    nonfinite_steps=state["nonfinite_steps"], empty_steps=state["empty_steps"]))
                window = Window()
            if plan.eval and step % plan.eval == 0:  # the last micro-batch's pairs; policy against reference
                log.pairs(step, prompts, samples.texts, pairs)
                if step < plan.total and eval_prompts:
                    log.line(step, *evaluate(run, policy, ref, eval_prompts, eval_columns, reference))
            if (plan.save and step % plan.save == 0 and step < plan.total) or stopping or halt:
                state = progress(state, step, plan, args)
                mine = rank_state(generator, window)
                saved = save_checkpoint(policy, optimizer, scheduler, tokenizer, args, state, mine)
            if halt:
                log.close()
                raise TrainingError(f"{halt}; saved {saved}")
            if stopping:
                say(f"stopped by a signal after step {step}; saved {saved}: go on with --resume_from_checkpoint latest")
                log.close()
                del train_model  # DDP's reducer goes now: freed at exit, it can deadlock gloo
                raise SystemExit(128 + signal.SIGINT if signal.SIGINT in signals else 0)

    # 9. Save the policy for from_pretrained(output_dir).
    save_final(policy, optimizer, scheduler, tokenizer, args, progress(state, plan.total, plan, args),
               rank_state(generator, window), plan)
    say(f"saved the trained model to {args.output_dir}")

    # 10. Before / after: reference and trained policy answer the same held-out prompts, scored as in training.
    if eval_prompts:
        logs, records = evaluate(run, policy, ref, eval_prompts, eval_columns, reference)
        log.line(plan.total, logs, records)
        say(before_after(records))
    log.close()
    if args.push_to_hub and is_main():
        push_to_hub(args)
    return policy


# ==== Below: what a first reading can skip


# ---- Checks of the inputs

GENERATION_KEYS = "temperature top_k top_p min_p repetition_penalty do_sample suppress_tokens eos_token_id".split()
RULES = {flag: (ok, what) for flags, ok, what in [  # a numeric flag's allowed values (never NaN or inf)
    ("max_new_tokens per_device_train_batch_size gradient_accumulation_steps save_total_limit lora_r",
     lambda v: v >= 1, ">= 1"),
    ("beta temperature repetition_penalty logging_steps lora_alpha", lambda v: v > 0, "> 0"),
    ("top_k missing_eos_penalty learning_rate warmup_steps weight_decay max_grad_norm save_steps "
     "eval_steps eval_prompts", lambda v: v >= 0, ">= 0"),
    ("reward_weights num_train_epochs", lambda v: True, "finite"),
    ("num_samples", lambda v: v >= 2, ">= 2 (a pair needs two completions)"),
    ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"), ("min_p", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("seed", lambda v: 0 <= v < 2**32, "in [0, 2**32)")] for flag in flags.split()}


def bad_number(flag, value):
    ok, what = RULES[flag]
    for v in value if isinstance(value, tuple) else () if value is None else (value,):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and ok(v)):
            return f"{flag} must be {what}, got {value!r}"
    return None


def json_dict(text, flag):
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise UsageError(f"--{flag} must be a JSON object such as '{{\"key\": 1}}', got {text!r}")
    return value


def check_args(args):
    """The flags alone. Fills in the default reward model."""
    judge = args.judge_model_path or args.judge_api_base
    if args.reward_model_path is None:
        args.reward_model_path = () if args.reward_funcs or judge else ("trl-lib/Qwen2-0.5B-Reward",)  # quick start
    n_rewards = len(args.reward_model_path) + len(args.reward_funcs)
    json_dict(args.model_init_kwargs, "model_init_kwargs")
    generation = json_dict(args.generation_kwargs, "generation_kwargs")
    unknown = sorted(set(generation) - set(GENERATION_KEYS))
    try:
        filled = (args.judge_prompt or JUDGE_PROMPT).format(prompt="\0p", response_a="\0a", response_b="\0b")
        bad_template = not all(f"\0{k}" in filled for k in "pab")
    except (KeyError, IndexError, ValueError):
        bad_template = True
    problems = [
        (args.loss_type not in ("sigmoid", "ipo"), f"--loss_type must be sigmoid or ipo, got {args.loss_type!r}"),
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
         "--resume_from_checkpoint and --overwrite_output_dir: give one of them"),
        (os.path.isfile(args.output_dir), f"--output_dir {args.output_dir!r} is a file; give a directory"),
        (args.use_peft and args.ref_model_path, "--ref_model_path with --use_peft: the reference is the policy, "
         "adapters off; drop one"),
        *[(True, "--" + p) for flag in RULES if (p := bad_number(flag, getattr(args, flag)))],
        (unknown, f"--generation_kwargs: unsupported keys {unknown}; supported: {', '.join(GENERATION_KEYS)}"),
        *[(True, f"--generation_kwargs {p}") for k, v in generation.items() if k in RULES and (p := bad_number(k, v))],
        (type(generation.get("top_k", 0)) is not int, "--generation_kwargs top_k must be an integer"),
        (generation.get("do_sample", True) is not True, "--generation_kwargs do_sample must be true, got "
         f"{generation.get('do_sample')!r}: greedy decoding makes both samples the same"),
        (bad_template, "--judge_prompt must contain {prompt}, {response_a} and {response_b}, and no other braces "
         "(literal ones: {{ and }})"),
    ]
    if message := next((m for bad, m in problems if bad), None):
        raise UsageError(message)
    if args.push_to_hub and huggingface_hub.get_token() is None:
        raise UsageError("--push_to_hub needs a Hub token: run `hf auth login` or set HF_TOKEN")


def check_output_dir(args):
    """Writable, and holding no input (the run would overwrite it)."""
    out = os.path.realpath(args.output_dir)
    paths = [(k, getattr(args, k)) for k in "model_name_or_path ref_model_path judge_model_path dataset_name".split()]
    for flag, path in paths + [("reward_model_path", p) for p in args.reward_model_path]:
        real = os.path.realpath(path) if path and os.path.exists(path) else None
        if real == out or real and args.overwrite_output_dir and real.startswith(out + os.sep):
            raise UsageError(f"--{flag} {path!r} is in --output_dir, which this run would overwrite: give another")
    try:  # every rank: on several nodes each has its own disk
        os.makedirs(args.output_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=args.output_dir).close()
    except OSError as e:
        raise UsageError(f"--output_dir {args.output_dir!r} is not writable ({e.strerror}); give another") from None


def load_reward_func(spec):
    """`module:function` (from the working directory) or `path/to/file.py:function`."""
    module_name, _, func_name = spec.rpartition(":")
    if not module_name or not func_name:
        raise UsageError(f"--reward_funcs {spec!r}: expected `module:function` or `file.py:function`")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    load = runpy.run_path if module_name.endswith(".py") else lambda name: vars(importlib.import_module(name))
    try:
        names = load(module_name)
    except Exception as e:
        raise UsageError(f"--reward_funcs {spec!r}: cannot import {module_name!r} ({why(e)})") from None
    if not callable(func := names.get(func_name)):
        raise UsageError(f"--reward_funcs {spec!r}: {module_name!r} has no function {func_name!r}")
    return func


def reward_column(out, func, n, device):
    name = getattr(func, "__name__", repr(func))
    if not isinstance(out, (list, tuple)) or len(out) != n:
        raise FeedbackError(f"reward function {name} must return a list of {n} numbers (one per completion), got "
                            f"{type(out).__name__} {str(out)[:40]}")
    try:
        return torch.tensor([math.nan if r is None else float(r) for r in out], device=device)
    except (TypeError, ValueError):
        raise FeedbackError(f"reward function {name} returned something that is not a number or None: {out[:4]}...") \
            from None


def load_prompts(args):
    """Train and held-out prompts (None: no test split): a data file, a saved dataset, or the Hub."""
    name, train_split, test_split = args.dataset_name, args.dataset_train_split, args.dataset_test_split
    column = args.dataset_prompt_column
    ext, file = os.path.splitext(name)[1].lower(), os.path.isfile(name)
    saved = os.path.isdir(name) and {"dataset_dict.json", "state.json"} & set(os.listdir(name))
    if file and ext not in (".json", ".jsonl", ".parquet", ".csv"):
        raise UsageError(f"--dataset_name {name!r}: a data file must be .json, .jsonl, .parquet or .csv")
    if file and os.path.getsize(name) == 0:  # datasets: a bare StopIteration
        raise UsageError(f"--dataset_name {name!r} is an empty file")
    try:
        if file:
            builder = {".jsonl": "json"}.get(ext, ext[1:])
            splits = {train_split: datasets.load_dataset(builder, data_files=name, split="train")}
        elif saved:
            splits = datasets.load_from_disk(name)
            splits = splits if isinstance(splits, datasets.DatasetDict) else {train_split: splits}
        else:
            splits = datasets.load_dataset(name, args.dataset_config)
    except Exception as e:  # a malformed file, no rows, no Hub
        while e.__cause__ or e.__context__:
            e = e.__cause__ or e.__context__
        raise UsageError(f"--dataset_name {name!r}: " + (
            f"could not read it ({why(e)}); is it a valid {ext[1:]} file?" if file else
            f"could not read this saved dataset ({why(e)}); check that it holds prompts" if saved else
            f"could not load it ({why(e)}). Give a reachable Hub dataset or a local one; " + OFFLINE_HINT)) from None
    if train_split not in splits:
        raise UsageError(f"--dataset_train_split {train_split!r} is not a split of {name!r}; splits: {list(splits)}")
    train, test = splits[train_split], splits.get(test_split) if test_split != train_split else None
    for split, ds in ((train_split, train), (test_split, test)):
        if ds is not None and column not in ds.column_names:
            close = difflib.get_close_matches(column, ds.column_names, n=1)
            raise UsageError(f"--dataset_prompt_column {column!r} is not a column of {name!r}; columns: "
                             f"{ds.column_names}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        kinds = set()
        for i, p in enumerate(ds.select_columns(column)[:][column] if ds else []):  # one column: cheap
            chat = isinstance(p, list) and p != [] and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                and m["content"].strip() for m in p)
            kinds.add(chat)
            if not (chat or isinstance(p, str) and p.strip()) or len(kinds) > 1:
                raise UsageError(f"--dataset_name {name!r}, split {split!r}, row {i}: " + (
                    "conversations and text mixed" if len(kinds) > 1 else f"the prompt is {p!r:.80}") + "; prompts are "
                    "all non-empty text, or all lists of {role, content} messages")
    if len(train) == 0:
        raise UsageError(f"--dataset_name {name!r}: the {train_split!r} split is empty")
    return train, test


def unreachable(what, path, error):
    return UsageError(f"could not load {what} {path!r} ({error}). Give a Hub id you can reach or a local directory; "
                      f"{OFFLINE_HINT}")


def load_tokenizer(path, args, flag):
    """-> the tokenizer (EOS pads if the pad token is not embedded), the model's config."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as e:  # ValueError: no tokenizer files
        raise unreachable("the tokenizer of", path, e) from None
    if not tokenizer("Hello world.", add_special_tokens=False)["input_ids"]:  # a directory without its files
        raise UsageError(f"could not load the tokenizer of {path!r}: it has no vocabulary; save it with the model")
    config = model_config(path, args, flag)
    vocab = getattr(config, "vocab_size", None) or math.inf
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id >= vocab:
        if tokenizer.eos_token_id is None or tokenizer.eos_token_id >= vocab:
            raise UsageError(f"the tokenizer of {path!r} has no pad or EOS token in the model's {vocab} embeddings")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, config


def model_config(path, args, flag):
    """Reward models: classifiers with one output; the others: causal LMs (else a random head)."""
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as e:  # ValueError: no model config
        raise unreachable("model", path, e) from None
    kinds, reward = config.architectures or [], flag == "--reward_model_path"
    heads = [k.endswith("ForSequenceClassification") for k in kinds]
    if kinds and (not any(heads) if reward else all(heads)):
        raise UsageError(f"{flag} {path!r} is a {kinds[0]}, not a {'reward model' if reward else 'causal LM'}: loaded "
                         "as one it would run a random head")
    if reward and config.num_labels != 1:
        raise UsageError(f"--reward_model_path {path!r} has a head with {config.num_labels} outputs, not 1")
    return config


LOADING_KEYS = set("attn_implementation dtype torch_dtype revision low_cpu_mem_usage use_safetensors variant cache_dir "
                   "subfolder local_files_only token".split())  # from_pretrained's own arguments
ATTENTION = "eager, sdpa, flash_attention_2, flash_attention_3, flex_attention"


def check_loading(args, config):
    """With the policy's config: --generation_kwargs token ids, --model_init_kwargs; the reference's kind."""
    vocab = getattr(config, "vocab_size", None) or math.inf
    for key, value in json_dict(args.generation_kwargs, "generation_kwargs").items():
        ids = value if isinstance(value, list) else [value] if key == "eos_token_id" else [None]
        if key in ("suppress_tokens", "eos_token_id") and not all(type(i) is int and 0 <= i < vocab for i in ids):
            raise UsageError(f"--generation_kwargs {key} must be token ids in [0, {vocab}), got {value!r}")
    kwargs = json_dict(args.model_init_kwargs, "model_init_kwargs")
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype", "float32"))
    problems = [(k not in LOADING_KEYS and not hasattr(config, k), f"{k!r} is neither a from_pretrained argument "
                 "nor a config field") for k in kwargs] + [
        (kwargs.get("attn_implementation", "sdpa") not in ATTENTION.split(", "),
         f"attn_implementation must be one of {ATTENTION}"),
        (dtype not in ("float32", "float64"), f"dtype must be float32 or float64, got {dtype!r} (see --bf16)")]
    if message := next((m for bad, m in problems if bad), None):
        raise UsageError(f"--model_init_kwargs: {message}")
    if args.ref_model_path:
        model_config(args.ref_model_path, args, "--ref_model_path")


def check_prompts(args, dataset, tokenizer, reward_tokenizers, reward_funcs, n=512):
    columns = dataset[:n]
    prompts = columns.pop(args.dataset_prompt_column)
    chat = is_conversational(prompts[0])
    for path, reward_tokenizer in zip(args.reward_model_path, reward_tokenizers):
        if chat and reward_tokenizer.chat_template is None:
            raise UsageError(f"the prompts are conversations: the tokenizer of reward model {path!r} has no chat "
                             "template")
    try:
        lengths = [len(ids) for ids in prompt_token_ids(tokenizer, prompts)]
    except UsageError as e:
        raise UsageError(f"--dataset_name {args.dataset_name!r} with the tokenizer of {args.model_name_or_path!r}: "
                         f"{e}") from None
    if min(lengths) > (limit := args.max_length - args.max_new_tokens):
        raise UsageError(f"all {len(lengths)} prompts checked are longer than --max_length - --max_new_tokens = "
                         f"{limit} tokens (the shortest: {min(lengths)}): raise --max_length")
    texts = ["A placeholder answer."] * min(2, len(prompts))
    completions = [[{"role": "assistant", "content": t}] for t in texts] if chat else texts
    for func in reward_funcs:
        score_completions(prompts[:2], completions, tokenizer(texts, add_special_tokens=False)["input_ids"],
                          {k: v[:2] for k, v in columns.items()}, [], [func], torch.ones(1),
                          when=" on a trial call (2 dataset prompts, placeholder completions)")


def check_packing(args, *models):
    """Packed rows need a 4D mask: eager or sdpa, no short sliding window, a trial where rejected tokens see their
    prompt, not the chosen."""
    for model in models if args.prefix_sharing else ():
        config, reason = model.config, None
        if config._attn_implementation not in ("eager", "sdpa"):
            reason = f"attn_implementation {config._attn_implementation} takes no 4D attention mask"
        elif (getattr(config, "sliding_window", None) or math.inf) < 2 * args.max_length:
            reason = f"its sliding window ({config.sliding_window} tokens) may be shorter than a row"
        else:
            ids = (torch.arange(15, device=next(model.parameters()).device) % config.vocab_size).view(5, 3)
            one = torch.ones_like(ids)
            was_training = model.training
            try:  # 2 prompts, 2 chosen, 1 rejected; eval: no dropout; gathered: FSDP2 reshards after
                with torch.no_grad(), gathered(model.eval()):
                    a, b, c = (completion_logprobs(model, ids[[p]], one[:1], ids[[k, 4]], one[:2], packed=True)[1, 1:]
                               for p, k in ((0, 2), (0, 3), (1, 2)))
                reason = None if torch.equal(a, b) and not torch.equal(a, c) else "the model does not apply a 4D mask"
            except Exception as e:
                reason = f"the model refuses a 4D attention mask ({why(e)})"
            model.train(was_training)
        if reason:
            say(f"prefix sharing off in training: {reason}")
            return False
    return args.prefix_sharing


# Steps per epoch, in all, of warmup; every how many to log, save, evaluate (0: never).
Plan = collections.namedtuple("Plan", "per_epoch total warmup log save eval")


def make_plan(args, n_prompts, world):
    B, GA = args.per_device_train_batch_size, args.gradient_accumulation_steps
    if (per_epoch := n_prompts // (B * GA * world)) == 0:
        raise UsageError(f"the dataset has {n_prompts} prompts but one optimizer step needs per_device_train_batch_size"
                         f" x gradient_accumulation_steps x processes = {B} x {GA} x {world} = {B * GA * world}")
    total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * per_epoch)
    steps = [steps_of(v, total) for v in (args.warmup_steps, args.logging_steps, args.save_steps, args.eval_steps)]
    return Plan(per_epoch, total, steps[0], max(1, steps[1]), *steps[2:])


def steps_of(value, total):  # as TrainingArguments: a value < 1 is a fraction of all
    return math.ceil(value * total) if 0 < value < 1 else int(value)


def sampling_settings(args, tokenizer, policy):
    """-> sample()'s keyword arguments, the stop ids: --generation_kwargs' eos_token_id, or the tokenizer's EOS and
    the generation config's (chat models' end-of-turn)."""
    generation = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
                  "repetition_penalty": args.repetition_penalty, "do_sample": True, "suppress_tokens": None}
    generation |= json_dict(args.generation_kwargs, "generation_kwargs")
    if (eos := generation.pop("eos_token_id", None)) is None:
        eos = getattr(getattr(policy, "generation_config", None), "eos_token_id", None)
        eos = sorted(i for i in {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None})
    return generation, [eos] if isinstance(eos, int) else list(eos)


# ---- Faults during training


@dataclass
class Window:
    """What logged metrics average over: sums and counts of per-sample values; the clock."""
    sums: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    start: float = field(default_factory=time.perf_counter)
    sampling: float = 0.0  # seconds in rollout()
    steps: int = 0

    def add(self, values, counts=None):  # per-sample tensors, or a window's sums, counts
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + (v if counts is not None else v.sum())
            self.counts[k] = self.counts.get(k, 0) + (counts[k] if counts is not None else v.numel())

    def means(self, **extra):
        """Each metric's mean over all ranks' samples (one all_reduce), then `extra` and the times."""
        elapsed, keys = time.perf_counter() - self.start, list(self.sums)
        means, tokens = {}, 0.0
        if keys:  # none: every step since the last log was skipped
            counts = torch.tensor([float(self.counts[k]) for k in keys], dtype=torch.float64,
                                  device=self.sums[keys[0]].device)
            packed = torch.stack([torch.stack([self.sums[k].double() for k in keys]), counts])  # (2, metrics)
            if dist.is_initialized():
                dist.all_reduce(packed)
            total, count = packed.tolist()
            means = {k: s / c for k, s, c in zip(keys, total, count) if c}  # no samples: no value
            tokens = dict(zip(keys, total)).get("completions/mean_length", 0)  # all ranks' completion tokens
        return means | extra | {"time/step": elapsed / self.steps, "time/sampling": self.sampling / self.steps,
                                "time/tokens_per_s": tokens / elapsed}


def optimizer_step(policy, optimizer, scheduler, args, micro, stop):
    """Clip, AdamW, schedule; skipped on all ranks for a NaN/inf loss or grad, or no pair kept anywhere."""
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm or float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: a DTensor
    flags = torch.stack([~torch.isfinite(micro.sums["loss"]) | ~torch.isfinite(grad_norm),
                         *torch.tensor([micro.counts["loss"] > 0, stop], device=grad_norm.device)]).float()
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    nonfinite, kept, stop = (bool(f) for f in flags.tolist())
    status = "nonfinite" if nonfinite else "trained" if kept else "empty"
    if status == "trained":
        optimizer.step()
        shards = [p.to_local() if hasattr(p, "to_local") else p for p in policy.parameters()]  # FSDP2: this rank's
        broken = (~torch.isfinite(torch.nn.utils.get_total_norm(shards))).float().reshape(1)
        if isinstance(policy, FSDPModule):
            dist.all_reduce(broken, op=dist.ReduceOp.MAX)
        status = "broken" if broken.item() else status
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, status, stop


MAX_EMPTY_STEPS, MAX_NONFINITE_STEPS = 5, 10  # steps in a row without a preference, or NaN/inf: the run stops
EMPTY_CAUSES = {"pairs/unscored": "no reward scored the completions (None or NaN)", "pairs/ties": "the samples tied",
                "judge/undecided": "the judge was undecided", "judge/invalid": "the judge gave no A or B (is it up?)"}


def count_steps(state, status, step, args, micro):
    for kind in ("nonfinite", "empty"):
        state[f"{kind}_steps"] = state.get(f"{kind}_steps", 0) + (status == kind)
        state[f"{kind}_in_a_row"] = state.get(f"{kind}_in_a_row", 0) + 1 if status == kind else 0
    if status == "broken":
        raise TrainingError(f"the update of step {step} made the weights NaN/inf (not saved); latest checkpoint: "
                            + latest_checkpoint(args))
    if state["nonfinite_in_a_row"] >= MAX_NONFINITE_STEPS:
        return (f"the loss or gradient was NaN/inf in {state['nonfinite_in_a_row']} steps in a row (up to step "
                f"{step}): lower --learning_rate or check the rewards and data")
    if state["empty_in_a_row"] >= MAX_EMPTY_STEPS:
        share = {k: float(micro.sums[k]) / micro.counts[k] for k in EMPTY_CAUSES if micro.counts.get(k)}
        return (f"no pair carried a preference in {MAX_EMPTY_STEPS} steps in a row (up to step {step}): "
                + EMPTY_CAUSES[max(share, key=share.get)])
    return None


def progress(state, step, plan, args):  # trainer_state.json after `step`
    return state | {"step": step, "epoch": step / plan.per_epoch,
                    "micro_batches_done": step * args.gradient_accumulation_steps}


def latest_checkpoint(args):
    with contextlib.suppress(OSError), open(os.path.join(args.output_dir, "latest")) as f:
        return os.path.join(args.output_dir, f.read().strip())
    return "none"


# ---- Checkpoints, resume, the final save

# Args that change neither completions nor updates: a resumed run may change them.
RESUMABLE_CHANGES = set("""preset output_dir resume_from_checkpoint overwrite_output_dir logging_steps save_steps
    save_total_limit eval_prompts report_to run_name push_to_hub hub_model_id bf16
    gradient_checkpointing distributed prefix_sharing eval_steps""".split())
CHECKPOINT_FILES = ("trainer_state.json", "online_dpo_args.json", "config.json", "optimizer.pt", "rank_states.pt")


def read_json(path):
    with open(path) as f:
        return json.load(f)


def resume_point(args, world):
    path, out, latest = args.resume_from_checkpoint, args.output_dir, latest_checkpoint(args)
    earlier = [n for n in ("config.json", "metrics.jsonl") if os.path.isfile(os.path.join(out, n))]
    if path is None and (earlier or latest != "none") and not args.overwrite_output_dir:
        what = (f"checkpoints of an earlier run (latest: {os.path.basename(latest)}): add --resume_from_checkpoint "
                "latest to continue it, or" if latest != "none" else
                f"an earlier run's {' and '.join(earlier)}: give another --output_dir, or")
        raise UsageError(f"--output_dir {out!r} holds {what} --overwrite_output_dir to start afresh")
    if path is None:
        return None
    path = latest if path == "latest" else path
    if path == "none":
        raise UsageError(f"--resume_from_checkpoint latest: {out!r} has no checkpoint yet")
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        what = "not a checkpoint of online_dpo.py" if os.path.isdir(path) else "no such directory"
        raise UsageError(f"--resume_from_checkpoint {path!r}: {what}; give output_dir/checkpoint-N, or `latest`")
    name, adapter = CHECKPOINT_FILES[0], ("adapter/adapter_model.safetensors",) if args.use_peft else ()
    try:  # every file a resume reads is whole
        for name in CHECKPOINT_FILES + adapter + tuple(f for f in os.listdir(path) if f.endswith(".safetensors")):
            file = os.path.join(path, name)
            if name.endswith(".json"):
                read_json(file)
            elif name.endswith(".pt"):
                torch.load(file, weights_only=True, mmap=True)
            else:
                safetensors.safe_open(file, "pt")
    except Exception as e:
        step = int(m.group(1)) if (m := re.search(r"checkpoint-(\d+)$", path.rstrip("/"))) else math.inf
        before = [int(d[11:]) for d in os.listdir(os.path.dirname(os.path.abspath(path)))
                  if re.fullmatch(r"checkpoint-\d+", d) and int(d[11:]) < step]
        hint = f"resume from checkpoint-{max(before)}, the one before" if before else "and there is none before it"
        raise UsageError(f"--resume_from_checkpoint {path!r}: {name} is missing or damaged ({why(e)}); "
                         + hint) from None
    saved, ran_on = (read_json(os.path.join(path, f)) for f in ("online_dpo_args.json", "trainer_state.json"))
    differ = [f"--{k} is {saved.get(k)!r} there and {v!r} here" for k, v in json.loads(json.dumps(asdict(args))).items()
              if k not in RESUMABLE_CHANGES and saved.get(k) != v]
    if ran_on["world_size"] != world:  # data order and random streams are per rank
        differ.append(f"it ran on {ran_on['world_size']} processes and this run has {world}")
    if differ:
        raise UsageError(f"--resume_from_checkpoint {path!r} belongs to another run: {'; '.join(differ)}")
    return path


def start_output_dir(args, resume, state):  # overwriting: old checkpoints go once this run saved one
    if resume and is_main():
        replace_file(os.path.join(args.output_dir, "latest"), os.path.basename(os.path.normpath(resume)))
    elif args.overwrite_output_dir:
        state["earlier"] = [n for n in os.listdir(args.output_dir) if re.fullmatch(r"checkpoint-\d+(\.tmp)?|latest", n)]


def remove_earlier(args, state, keep):
    for name in set(state.pop("earlier", []) if is_main() else ()) - {keep, "latest" if keep else ""}:
        remove(os.path.join(args.output_dir, name))


def gather_lists(items):
    if not dist.is_initialized():
        return items
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def rank_state(generator, window):
    python, (name, keys, pos, has_gauss, gauss), cpu = global_streams()
    return {"python": python, "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "torch": cpu, "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
            "sampling": generator.get_state(), "sums": dict(window.sums), "counts": dict(window.counts)}


def save_checkpoint(policy, optimizer, scheduler, tokenizer, args, trainer_state, mine):
    """output_dir/checkpoint-{step}, complete before it takes its name; then `latest`. Rank 0 writes."""
    state_dict = full_state_dict(policy)
    if is_main() or isinstance(policy, FSDPModule):  # FSDP2: a collective; DDP: all ranks hold the same
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optimizer_state = get_optimizer_state_dict(policy, optimizer, options=options)
    ranks = gather_lists([mine | {"sums": {k: v.cpu() for k, v in mine["sums"].items()}}])
    step, earlier = trainer_state["step"], {"earlier": trainer_state.pop("earlier", [])}
    if not is_main():
        return f"checkpoint-{step}"
    name = f"checkpoint-{step}"
    try:
        with written_in_place(os.path.join(args.output_dir, name)) as tmp:
            write_model(policy, state_dict, tokenizer, args, tmp)
            torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict()}, f"{tmp}/optimizer.pt")
            torch.save(ranks, f"{tmp}/rank_states.pt")
            with open(f"{tmp}/trainer_state.json", "w") as f:
                json.dump(trainer_state, f, indent=2)
        replace_file(os.path.join(args.output_dir, "latest"), name)
    except (OSError, RuntimeError) as e:  # a full disk: torch.save raises RuntimeError
        raise TrainingError(f"could not write {name} ({why(e)}); the latest checkpoint is intact "
                            f"({latest_checkpoint(args)})") from None
    remove_earlier(args, earlier, name)
    steps = sorted(int(d[11:]) for d in os.listdir(args.output_dir) if re.fullmatch(r"checkpoint-\d+", d))
    for old in set(steps[: -args.save_total_limit] if args.save_total_limit else ()) - {step}:
        remove(os.path.join(args.output_dir, f"checkpoint-{old}"))
    return name


def load_checkpoint(path, policy, optimizer, scheduler, generator, rank, device):
    saved = torch.load(f"{path}/optimizer.pt", weights_only=True, mmap=True)
    set_optimizer_state_dict(policy, optimizer, saved["optimizer"], options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(saved["scheduler"])
    mine = torch.load(f"{path}/rank_states.pt", weights_only=True)[rank]
    name, keys, pos, has_gauss, gauss = mine["numpy"]
    set_global_streams((mine["python"], (name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss), mine["torch"]))
    if mine["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"])
    generator.set_state(mine["sampling"])
    state = read_json(f"{path}/trainer_state.json")
    say(f"resuming from {path} at step {state['step']}")
    return state, Window({k: v.to(device) for k, v in mine["sums"].items()}, mine["counts"])


def write_model(model, state_dict, tokenizer, args, directory, merge=False):
    """save_pretrained's layout, the tokenizer and the Args; refuses NaN/inf weights. --use_peft: the base weights
    (merge: W + (alpha / r) B A), and the adapters in peft's layout in adapter/."""
    tensors = state_dict if state_dict is not None else model.state_dict()
    if bad := [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]:
        raise TrainingError(f"refusing to save weights with NaN/inf ({', '.join(bad[:3])}...)")
    merged, scale = [], args.lora_alpha / args.lora_r  # merged: (W, B, A) per adapted layer
    if args.use_peft:
        adapter = {"base_model.model." + k: v.contiguous() for k, v in tensors.items() if ".lora_" in k}
        state_dict = {k: v for k, v in tensors.items() if ".lora_" not in k}
        merged = [(state_dict[k.replace("lora_A.", "")], tensors[k.replace("_A", "_B")], tensors[k])
                  for k in tensors if merge and k.endswith("lora_A.weight")]
        os.makedirs(where := os.path.join(directory, "adapter"))
        safetensors.torch.save_file(adapter, os.path.join(where, "adapter_model.safetensors"))
        replace_file(os.path.join(where, "adapter_config.json"), json.dumps(
            {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": args.model_name_or_path,
             "r": args.lora_r, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
             "target_modules": sorted({k.split(".")[-3] for k in adapter})}, indent=2))
    try:
        for w, b, a in merged:  # in place: no second copy of the weights (7B: 28 GB in fp32)
            w.addmm_(b, a, alpha=scale)
        model.save_pretrained(directory, state_dict=state_dict)
    finally:  # and back, to float rounding: the reference needs them
        for w, b, a in merged:
            w.addmm_(b, a, alpha=-scale)
    tokenizer.save_pretrained(directory)
    with open(f"{directory}/online_dpo_args.json", "w") as f:
        json.dump(asdict(args), f, indent=2)


def full_state_dict(model):
    if isinstance(model, FSDPModule):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return None


def save_final(policy, optimizer, scheduler, tokenizer, args, state, mine, plan):
    """The model into output_dir (unless every step was skipped); if that fails (a full disk), a checkpoint."""
    if state["nonfinite_steps"] + state["empty_steps"] >= plan.total:
        raise TrainingError(f"every one of the {plan.total} steps was skipped ({state['nonfinite_steps']} NaN/inf, "
                            f"{state['empty_steps']} with no preference): nothing to save")
    error, state_dict = None, full_state_dict(policy)
    try:
        if is_main():
            with written_in_place(args.output_dir, merge=True) as tmp:
                write_model(policy, state_dict, tokenizer, args, tmp, merge=True)
    except (OSError, RuntimeError) as e:
        error = why(e)
    if error := next(filter(None, gather_lists([error])), None):  # rank 0 wrote; every rank learns how
        try:
            where = f"they are in {save_checkpoint(policy, optimizer, scheduler, tokenizer, args, state, mine)}"
        except TrainingError:
            where = f"so did a checkpoint (the latest: {latest_checkpoint(args)})"
        raise TrainingError(f"could not write the trained model into {args.output_dir!r} ({error}); {where}")
    remove_earlier(args, state, "")


@contextlib.contextmanager
def written_in_place(path, merge=False):
    """Write at the yielded path, which then takes `path`'s place in one rename: old or new, never part."""
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
        if os.path.isdir(path):  # saved again after resuming from an earlier one
            remove(path)
        os.replace(tmp, path)


def replace_file(path, text):
    with written_in_place(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def remove(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def fsync_tree(path):  # a file, or a directory and its files, on disk
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


STOP: list[int] = []  # signals received in stop_signals()


@contextlib.contextmanager
def stop_signals():
    """SIGTERM and Ctrl-C go into STOP: the loop saves and exits after the step; a second kills."""
    def on_signal(signum, frame):
        if STOP:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        STOP.append(signum)

    STOP.clear()
    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield STOP
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


# ---- Sampling filters


def filter_logits(logits, top_k=0, top_p=1.0, min_p=None):
    """Logits outside top_k / top_p / min_p to -inf, in that order, by transformers' warpers (as generate())."""
    for warper in (top_k and TopKLogitsWarper(top_k), top_p < 1 and TopPLogitsWarper(top_p),
                   min_p and MinPLogitsWarper(min_p)):
        logits = warper(None, logits) if warper else logits
    return logits


# ---- The judges' mechanics

JUDGE_PROMPT = ("Which of the two responses below answers the request better: more helpful, accurate and harmless?\n\n"
                "Request:\n{prompt}\n\nResponse A:\n{response_a}\n\nResponse B:\n{response_b}\n\n"
                "Answer with one letter, A or B.")
JUDGE_WAIT_S = 30
# HTTP judge: requests in flight, seconds before a retry, retries (timeout, connection error, 429, 5xx). The key:
# $OPENAI_API_KEY (unset: none sent).
JUDGE_API_CONCURRENCY, JUDGE_API_TIMEOUT_S, JUDGE_API_RETRIES = 16, 60.0, 3


def as_text(x):  # as the judge reads it: `role: content` lines
    return "\n".join(f"{m['role']}: {m['content']}" for m in x) if is_conversational(x) else x


def judge_texts(template, prompts, first, second):
    """Each pair twice, to cancel position bias: (first as A, second as B) for all, then swapped."""
    fill = [dict(prompt=as_text(p), response_a=as_text(a), response_b=as_text(b))
            for p, a, b in zip(prompts, first, second)]
    swapped = [f | dict(response_a=f["response_b"], response_b=f["response_a"]) for f in fill]
    return [template.format(**f) for f in fill + swapped]


def judge_answer_ids(tokenizer):
    """The tokens A and B as an answer starts (after the assistant header, or 'Answer:')."""
    lead = "" if tokenizer.chat_template is not None else " "
    return [tokenizer.encode(lead + letter, add_special_tokens=False)[-1] for letter in "AB"]


@torch.no_grad()
def judge_locally(model, tokenizer, texts, answer_ids, batch_size):
    """One forward per question. -> q = P(A) / (P(A) + P(B)), mass = P(A) + P(B), (M,) each."""
    chat, p = tokenizer.chat_template is not None, []
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
             if chat else t + "\nAnswer:" for t in texts]
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, padding_side="left",
                          add_special_tokens=not chat).to(next(model.parameters()).device)
        logits = model(**batch, position_ids=positions(batch["attention_mask"]), use_cache=False,
                       logits_to_keep=1).logits[:, -1].float()
        p.append(logits.softmax(-1)[:, answer_ids])  # (b, 2)
    p = torch.cat(p)
    return p[:, 0] / p.sum(1).clamp(min=1e-30), p.sum(1)


def judge_over_http(texts, args):
    pool = concurrent.futures.ThreadPoolExecutor(JUDGE_API_CONCURRENCY)
    futures = [pool.submit(judge_request, text, args) for text in texts]
    start = noted = time.perf_counter()
    while (waiting := concurrent.futures.wait(futures, timeout=1.0).not_done) and not STOP:
        if time.perf_counter() - noted >= JUDGE_WAIT_S:  # a step waiting on the judge says why
            noted = time.perf_counter()
            say(f"waiting for the judge at {args.judge_api_base}: {len(futures) - len(waiting)} of {len(futures)} "
                f"answers in {noted - start:.0f} s (timeout: {JUDGE_API_TIMEOUT_S:g} s)")
    pool.shutdown(wait=False, cancel_futures=True)
    answers = [f.result() if f.done() and not f.cancelled() and f.exception() is None else None for f in futures]
    letters = [(a or "").strip() for a in answers]  # not exactly A or B, or none: invalid, never guessed
    q, mass = (torch.tensor([float(x in ok) for x in letters]) for ok in ("A", ("A", "B")))
    return q, mass, torch.tensor([a is None for a in answers])


def judge_request(text, args):
    key = os.environ.get("OPENAI_API_KEY")
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    body = json.dumps({"model": args.judge_api_model, "messages": [{"role": "user", "content": text}],
                       "temperature": 0, "max_tokens": 4}).encode()
    for attempt in range(JUDGE_API_RETRIES + 1):
        if attempt:
            time.sleep(min(0.25 * 2 ** attempt, 8.0) * (0.5 + random.Random().random()))  # not the saved stream
        try:
            request = urllib.request.Request(args.judge_api_base.rstrip("/") + "/chat/completions", body, headers)
            with urllib.request.urlopen(request, timeout=JUDGE_API_TIMEOUT_S) as response:
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
    """A trial question before any model loads: a wrong URL, model or key ends the run now."""
    say(f"asking the judge at {args.judge_api_base} a trial question")
    try:
        judge_request((args.judge_prompt or JUDGE_PROMPT).format(prompt="2 + 2?", response_a="4", response_b="5"), args)
    except Exception as e:
        raise UsageError(f"--judge_api_base {args.judge_api_base!r}: a trial question failed ({why(e)});"
                         " is it running? Check --judge_api_model and $OPENAI_API_KEY") from None


# ---- Evaluation


def held_out(args, test_set, rank, world):
    n = min(args.eval_prompts, len(test_set) if test_set is not None else 0) // world * world
    if args.eval_prompts and n == 0:
        say(f"no policy/reference comparison: no {args.dataset_test_split!r} split of {world}+ prompts")
    columns = test_set[rank * n // world : (rank + 1) * n // world] if n else {}
    return columns.pop(args.dataset_prompt_column, []), columns


def global_streams():  # Python, NumPy and torch: reward functions may draw
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def set_global_streams(streams):
    random.setstate(streams[0])
    np.random.set_state(streams[1])
    torch.set_rng_state(streams[2])


def answers(run, model, prompts, columns, seed):
    texts, scores, n = [], [], 2 * run.args.per_device_train_batch_size
    generator = torch.Generator(run.device).manual_seed(seed)
    for i in range(0, len(prompts), n):
        chunk = slice(i, i + n)
        samples = rollout(run, model, prompts[chunk], generator)
        texts += samples.texts
        scores += [math.nan] * len(samples.texts) if run.judged else score(
            run, prompts[chunk], samples, {k: v[chunk] for k, v in columns.items()}).tolist()
    return texts, torch.tensor(scores, dtype=torch.float64)


def evaluate(run, policy, ref, prompts, columns, reference):
    """Policy against reference on held-out prompts (a win 1, a tie 1/2). -> logs, records (all ranks')."""
    streams, seed = global_streams(), run.args.seed + 1 + run.rank
    if not reference:
        reference.extend(answers(run, ref, prompts, columns, seed))
    (ref_texts, ref_scores), (texts, scores) = reference, answers(run, policy, prompts, columns, seed + run.world)
    if run.judged:
        p, counted, decided, _ = (t.cpu() for t in judge(run, prompts, texts, ref_texts))
        wins = torch.where(decided, (p > 0.5).double(), 0.5)
    else:
        wins, counted = (scores > ref_scores) + 0.5 * (scores == ref_scores), ~(scores.isnan() | ref_scores.isnan())
    set_global_streams(streams)
    records = gather_lists([  # "prompt": the question asked
        {"prompt": pr[-1]["content"] if is_conversational(pr) else pr, "reference": rt, "reference_reward": float(rs),
         "trained": t, "trained_reward": float(s), "win": float(w) if c else math.nan}
        for pr, rt, rs, t, s, w, c in zip(prompts, ref_texts, ref_scores, texts, scores, wins, counted)])
    won = [r["win"] for r in records if not math.isnan(r["win"])]
    logs = {"eval/win_rate": sum(won) / len(won) if won else math.nan, "eval/judged": len(won) / len(records)}
    if not run.judged:
        logs |= {"eval/reward_reference": float(np.nanmean([r["reference_reward"] for r in records])),
                 "eval/reward_trained": float(np.nanmean([r["trained_reward"] for r in records]))}
    return logs, records


# ---- Logs, reports, the command line


class Log:
    """Rank 0's record: printed lines, metrics.jsonl, completions.jsonl, wandb (null for NaN)."""

    def __init__(self, args, plan, state, resumed):
        self.on, self.total, self.wandb, self.files, self.dir = is_main(), plan.total, None, {}, args.output_dir
        self.keep = state["step"] if resumed else None
        if self.on and args.report_to == "wandb":
            import wandb

            run = wandb.init(project=os.environ.get("WANDB_PROJECT", "online-dpo"), name=args.run_name,
                             config=asdict(args), id=state["wandb_id"], resume="allow" if state["wandb_id"] else None)
            state["wandb_id"], self.wandb = run.id, wandb
        self.bar = tqdm(total=plan.total, initial=state["step"], desc="online-dpo", dynamic_ncols=True,
                        disable=not self.on)

    def write(self, name, records):
        if name not in self.files:  # resumed: the lines up to its checkpoint stay
            path, kept = os.path.join(self.dir, name), []
            if self.keep is not None and os.path.exists(path):
                with open(path) as f:
                    for line in f:
                        with contextlib.suppress(ValueError):
                            kept += [line] if json.loads(line)["step"] <= self.keep else []
            replace_file(path, "".join(kept))
            self.files[name] = open(path, "a")
        for r in records:
            r = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()}
            self.files[name].write(json.dumps(r, allow_nan=False) + "\n")
        self.files[name].flush()

    def line(self, step, logs, records=None):
        if self.on:
            self.bar.write(f"step {step}/{self.total} " + " ".join(f"{k}={v:.4g}" for k, v in logs.items()))
            self.write("metrics.jsonl", [{"step": step, **logs}])
            if self.wandb:
                self.wandb.log(logs | ({"eval/completions": self.table(records)} if records else {}), step=step)

    def pairs(self, step, prompts, texts, pairs):
        records = [{"step": step, "prompt": as_text(prompts[i]), "chosen": texts[pairs.chosen[i]],
                    "rejected": texts[pairs.rejected[i]], "in_loss": bool(pairs.kept[i])}
                   | {k: float(v[i]) for k, v in pairs.logged.items()} for i in range(len(prompts))]
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


def cut(text, n=100):
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def before_after(records, show=4):
    """Some held-out prompts with both answers, both mean rewards, the win rate."""
    rewarded = ", reward in brackets" if not math.isnan(records[0]["reference_reward"]) else ""
    lines = [f"before (reference) / after (trained) on held-out prompts{rewarded}:"]
    for i, r in enumerate(records[:show]):
        lines.append(f"[{i + 1}] {cut(r['prompt'])}")
        for name in ("reference", "trained"):
            reward = "" if math.isnan(r[name + "_reward"]) else f"({r[name + '_reward']:+.2f})  "
            lines.append(f"    {name:9} {reward}{cut(r[name])}")
    if rewarded:
        a, b = (np.nanmean([r[k] for r in records]) for k in ("reference_reward", "trained_reward"))
        lines.append(f"mean reward over {len(records)} held-out prompts: reference {a:+.3f}, trained {b:+.3f}")
    if won := [r["win"] for r in records if not math.isnan(r["win"])]:
        lines.append(f"win rate of the trained policy over the reference: {sum(won) / len(won):.3f} on {len(won)} "
                     f"prompts (a tie counts 1/2)")
    return "\n".join(lines)


def push_to_hub(args):
    api, repo = huggingface_hub.HfApi(), args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    api.create_repo(repo, exist_ok=True)
    api.upload_folder(folder_path=args.output_dir, repo_id=repo, ignore_patterns=["checkpoint-*", "latest"])
    print(f"pushed to https://huggingface.co/{repo}")


def cli(argv=None):
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


def run(argv=None):
    """The command line: train, or end in one line `online_dpo.py: error: ...`. -> the exit code."""
    try:
        main(cli(argv))
        return 0
    except (UsageError, TrainingError, OSError) as e:
        where = f" (rank {os.environ['RANK']})" if "RANK" in os.environ else ""
        print(f"online_dpo.py: error{where}: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(run())
