"""Online DPO in one file: Online AI Feedback (Guo et al. 2024, arXiv 2402.04792).

Each step, for every prompt of the batch: sample K (2) completions from the *current* policy ->
reward models and/or functions score them, or an LLM judge compares them -> the better is "chosen",
the worse "rejected" -> DPO (sigmoid), IPO, hinge or robust loss against a reference model.

    python online_dpo.py --preset tiny        # the embedded offline world (later flags override it)
    torchrun --nproc_per_node 8 online_dpo.py --beta 0.1   # a process per GPU (DDP, or FSDP2)

Flags are spelled as in TRL's OnlineDPOConfig and TrainingArguments. Read main() first: its loop is
one step in numbered stages, and above it is everything a step runs, in the order it runs it. The
numerical kernels (fused log-probs, the compiled decode step) are in dpo_kernels/; the machinery a
first reading skips (checks, checkpoints and resume, the command line, the HTTP judge) is in
dpo_support/, and the loop marks its lines `# TRY NOT TO MODIFY`.
"""

import collections
import copy
import contextlib
import datetime
import functools
import json
import math
import os
import random
import sys
import time
import types
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, MinPLogitsWarper,
                          StaticCache, TopKLogitsWarper, TopPLogitsWarper, get_scheduler, set_seed)

from dpo_kernels import (CompiledDecoder, compile_problem, fp32_head, linear_logprobs,
                         naive_token_logprobs)
from dpo_support import checkpoint, checks, command_line, http_judge
from dpo_support.command_line import Bool
from dpo_support.faults import (STEP_FAULTS, USER_FAULTS, FeedbackError, TrainingError, UsageError, all_or_none,
                                memory_named, why)
from dpo_support.ranks import gather_lists, is_main, say
from dpo_support.signals import stop_signals

TINY_WORLD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmarks", "tiny")


# ---- Args and presets


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
    """reward models (sequence classifiers); None: trl-lib/Qwen2-0.5B-Reward, unless a judge"""
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
    """JSON dict for from_pretrained of the policy and reference: '{"attn_implementation": "sdpa"}'"""
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
    """linear layers to adapt, by name (q_proj v_proj ...); all-linear: all in the decoder blocks"""

    # --- online DPO (OnlineDPOConfig)
    beta: tuple[float, ...] = (0.1,)
    """KL strength (IPO: tau); several: one per epoch, the last for the rest"""
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    """sigmoid (DPO), ipo, hinge (SLiC) or robust (rDPO): see dpo_loss"""
    label_smoothing: float = 0.0
    """the chance that a preference is flipped, in [0, 0.5): cDPO with sigmoid; robust corrects it"""
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
    """a judgement P(first is better) within this of 0.5 is undecided: the pair leaves the loss"""
    judge_api_base: str | None = None
    """a judge over an OpenAI-compatible API: http://localhost:8000/v1 (vLLM); key: $OPENAI_API_KEY"""
    judge_api_model: str | None = None
    """model name for --judge_api_base"""
    judge_api_concurrency: int = 16
    """judge requests in flight at once"""
    judge_api_timeout: float = 60.0
    """seconds to wait for a judge's answer before retrying"""
    judge_api_retries: int = 3
    """retries of a judge request after a timeout, a connection error, a 429 or a 5xx"""
    prefix_sharing: Bool = True
    """each prompt once: a prefill for its K samples, a [prompt | chosen | rejected] row per pair"""

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
    generation_batch_size: int | None = None
    """prompts sampled together, a multiple of the batch size (None: a step's B x GA; GRPO's counts completions)"""
    num_train_epochs: float = 3.0
    """passes over the prompts (unless max_steps > 0)"""
    max_steps: int = -1
    """optimizer steps; overrides num_train_epochs when > 0"""
    logging_steps: float = 10
    """log every N steps, or a fraction of all if < 1"""
    save_steps: float = 500
    """save output_dir/checkpoint-N every N steps or fraction (0: the final save only)"""
    eval_steps: float = 0
    """every N steps (or fraction): the pairs into completions.jsonl, policy vs reference (0: end)"""
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
    """compile the policy's one-token decode step (torch.compile; on a GPU, CUDA graphs)"""
    report_to: Literal["none", "wandb"] = "none"
    """also send metrics to Weights & Biases (project: $WANDB_PROJECT or online-dpo)"""
    run_name: str | None = None
    """run name shown in wandb"""
    push_to_hub: Bool = False
    """upload the final model and tokenizer to the Hub"""
    hub_model_id: str | None = None
    """Hub repository for --push_to_hub; None: output_dir's name"""

    # The JSON flags, parsed once (checks.check_args refuses anything but a JSON object).
    @functools.cached_property
    def init_kwargs(self) -> dict:
        """--model_init_kwargs: from_pretrained's keyword arguments (policy and reference)."""
        return checks.json_dict(self.model_init_kwargs, "model_init_kwargs")

    @functools.cached_property
    def generation(self) -> dict:
        """--generation_kwargs: sampling settings over the flags of the same names."""
        return checks.json_dict(self.generation_kwargs, "generation_kwargs")


PRESETS = {
    # The embedded world (benchmarks/tiny_world.py): the reward likes
    # positive, short, ended answers.
    "tiny": dict(
        model_name_or_path=f"{TINY_WORLD}/policy", reward_model_path=(f"{TINY_WORLD}/reward",),
        dataset_name=f"{TINY_WORLD}/prompts", output_dir="tiny-OnlineDPO", use_cpu=True, bf16=False,
        gradient_checkpointing=False, max_new_tokens=64, max_length=128, learning_rate=1e-4,
        warmup_steps=0.1, per_device_train_batch_size=16, max_steps=150, logging_steps=10, save_steps=0),
    # The spec's quick start: the Args defaults.
    "qwen2-0.5b": dict(),
    # The spec's 1B TL;DR benchmark (it adds --push_to_hub).
    "pythia-1b-tldr": dict(
        model_name_or_path="trl-lib/pythia-1b-deduped-tldr-sft", dataset_name="trl-lib/tldr",
        reward_model_path=("trl-lib/pythia-1b-deduped-tldr-rm",),
        output_dir="pythia-1b-deduped-tldr-online-dpo", save_steps=0.1, per_device_train_batch_size=8,
        gradient_accumulation_steps=2, num_train_epochs=3, max_new_tokens=53, warmup_steps=0.1,
        missing_eos_penalty=1.0),
}


# ---- Setup: processes, devices, models (under torchrun rank 0 reads the weights and sends them)

# Ranks wait while rank 0 writes a checkpoint (7B: minutes): NCCL's default 10 would abort them.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)


def init_distributed(args):
    """Join torchrun's process group, one device per rank. Returns rank, world size, device."""
    checks.check_torchrun()  # its variables: all or none, whole numbers, ranks in order
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and not args.use_cpu
    if cuda and local_rank >= torch.cuda.device_count():
        raise UsageError(f"LOCAL_RANK {local_rank} but {torch.cuda.device_count()} GPUs: "
                         "lower --nproc_per_node")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None,
                                timeout=COLLECTIVE_TIMEOUT)
    return rank, world, device


def device_mesh(device_type):
    """FSDP2's mesh: the ranks; on several nodes (nodes, ranks per node), HSDP: shards within a
    node, replicas across, so that the layers' all-gathers stay on the node's fast links."""
    world = dist.get_world_size()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if per_node == world:
        return init_device_mesh(device_type, (world,))
    nodes = world // per_node
    return init_device_mesh(device_type, (nodes, per_node), mesh_dim_names=("replicate", "shard"))


def place(model, device, shard, mixed_precision=None):
    """Move the model to this rank's device or, with shard, split it over all ranks with FSDP2, a
    unit per decoder block, so that one block's weights are gathered at a time. Under torchrun rank
    0 alone has read the weights (load_model) and sends them to every rank (FSDP2: each its shards),
    then the buffers (rotary frequencies), which are in no state dict."""
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
        reshard = True if frozen else None
        fully_shard(model, mesh=mesh, mp_policy=mixed_precision, reshard_after_forward=reshard)
    if meta:
        model.to_empty(device=device)  # filled below
    elif not shard:
        model.to(device)
    if meta and not shard:  # to_empty unties them (FSDP2's does not)
        model.tie_weights()
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, whole, options=options)
    for buffer in model.buffers():
        dist.broadcast(buffer, 0)
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


def decoder_blocks(model):
    """The model's repeated blocks (Qwen2DecoderLayer, ...): FSDP2's units, and what LoRA adapts."""
    names = model._no_split_modules if getattr(model, "_no_split_modules", None) else []
    return [module for module in model.modules() if type(module).__name__ in names]


def load_model(auto_class, path, args, **kwargs):
    """from_pretrained, or on ranks above 0 the model's shape alone (on meta: place() sends rank 0's
    weights, so that a node holds one copy in RAM). Errors name the path."""
    # transformers >= 5.25 swaps layers for Hub kernels by default: fetched from the Hub, chosen for
    # the device the model loads on (the CPU here; meta, which they refuse, on ranks > 0). Off: the
    # model's own layers, as before.
    kwargs = {"use_kernels": False} | kwargs
    if not is_main():
        kwargs["device_map"] = "meta"
    try:
        model = auto_class.from_pretrained(path, trust_remote_code=args.trust_remote_code, **kwargs)
    except OSError as e:
        raise checks.unreachable("model", path, e) from None
    except Exception as e:  # corrupt weights, an argument the model refuses
        raise UsageError(f"could not load the model in {path!r}: {why(e)}") from None
    if not is_main():  # as from_pretrained does after reading weights
        model.tie_weights()
    return model


def wants_bf16(args, device):
    """--bf16; when it is not given, whether the device is a GPU that has bf16."""
    if args.bf16 is not None:
        return args.bf16
    cuda = device.type == "cuda"
    return cuda and torch.cuda.is_bf16_supported(including_emulation=False)  # emulated: slow


def load_policy(args, device, world, bf16, resume=None):
    """The policy (the checkpoint `resume`'s, if given) in fp32 (bf16 runs under autocast), and what
    the training forward goes through: DDP's wrapper (it averages gradients over ranks), or the policy."""
    kwargs = {"dtype": torch.float32} | args.init_kwargs
    policy = load_model(AutoModelForCausalLM, resume or args.model_name_or_path, args, **kwargs)
    # LoRA first, so that turning dropout off turns the adapters' off too (as TRL).
    if args.use_peft:
        add_lora(policy, args, resume)
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
        mixed_precision = MixedPrecisionPolicy(torch.bfloat16, reduce_dtype=torch.float32)
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
    bf16 = frozen["bf16"] and not args.sync_ref_model
    return load_frozen(AutoModelForCausalLM, path, **frozen | {"bf16": bf16}, **args.init_kwargs)


def load_reward_models(args, tokenizers, frozen):
    """Each --reward_model_path with its own tokenizer, as (model, tokenizer) pairs."""
    reward_models = []
    for path, tokenizer in zip(args.reward_model_path, tokenizers):
        # pad_token_id: where a sequence classifier finds each row's end, whose output is the score.
        model = load_frozen(AutoModelForSequenceClassification, path, **frozen, num_labels=1,
                            pad_token_id=tokenizer.pad_token_id)
        reward_models.append((model, tokenizer))
    return reward_models


def load_judge(args, tokenizer, frozen):
    """A local judge: its model, its tokenizer, the ids of "A" and "B" (None without one)."""
    if tokenizer is None:
        return None
    model = load_frozen(AutoModelForCausalLM, args.judge_model_path, **frozen)
    return model, tokenizer, judge_answer_ids(tokenizer)


# LoRA (--use_peft), peft's method without peft: y = W x + b + (alpha / r) B A dropout(x), W and b
# frozen, A (r, in) Kaiming-uniform, B (out, r) zeros, so that training starts at the policy.
# checkpoint.py writes the adapters in peft's layout (its PeftModel loads them) and merges them into
# the final save.


class LoRALinear(torch.nn.Linear):
    """nn.Linear plus a low-rank adapter: W x + b + (alpha / r) B A dropout(x). B starts at zero."""
    on = True  # False turns every adapter off at once (AdaptersOff)

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        if not LoRALinear.on:
            return out
        return out + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scale


def add_lora(model, args, resume=None):
    """Each nn.Linear of the decoder blocks named in --lora_target_modules (all-linear: every one)
    becomes a LoRALinear in place (same weights, same names), and all else is frozen; on a resume,
    the adapters saved."""
    names = set(args.lora_target_modules) - {"all-linear"}  # empty: every linear layer
    layers = []
    for block in decoder_blocks(model):
        for name, module in block.named_modules():
            if type(module) is torch.nn.Linear and (not names or name.split(".")[-1] in names):
                layers.append(module)
    if not layers:
        raise UsageError(f"--lora_target_modules {' '.join(names)}: no linear layer in the decoder blocks "
                         "is named so")
    model.requires_grad_(False)
    for layer in layers:
        kw = dict(bias=False, device=layer.weight.device, dtype=layer.weight.dtype)
        layer.__class__ = LoRALinear
        layer.scale = args.lora_alpha / args.lora_r
        layer.lora_dropout = torch.nn.Dropout(args.lora_dropout)
        layer.lora_A = torch.nn.Linear(layer.in_features, args.lora_r, **kw)
        layer.lora_B = torch.nn.Linear(args.lora_r, layer.out_features, **kw)
        torch.nn.init.zeros_(layer.lora_B.weight)
    if resume and is_main():  # to the others in place()
        checkpoint.load_adapter(model, os.path.join(resume, "adapter"))


class AdaptersOff(torch.nn.Module):
    """The reference under --use_peft: the policy, adapters off, in eval mode (no second copy)."""

    def __init__(self, policy):
        super().__init__()
        self.module = policy
        self.config = policy.config

    def forward(self, **kwargs):
        was_training = self.module.training
        LoRALinear.on = False
        try:
            return self.module.eval()(**kwargs)
        finally:
            LoRALinear.on = True
            self.module.train(was_training)


# Steps per epoch, in all, of warmup; how often to log, save and evaluate (0: never).
Plan = collections.namedtuple("Plan", "per_epoch total warmup log save eval")


def make_plan(args, n_prompts, world):
    """The run's steps (Plan), from the flags and the dataset's size."""
    B = args.per_device_train_batch_size
    GA = args.gradient_accumulation_steps
    per_epoch = n_prompts // (B * GA * world)
    if per_epoch == 0:
        raise UsageError(f"the dataset has {n_prompts} prompts but one optimizer step needs "
                         "per_device_train_batch_size x gradient_accumulation_steps x processes = "
                         f"{B} x {GA} x {world} = {B * GA * world}")
    total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * per_epoch)
    if args.sync_ref_model and args.ref_model_sync_steps > total:
        raise UsageError(f"--ref_model_sync_steps {args.ref_model_sync_steps} is more than the run's {total} steps: "
                         "the reference would never move; lower it, or drop --sync_ref_model")
    return Plan(per_epoch=per_epoch, total=total, warmup=steps_of(args.warmup_steps, total),
                log=max(1, steps_of(args.logging_steps, total)),
                save=steps_of(args.save_steps, total), eval=steps_of(args.eval_steps, total))


def steps_of(value, total):
    """A number of steps, as TrainingArguments reads one: below 1, a fraction of all steps."""
    return math.ceil(value * total) if 0 < value < 1 else int(value)


# ---- Prompts


def step_batches(dataset, args, plan, rank, world, start):
    """Yield this rank's prompts of each step (a dict of columns): its GA micro-batches of B prompts,
    in a row, from global micro-batch `start` on (a resumed run starts mid-epoch). Each epoch
    shuffles the prompts with a seed of its own; rank r takes the r-th B of each micro-step."""
    B = args.per_device_train_batch_size
    GA = args.gradient_accumulation_steps
    per_epoch = plan.per_epoch * GA  # micro-batches, on each rank
    first_epoch = start // per_epoch
    for epoch in range(first_epoch, math.ceil(plan.total / plan.per_epoch)):
        generator = torch.Generator().manual_seed(args.seed + epoch)
        order = torch.randperm(len(dataset), generator=generator).tolist()
        first_batch = start % per_epoch if epoch == first_epoch else 0
        for i in range(first_batch, per_epoch, GA):
            yield dataset[[order[((i + g) * world + rank) * B + b] for g in range(GA) for b in range(B)]]


def prompt_token_ids(tokenizer, prompts):
    """Each prompt's token ids, whole. A conversation (a list of {role, content} messages: checks.py
    has checked every row) goes through the chat template, with the assistant's turn opened so that
    the completion is the assistant's answer; one that ends with an assistant message (a prefill)
    has that message continued, as TRL does (continue_final_message)."""
    if isinstance(prompts[0], list) and tokenizer.chat_template is None:
        raise UsageError("conversational prompts need a tokenizer with a chat template; "
                         "this one has none")
    ids = tokenizer([prompt_text(tokenizer, prompt) for prompt in prompts], add_special_tokens=False)["input_ids"]
    if min(map(len, ids)) == 0:
        raise UsageError("a prompt is empty after tokenization")
    return ids


def prompt_text(tokenizer, prompt):
    """The text the policy continues: the prompt, or a conversation through the chat template."""
    if not isinstance(prompt, list):
        return prompt
    prefill = prompt[-1]["role"] == "assistant"
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=not prefill,
                                         continue_final_message=prefill)


def fit_prompts(tokenizer, prompts, limit):
    """Each prompt cut from the left to at most `limit` tokens (max_length - max_new_tokens), as text or
    as messages. The policy samples from these, and rewards and the judge are given these: the
    context that sampled a completion is the one that scores it."""
    lengths = [len(ids) for ids in prompt_token_ids(tokenizer, prompts)]
    fitted = []
    for prompt, length in zip(prompts, lengths):
        if length > limit:
            prompt = cut_left(prompt, lambda p: n_tokens(tokenizer, prompt_text(tokenizer, p)) <= limit)
        fitted.append(prompt)
    return fitted


def n_tokens(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def cut_left(prompt, fits):
    """The prompt without its first d characters, the fewest for which fits(prompt) holds (a binary
    search); a conversation loses its earliest text first, then its emptied messages, but never
    its last message."""
    lo = 0
    hi = len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(drop_left(prompt, mid)):
            hi = mid
        else:
            lo = mid + 1
    cut = drop_left(prompt, lo)
    if not fits(cut):  # the chat template (and a completion) alone are longer
        raise UsageError(f"a prompt cut to nothing is still over its token limit (a long chat template or "
                         f"completion; raise --max_length, or lower --max_new_tokens): {str(prompt)[:60]}...")
    return cut


def drop_left(prompt, d):
    """The prompt without its first d characters (across a conversation's messages)."""
    if isinstance(prompt, str):
        return prompt[d:]
    messages = []
    for i, message in enumerate(prompt):
        if d >= len(message["content"]) and i < len(prompt) - 1:
            d -= len(message["content"])  # dropped whole
            continue
        messages.append(message | {"content": message["content"][d:]})
        d = 0
    return messages


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


# ---- Sampling with a KV cache: the settings, the decode step, the filters, the draw, sample()


@dataclass
class Sampling:
    """How sample() draws: where a completion ends, and what is done to the logits before each
    token."""
    max_new_tokens: int
    stop_ids: list[int]  # a row ends at its first of these (EOS, end of turn)
    pad_id: int  # what follows a row's end
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    do_sample: bool = True  # False: greedy (the tests hold it to generate())
    suppress_tokens: list[int] | None = None  # never drawn


def sampling_settings(args, tokenizer, policy):
    """The sampling flags and --generation_kwargs over them; the stop ids default to the tokenizer's
    and the model's generation config's EOS ids."""
    generation = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                  "min_p": args.min_p, "repetition_penalty": args.repetition_penalty,
                  "do_sample": True, "suppress_tokens": None}
    generation |= args.generation
    eos = generation.pop("eos_token_id", None)
    if eos is None:
        configured = getattr(getattr(policy, "generation_config", None), "eos_token_id", None)
        if not isinstance(configured, list):
            configured = [configured]
        eos = sorted(i for i in {tokenizer.eos_token_id, *configured} - {None})
    if isinstance(eos, int):
        eos = [eos]
    return Sampling(max_new_tokens=args.max_new_tokens, stop_ids=list(eos),
                    pad_id=tokenizer.pad_token_id, **generation)


class Decoder:
    """How sample() runs its one-token decode steps: eagerly, with a fresh KV cache per call as wide
    as the batch's longest prompt plus T. --torch_compile swaps in dpo_kernels.CompiledDecoder,
    which compiles `step` and keeps its caches (make_decoder)."""
    check_every = 1  # tokens between the checks whether every row has stopped (a host sync)

    @staticmethod
    def step(model, token, mask, position_ids, cache):
        """One decode step: the next-token logits (N, V) after `token` (N,), whose keys and values
        the cache then holds too."""
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=position_ids,
                    cache=cache)
        return out.logits[:, -1]

    def width(self, model, prompt_len, max_new_tokens):
        """The columns of the KV cache and of the attention mask."""
        return prompt_len + max_new_tokens

    def decode_cache(self, model, cache, K):
        """The cache to decode from after the prefill of N prompts into `cache`: each prompt's keys
        and values copied to the rows of its K samples, N -> K*N."""
        if K > 1:
            for layer in cache.layers:
                layer.keys = layer.keys.repeat(K, 1, 1, 1)
                layer.values = layer.values.repeat(K, 1, 1, 1)
        return cache

    def __call__(self, model, token, mask, position_ids, cache):
        return self.step(model, token, mask, position_ids, cache)

    def stats(self):
        """What the log lines report of it (nothing, when eager)."""
        return {}


EAGER = Decoder()


def make_decoder(args, policy, device):
    """EAGER or, with --torch_compile, a CompiledDecoder unless the policy cannot be compiled (a
    line says why)."""
    if not args.torch_compile:
        return EAGER
    reason = compile_problem(policy)
    if reason:
        say(f"torch_compile: decoding eagerly, {reason}")
        return EAGER
    return CompiledDecoder(EAGER, policy, args.max_length, device, say)


def filter_logits(logits, top_k=0, top_p=1.0, min_p=None):
    """Set the logits outside top_k, then top_p, then min_p to -inf, with transformers'
    warpers, as generate() does."""
    if top_k:
        logits = TopKLogitsWarper(top_k)(None, logits)
    if top_p < 1:
        logits = TopPLogitsWarper(top_p)(None, logits)
    if min_p:
        logits = MinPLogitsWarper(min_p)(None, logits)
    return logits


def draw(probs, generator=None):
    """A token per row (N,) from probs (N, V) by the exponential race argmax(p / Exp(1)): how
    torch.multinomial draws one sample (the same tokens, the generator left in the same state),
    without multinomial's checks of its input, which make the host wait for the device at every
    token."""
    return (probs / torch.empty_like(probs).exponential_(generator=generator)).argmax(-1)


@torch.no_grad()
def sample(model, prompt_ids, prompt_mask, how, num_samples=1, generator=None, decoder=EAGER):
    """Sample K = num_samples completions of each of N prompts, all rows at once, over a KV cache,
    as `how` (a Sampling) says. Returns completion ids and mask (K*N, T), rows [all 1st samples,
    ..., all K-th samples]; each row ends at its first stop token, and padding follows it. `decoder`
    runs the one-token steps: EAGER, or compiled with --torch_compile."""
    N, P = prompt_ids.shape
    K = num_samples
    device = prompt_ids.device
    stop = torch.tensor(how.stop_ids, device=device)
    width = decoder.width(model, P, how.max_new_tokens)
    cache = StaticCache(config=model.config, max_cache_len=width)
    # One attention mask for the whole decode, (N, width): each new token opens the next column.
    mask = torch.cat([prompt_mask, prompt_mask.new_zeros(N, width - P)], 1)
    out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=positions(prompt_mask),
                cache=cache, logits_to_keep=1)
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
    penalty = how.repetition_penalty
    if penalty != 1.0:  # (N, V): the prompt's tokens (padding aside), then the completion's
        seen = torch.zeros(N, logits.size(-1), dtype=torch.bool, device=device)
        seen.scatter_(1, prompt_ids.where(prompt_mask.bool(), prompt_ids[:, -1:]), True)
    tokens = prompt_ids.new_full((N, how.max_new_tokens), how.pad_id)
    suppress = None
    if how.suppress_tokens:  # on the device once, not every token
        suppress = torch.tensor(how.suppress_tokens, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    for t in range(how.max_new_tokens):
        scores = logits.float()
        if seen is not None:  # as generate(): positive logits divided, negative ones multiplied
            penalised = torch.where(scores > 0, scores / penalty, scores * penalty)
            scores = torch.where(seen, penalised, scores)
        if suppress is not None:
            scores[:, suppress] = float("-inf")
        if how.do_sample:
            scores = filter_logits(scores / how.temperature, how.top_k, how.top_p, how.min_p)
            token = draw(scores.softmax(-1), generator)  # as multinomial, without its host syncs
        else:
            token = scores.argmax(-1)
        token = token.masked_fill(done, how.pad_id)  # (N,)
        tokens[:, t] = token
        done |= torch.isin(token, stop)
        if t == how.max_new_tokens - 1:
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
    return tokens.masked_fill(after_stop, how.pad_id)[:, :T], completion_mask[:, :T]


@dataclass
class Context:
    """What sampling, feedback and evaluation need, set up once in main() (ctx)."""
    args: Args
    tokenizer: object
    rank: int
    world: int
    device: torch.device
    autocast: torch.autocast  # bf16 matmuls, or a no-op
    sampling: Sampling
    reward_models: list  # (model, tokenizer) pairs
    reward_funcs: list
    local_judge: tuple | None  # a local judge: its model, its tokenizer, the ids of "A" and "B"
    packed: bool = False  # training packs each pair into one row (check_packing)
    judged: bool = False  # a judge compares the completions; rewards do not score them
    decoder: Decoder = EAGER  # the decode step: eager, or compiled (--torch_compile)
    reference: list = field(default_factory=list)  # its held-out answers and scores (evaluate())
    logprobs: str = "fused"  # how completion_logprobs computes: fused, or naive (logprobs_impl)
    trainer_state: object = None  # what reward functions get (trainer_state()), set each step


# What a training forward takes: prompts (left-padded) and completions (right-padded).
TrainingInputs = collections.namedtuple(
    "TrainingInputs", "prompt_ids prompt_mask completion_ids completion_mask")


@dataclass
class Samples:
    """K completions of each of B prompts, a row each, in the order [all 1st
    samples, ..., all K-th samples]."""
    prompts: list  # (B,) as sampled from: cut from the left to fit (fit_prompts)
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


def interleave(passes, k, pad_id):
    """The completion ids and masks of several passes of sample() (each (k*n, T) over n prompts) as
    one (k*N, T) in sample()'s row order over all N prompts, right-padded to the longest."""
    T = max(ids.size(1) for ids, _ in passes)
    pieces = [F.pad(t, (0, T - t.size(1)), value=v) for p in passes for t, v in zip(p, (pad_id, 0))]
    ids = [piece.unflatten(0, (k, -1)) for piece in pieces[0::2]]  # (k, n, T) each
    masks = [piece.unflatten(0, (k, -1)) for piece in pieces[1::2]]
    return torch.cat(ids, 1).flatten(0, 1), torch.cat(masks, 1).flatten(0, 1)


def rollout(ctx, model, prompts, generator, k=1, timing=None):
    """Sample k completions of each prompt from `model` as it is now, all at once or in passes of
    --generation_batch_size prompts. Prompts are cut from the left to max_length - max_new_tokens
    tokens (fit_prompts: Samples.prompts); the seconds spent go into timing.sampling_seconds."""
    args = ctx.args
    prompts = fit_prompts(ctx.tokenizer, prompts, args.max_length - args.max_new_tokens)
    ids, mask = encode_prompts(ctx.tokenizer, prompts, args.max_length - args.max_new_tokens)
    ids = ids.to(ctx.device)
    mask = mask.to(ctx.device)
    N = len(prompts)
    G = args.generation_batch_size or N
    was_training = model.training
    t0 = time.perf_counter()
    model.eval()
    # Prefix sharing: sample() prefills each prompt once for its k samples. Without it, each of k
    # copies of a prompt is prefilled as a prompt of its own.
    copies = 1 if args.prefix_sharing else k
    passes = []
    with gathered(model), ctx.autocast:
        for first in range(0, N, G):
            P = int(mask[first : first + G].sum(1).max())  # the pass's longest prompt: as if alone
            pass_ids = ids[first : first + G, -P:].repeat(copies, 1)
            pass_mask = mask[first : first + G, -P:].repeat(copies, 1)
            passes.append(sample(model, pass_ids, pass_mask, ctx.sampling, k // copies, generator, ctx.decoder))
    model.train(was_training)
    completion_ids, completion_mask = passes[0]
    if len(passes) > 1:  # rows [all 1st samples, ..., all k-th] of the N prompts, from each pass's
        completion_ids, completion_mask = interleave(passes, k, ctx.sampling.pad_id)
    if timing is not None:
        timing.sampling_seconds += time.perf_counter() - t0
    stop = torch.tensor(ctx.sampling.stop_ids, device=ctx.device)
    has_eos = (torch.isin(completion_ids, stop) & (completion_mask == 1)).any(1)
    rows = zip(completion_ids.cpu(), completion_mask.cpu())  # one host sync
    token_ids = [row[m.bool()].tolist() for row, m in rows]
    texts = ctx.tokenizer.batch_decode(token_ids, skip_special_tokens=True)
    completions = texts
    if isinstance(prompts[0], list):  # conversations: the completion is the assistant's message
        completions = [[{"role": "assistant", "content": text}] for text in texts]
    return Samples(prompts=prompts, prompt_ids=ids, prompt_mask=mask, completion_ids=completion_ids,
                   completion_mask=completion_mask, has_eos=has_eos, token_ids=token_ids,
                   texts=texts, completions=completions)


# ---- Feedback from rewards: reward models and reward functions score each completion


@torch.no_grad()
def score_completions(prompts, completions, completion_ids, extra_columns, reward_models,
                      reward_funcs, weights, when=""):
    """Each (prompt, completion)'s score: the weighted sum of every reward model and function, as in
    TRL, a NaN (None) counting 0; NaN if no reward scored it, which ranks last. Returns the scores
    (N,) and each reward (N, R)."""
    device = weights.device
    columns = []
    for model, tokenizer in reward_models:
        limit = getattr(model.config, "max_position_embeddings", None) or math.inf  # its own
        texts = [reward_text(tokenizer, p, c, limit) for p, c in zip(prompts, completions)]
        batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right",
                          add_special_tokens=False)
        with memory_named(alone=isinstance(model, FSDPModule)):  # FSDP2: other ranks wait in its forward
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


def reward_text(tokenizer, prompt, completion, limit):
    """What a reward model reads of a (prompt, completion): their text (a conversation through its
    chat template), re-encoded with its tokenizer; past its own limit of positions, with the prompt
    cut from the left and the completion whole."""
    def text(p):
        if isinstance(p, list):
            return tokenizer.apply_chat_template(conversation(p, completion), tokenize=False)
        return p + completion

    def fits(p):
        return n_tokens(tokenizer, text(p)) <= limit

    if limit < math.inf and not fits(prompt):
        prompt = cut_left(prompt, fits)
    return text(prompt)


def conversation(prompt, completion):
    """The conversation a reward model reads: the prompt's messages, then the completion's; a prefill
    (the prompt's last message, the assistant's) and its continuation as one assistant message."""
    if prompt[-1]["role"] == "assistant":
        answer = prompt[-1]["content"] + completion[0]["content"]
        return prompt[:-1] + [{"role": "assistant", "content": answer}]
    return prompt + completion


def reward_column(out, func, n, device):
    """A reward function's answer as a column (n,) of floats, None as NaN.
    Anything else names the function."""
    name = getattr(func, "__name__", repr(func))
    if not isinstance(out, (list, tuple)) or len(out) != n:
        raise FeedbackError(f"reward function {name} must return a list of {n} numbers (one per "
                            f"completion), got {type(out).__name__} {str(out)[:40]}")
    numbers = all(not isinstance(r, (str, bytes, bool)) for r in out)  # float() takes "1" and True
    try:
        values = [math.nan if r is None else float(r) for r in out]
    except (TypeError, ValueError):
        numbers = False
    if not numbers:
        raise FeedbackError(f"reward function {name} returned something that is not a number or None: "
                            f"{out[:4]}...")
    return torch.tensor(values, device=device)


def trainer_state(step, plan):
    """What reward functions get as trainer_state in step `step`, as TRL passes its TrainerState: the
    optimizer steps done, the epoch, the steps in all."""
    return types.SimpleNamespace(global_step=step - 1, epoch=(step - 1) / plan.per_epoch, max_steps=plan.total)


def score(ctx, samples, columns):
    """The K*N samples' scores (K*N,), less --missing_eos_penalty for each completion that has no
    stop token. Rewards take --generation_batch_size prompts' samples at a time (all, by default);
    columns: a value per sample."""
    N = len(samples.prompts)
    K = len(samples.texts) // N
    G = ctx.args.generation_batch_size or N
    n_rewards = len(ctx.reward_models) + len(ctx.reward_funcs)
    weights = torch.tensor(ctx.args.reward_weights or [1.0] * n_rewards, device=ctx.device)
    scores = torch.empty(K * N, device=ctx.device)
    for first in range(0, N, G):
        rows = [k * N + i for k in range(K) for i in range(first, min(first + G, N))]
        given = {k: [v[r] for r in rows] for k, v in columns.items()} | {"trainer_state": ctx.trainer_state}
        # A failure on one rank stops all before the next pass's forwards (FSDP2: collectives).
        with ctx.autocast, all_or_none(STEP_FAULTS), memory_named():  # (trainer_state: as in TRL)
            scores[rows], _ = score_completions([samples.prompts[r % N] for r in rows],
                                                [samples.completions[r] for r in rows],
                                                [samples.token_ids[r] for r in rows], given,
                                                ctx.reward_models, ctx.reward_funcs, weights)
    if ctx.args.missing_eos_penalty is not None:
        scores = scores - ctx.args.missing_eos_penalty * (~samples.has_eos).float()
    return scores


# ---- Feedback from an LLM judge (the paper's annotator)
# Each pair is asked in both orders, (A, B) then swapped, so that judge_decisions() can cancel a
# bias towards one position. A local judge's answer is read off one forward, not sampled: P(A) and
# P(B) as the answer's first token, so that q = P(A) / (P(A) + P(B)), and the mass P(A) + P(B) is
# low when the judge answers neither.

# --judge_prompt's default: the judge's question about each pair.
JUDGE_PROMPT = ("Which of the two responses below answers the request better: "
                "more helpful, accurate and harmless?\n\n"
                "Request:\n{prompt}\n\nResponse A:\n{response_a}\n\nResponse B:\n{response_b}\n\n"
                "Answer with one letter, A or B.")
JUDGE_MIN_MASS = 0.5  # P(A) + P(B) below this in either order: no answer A or B, an invalid pair


def as_text(x):
    """Text as the judge reads it: a conversation (a list of {role, content} messages) becomes
    `role: content` lines."""
    if isinstance(x, list):
        return "\n".join(f"{m['role']}: {m['content']}" for m in x)
    return x


def judge_texts(template, prompts, first, second):
    """Every pair as (A, B), then swapped: 2N questions."""
    fill = [dict(prompt=as_text(p), response_a=as_text(a), response_b=as_text(b))
            for p, a, b in zip(prompts, first, second)]
    swapped = [f | dict(response_a=f["response_b"], response_b=f["response_a"]) for f in fill]
    return [template.format(**f) for f in fill + swapped]


def judge_answer_ids(tokenizer):
    """The ids of A and B as an answer's first token (" A" after Answer: with no chat template)."""
    lead = "" if tokenizer.chat_template is not None else " "
    return [tokenizer.encode(lead + letter, add_special_tokens=False)[-1] for letter in "AB"]


@torch.no_grad()
def judge_locally(model, tokenizer, texts, answer_ids, batch_size):
    """One forward per question: q = P(A) / (P(A) + P(B)) and mass = P(A) + P(B), (M,) each."""
    chat = tokenizer.chat_template is not None
    if chat:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                               add_generation_prompt=True) for t in texts]
    else:
        texts = [t + "\nAnswer:" for t in texts]
    p = []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True,
                          padding_side="left", add_special_tokens=not chat)
        batch = batch.to(next(model.parameters()).device)
        position_ids = positions(batch["attention_mask"])  # left padding
        with memory_named(alone=isinstance(model, FSDPModule)):  # FSDP2: other ranks wait in its forward
            out = model(**batch, position_ids=position_ids, use_cache=False, logits_to_keep=1)
        logits = out.logits[:, -1].float()
        p.append(logits.softmax(-1)[:, answer_ids])  # (b, 2)
    p = torch.cat(p)
    return p[:, 0] / p.sum(1).clamp(min=1e-30), p.sum(1)


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


def ask_judge(ctx, prompts, first, second):
    """Ask the judge about each pair in both orders, a local model or one over HTTP
    (dpo_support/http_judge.py). Returns p, valid and decided (N,) as judge_decisions() does, and
    which of the 2N requests failed."""
    args = ctx.args
    texts = judge_texts(args.judge_prompt or JUDGE_PROMPT, prompts, first, second)
    if args.judge_api_base:  # a failed request makes its pair invalid
        q, mass, failed = http_judge.ask(texts, args)
    else:
        model, tokenizer, answer_ids = ctx.local_judge
        with ctx.autocast:
            batch_size = 2 * args.per_device_train_batch_size
            q, mass = judge_locally(model, tokenizer, texts, answer_ids, batch_size)
        failed = torch.zeros(len(texts), dtype=torch.bool)
    p, valid, decided = judge_decisions(q.to(ctx.device), mass.to(ctx.device), args.judge_undecided)
    return p, valid, decided, failed.to(ctx.device)


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
    scores: torch.Tensor | None  # (K*B,) every sample's score, NaN if unscored; None: a judge
    metrics: dict  # per-pair feedback metrics, pairs/* or judge/*
    logged: dict  # (B,) each, for completions.jsonl


def preferences(ctx, samples, columns):
    """Stages 3-4 for the K*B samples of B prompts: which completion of each prompt is chosen and
    which rejected. This is the one place that knows where preferences come from: a judge, or
    rewards (the best and the worst)."""
    args = ctx.args
    prompts = samples.prompts  # as sampled from
    B = len(prompts)
    if ctx.judged:
        p, valid, kept, failed = ask_judge(ctx, prompts, samples.texts[:B], samples.texts[B:])
        first = torch.arange(B, device=ctx.device)  # prompt i's first sample: row i, its second B + i
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
    scores = score(ctx, samples, columns)  # (K*B,)
    chosen, rejected, tie = pair(scores, args.num_samples, args.tie_threshold)
    unscored = scores[chosen].isnan()  # the best unscored: all of its prompt's samples are
    kept = ~unscored & ~(tie & args.drop_ties)
    return Pairs(chosen=chosen, rejected=rejected, kept=kept, scores=scores,
                 metrics={"pairs/ties": tie.float(), "pairs/unscored": unscored.float()},
                 logged={"score_chosen": scores[chosen], "score_rejected": scores[rejected]})


def count_kept(pairs):
    """The pairs a step keeps in the loss, summed over all ranks: what the loss divides by, so that
    each kept pair weighs the same whatever B, GA and the ranks."""
    kept = pairs.kept.sum()
    if dist.is_initialized():
        dist.all_reduce(kept)
    return kept


def micro_batch(samples, pairs, j, B):
    """Micro-batch j of a step (Samples of N = GA x B prompts, and their Pairs): its B prompts' K
    samples, in the same row order, with the padding all of them share trimmed (as if sampled
    alone), and their pairs, as rows of these."""
    N = len(samples.prompts)
    K = len(samples.texts) // N
    device = samples.completion_ids.device
    mine = torch.arange(j * B, (j + 1) * B, device=device)  # its prompts among the step's
    rows = (torch.arange(K, device=device)[:, None] * N + mine).flatten()  # (K*B,) their samples
    P = int(samples.prompt_mask[mine].sum(1).max())  # its longest prompt
    T = int(samples.completion_mask[rows].sum(1).max())  # its longest completion
    listed = rows.tolist()
    part = Samples(prompts=samples.prompts[j * B : (j + 1) * B], prompt_ids=samples.prompt_ids[mine, -P:],
                   prompt_mask=samples.prompt_mask[mine, -P:], completion_ids=samples.completion_ids[rows, :T],
                   completion_mask=samples.completion_mask[rows, :T], has_eos=samples.has_eos[rows],
                   token_ids=[samples.token_ids[r] for r in listed], texts=[samples.texts[r] for r in listed],
                   completions=[samples.completions[r] for r in listed])

    def local(step_rows):  # sample k of prompt p: row k*N + p of the step's, k*B + p - j*B of the part's
        picked = step_rows[j * B : (j + 1) * B]  # (B,) this micro-batch's prompts'
        return picked // N * B + picked % N - j * B

    scores = None if pairs.scores is None else pairs.scores[rows]
    return part, Pairs(chosen=local(pairs.chosen), rejected=local(pairs.rejected), kept=pairs.kept[j * B : (j + 1) * B],
                       scores=scores, metrics={}, logged={k: v[j * B : (j + 1) * B] for k, v in pairs.logged.items()})


# ---- Log-probs and loss


def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, impl="fused",
                        packed=False):
    """Per-token log-probs of the completions under `model`, (N, T), 0 on padding. fused: from the
    last hidden states and the output embedding, tile by tile (dpo_kernels/), so that no (tokens,
    vocabulary) logits exist; naive: from the logits (logprobs_impl() decides which a model takes).
    packed: a row per pair (training_rows())."""
    ids, mask, position_ids, row, column = training_rows(
        prompt_ids, prompt_mask, completion_ids, completion_mask, packed)
    inner = getattr(model, "module", model)  # DDP wraps the model; FSDP2 shards it in place
    if mask.dim() == 4:  # packed: additive, 0 where a query may look, the dtype's min elsewhere
        dtype = inner.dtype
        blocked = torch.finfo(dtype).min
        mask = torch.zeros(mask.shape, dtype=dtype, device=ids.device).masked_fill(~mask, blocked)
    real = completion_mask.bool()
    # (n,) for each real completion token: the row and column whose output predicts it, and the
    # token.
    row = row[real]
    column = column[real]
    targets = completion_ids[real]
    head = inner.get_output_embeddings()
    naive = impl == "naive"
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
        # head.weight is read after the forward: FSDP2's root keeps it gathered until the backward,
        # a frozen one gathers it again.
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
    column = torch.stack([P - 1 + t, torch.where(t == 0, P - 1, P + T - 1 + t)])  # (2, T)
    column = column.repeat_interleave(B, 0)  # (2B, T)
    return ids, mask[:, None], position_ids, row, column


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, loss_type,
             label_smoothing=0.0):
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
    if loss_type == "robust":  # rDPO (Chowdhury et al. 2024): unbiased for the clean loss
        return ((1 - eps) * right - eps * flipped) / (1 - 2 * eps)
    # DPO (Rafailov et al. 2023); with eps, cDPO (Mitchell 2023): the expected loss under that
    # chance
    return (1 - eps) * right + eps * flipped


# ---- Metrics and logging


@torch.no_grad()
def step_metrics(logps, ref_logps, completion_mask, pairs, samples, losses, beta):
    """Per-sample values of every logged metric, with TRL's names and formulas. KL, entropy and the
    RLHF reward are over the pairs' completions, whose log-probs logps and ref_logps (2B, T) hold
    (chosen, then rejected); scores, EOS and lengths over all K*B samples; rewards/* and logps/* over
    the pairs kept in the loss (losses: theirs). Score metrics average over the completions a reward
    scored (a reward may abstain with None), and a judge's run has none (pairs.scores None)."""
    B = len(pairs.kept)
    logp = (logps * completion_mask).sum(1)  # (2B,)
    ref_logp = (ref_logps * completion_mask).sum(1)
    kl = logp - ref_logp
    non_score_reward = -beta * kl
    chosen = torch.arange(B, device=logps.device)[pairs.kept]  # the kept pairs' rows among the 2B
    rejected = chosen + B
    reward_chosen = beta * (logp[chosen] - ref_logp[chosen])
    reward_rejected = beta * (logp[rejected] - ref_logp[rejected])
    scored = {}
    if pairs.scores is not None:
        scores = pairs.scores  # (K*B,)
        pair_scores = scores[torch.cat([pairs.chosen, pairs.rejected])]  # (2B,)
        rlhf_reward = pair_scores + non_score_reward
        margin = scores[pairs.chosen] - scores[pairs.rejected]  # (B,)
        scored = {"objective/rlhf_reward": rlhf_reward[~pair_scores.isnan()],
                  "objective/scores": scores[~scores.isnan()],
                  "objective/scores_margin": margin[~margin.isnan()],
                  "objective/scored": (~scores.isnan()).float()}
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
        "val/contain_eos_token": samples.has_eos.float(),  # (K*B,)
        "completions/mean_length": samples.completion_mask.sum(1).float(),
        "beta": torch.full((1,), float(beta), dtype=torch.float64, device=logps.device),
    }


@dataclass
class MetricSums:
    """What a logged line averages: sums and counts of per-sample metric values, and a clock. Two of
    them in main(): this_step (one step's, which the optimizer step checks) and since_log (the steps
    since the last line)."""
    sums: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    start: float = field(default_factory=time.perf_counter)
    sampling_seconds: float = 0.0  # in rollout()
    steps: int = 0

    def add(self, values, counts=None):
        """Add per-sample tensors, or with `counts`, another one's sums."""
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
        times = {"time/step": elapsed / self.steps,
                 "time/sampling": self.sampling_seconds / self.steps,
                 "time/tokens_per_s": tokens / elapsed}
        return means | extra | times


class Log:
    """Rank 0's record: lines, metrics.jsonl, completions.jsonl, wandb (NaN as null)."""

    def __init__(self, args, plan, state, resumed):
        self.args = args
        self.on = is_main()
        self.total = plan.total
        self.dir = args.output_dir
        self.files = {}  # name: the open file
        self.keep = state["step"] if resumed else None  # resumed: the lines up to its checkpoint stay
        self.ties_noted = args.drop_ties
        self.wandb = None
        if self.on and args.report_to == "wandb":
            import wandb

            project = os.environ.get("WANDB_PROJECT", "online-dpo")
            resume = "allow" if state["wandb_id"] else None
            wandb_run = wandb.init(project=project, name=args.run_name, config=asdict(args),
                                   id=state["wandb_id"], resume=resume)
            state["wandb_id"] = wandb_run.id
            self.wandb = wandb
        self.bar = tqdm(total=plan.total, initial=state["step"], desc="online-dpo", dynamic_ncols=True,
                        disable=not self.on)

    def write(self, name, records):
        try:
            self.append(name, records)
        except OSError as e:  # a full disk, a read-only mount: worded as a checkpoint's failed write
            latest = checkpoint.latest_checkpoint(self.args)
            raise TrainingError(f"could not write {name} ({why(e)}); the latest checkpoint is intact "
                                f"({latest})") from None

    def append(self, name, records):
        if name not in self.files:
            path = os.path.join(self.dir, name)
            kept = []
            if self.keep is not None and os.path.exists(path):
                with open(path) as f:
                    for line in f:
                        with contextlib.suppress(ValueError):  # a line cut short by a crash
                            if json.loads(line)["step"] <= self.keep:
                                kept.append(line)
            checkpoint.replace_file(path, "".join(kept))
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
            self.bar.write("note: every pair tied, so chosen and rejected were arbitrary: "
                           "--drop_ties leaves ties out of the loss")
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
    scheduler = get_scheduler(kind, optimizer, num_warmup_steps=plan.warmup,
                              num_training_steps=plan.total)
    return optimizer, scheduler


def optimizer_step(policy, optimizer, scheduler, args, this_step, stop):
    """Stage 7: clip, AdamW, schedule. Every rank skips the update if any rank's loss or gradient
    is NaN/inf or no rank kept a pair, so that replicas stay equal. Returns the gradient norm, the
    status (trained, nonfinite, empty; broken: the update made a weight NaN/inf), and whether any
    rank got a stop signal."""
    max_norm = args.max_grad_norm if args.max_grad_norm else float("inf")  # 0: the norm only
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
        grad_norm = grad_norm.full_tensor()
    nonfinite = ~torch.isfinite(this_step.sums["loss"]) | ~torch.isfinite(grad_norm)
    kept_and_stop = torch.tensor([this_step.counts["loss"] > 0, stop], device=grad_norm.device)
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
    """TR-DPO's soft update (Gorbatovski et al. 2024): ref = alpha * policy + (1 - alpha) * ref.
    Under FSDP2 both are sharded alike: each rank mixes its own shards."""
    for r, p in zip(ref.parameters(), policy.parameters(), strict=True):  # shaped alike (check_loading)
        r.copy_(alpha * p + (1 - alpha) * r)


# ---- Evaluation: the policy against the reference on held-out prompts


def held_out(args, test_set, tokenizer, rank, world):
    """This rank's share of the held-out prompts (equal shares), cut to fit as in training, and their
    other columns."""
    available = len(test_set) if test_set is not None else 0
    n = min(args.eval_prompts, available) // world * world
    if args.eval_prompts and n == 0:
        say(f"no policy/reference comparison: no {args.dataset_test_split!r} split of {world}+ prompts")
    columns = test_set[rank * n // world : (rank + 1) * n // world] if n else {}
    prompts = columns.pop(args.dataset_prompt_column, [])
    if prompts:
        prompts = fit_prompts(tokenizer, prompts, args.max_length - args.max_new_tokens)
    return prompts, columns


@contextlib.contextmanager
def streams_kept():
    """The global random streams (Python's, NumPy's, torch's; reward functions may draw from them)
    as they were before the block: an evaluation changes none of training's draws."""
    streams = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    try:
        yield
    finally:
        random.setstate(streams[0])
        np.random.set_state(streams[1])
        torch.set_rng_state(streams[2])


def answers(ctx, model, prompts, columns, seed):
    """An answer from `model` to each prompt, 2B at a time, and its score (NaN if judged)."""
    texts = []
    scores = []
    chunk_size = 2 * ctx.args.per_device_train_batch_size
    generator = torch.Generator(ctx.device).manual_seed(seed)
    for i in range(0, len(prompts), chunk_size):
        chunk = slice(i, i + chunk_size)
        with all_or_none(STEP_FAULTS), memory_named():  # a failure on one rank stops all, here
            samples = rollout(ctx, model, prompts[chunk], generator)
        texts += samples.texts
        if ctx.judged:
            scores += [math.nan] * len(samples.texts)
        else:
            scores += score(ctx, samples, {k: v[chunk] for k, v in columns.items()}).tolist()
    return texts, torch.tensor(scores, dtype=torch.float64)


def reference_answers(ctx, ref, prompts, columns):
    """The reference's answers to the held-out prompts and their scores, sampled once into
    ctx.reference (and checkpoints), before TR-DPO first moves it."""
    texts = ctx.reference[0] if ctx.reference else []
    if prompts and len(texts) != len(prompts):  # none yet, or resumed with another --eval_prompts
        with streams_kept():
            ctx.reference[:] = answers(ctx, ref, prompts, columns, ctx.args.seed + 1 + ctx.rank)
    return ctx.reference


def evaluate(ctx, policy, ref, prompts, columns):
    """The policy against the reference as it began, on held-out prompts, judged as in training (a
    tie counts 1/2). Returns the eval/* logs and all ranks' records."""
    with streams_kept():
        ref_texts, ref_scores = reference_answers(ctx, ref, prompts, columns)
        seed = ctx.args.seed + 1 + ctx.rank + ctx.world  # the reference's: seed + 1 + rank
        texts, scores = answers(ctx, policy, prompts, columns, seed)
        if ctx.judged:
            p, counted, decided, _ = (t.cpu() for t in ask_judge(ctx, prompts, texts, ref_texts))
            wins = torch.where(decided, (p > 0.5).double(), 0.5)
        else:
            wins = (scores > ref_scores) + 0.5 * (scores == ref_scores)
            counted = ~(scores.isnan() | ref_scores.isnan())
    mine = []
    for i, prompt in enumerate(prompts):
        question = prompt[-1]["content"] if isinstance(prompt, list) else prompt
        mine.append({"prompt": question, "reference": ref_texts[i],
                     "reference_reward": float(ref_scores[i]), "trained": texts[i],
                     "trained_reward": float(scores[i]), "win": float(wins[i]) if counted[i] else math.nan})
    records = gather_lists(mine)
    won = [r["win"] for r in records if not math.isnan(r["win"])]
    win_rate = sum(won) / len(won) if won else math.nan
    logs = {"eval/win_rate": win_rate, "eval/judged": len(won) / len(records)}
    if not ctx.judged:
        logs["eval/reward_reference"] = float(np.nanmean([r["reference_reward"] for r in records]))
        logs["eval/reward_trained"] = float(np.nanmean([r["trained_reward"] for r in records]))
    return logs, records


def cut(text, n=100):
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def before_after(logs, records, show=4):
    """The report at the end: held-out prompts, both answers, the mean rewards, the win rate
    (evaluate())."""
    rewarded = ", reward in brackets" if not math.isnan(records[0]["reference_reward"]) else ""
    lines = [f"before (reference) / after (trained) on held-out prompts{rewarded}:"]
    for i, r in enumerate(records[:show]):
        lines.append(f"[{i + 1}] {cut(r['prompt'])}")
        for name in ("reference", "trained"):
            reward = "" if math.isnan(r[name + "_reward"]) else f"({r[name + '_reward']:+.2f})  "
            lines.append(f"    {name:9} {reward}{cut(r[name])}")
    if rewarded:
        lines.append(f"mean reward over {len(records)} held-out prompts: "
                     f"reference {logs['eval/reward_reference']:+.3f}, trained {logs['eval/reward_trained']:+.3f}")
    if logs["eval/judged"]:
        lines.append(f"win rate of the trained policy over the reference: {logs['eval/win_rate']:.3f} on "
                     f"{round(logs['eval/judged'] * len(records))} prompts (a tie counts 1/2)")
    return "\n".join(lines)


# ---- main(): set up, then the training loop


def main(args):
    """Train, and return the policy (sharded under FSDP2). Under torchrun every rank runs this."""
    this_file = sys.modules[__name__]  # the checks' trials run the step's own code (checks.py)
    # 0. Check before any model loads: flags, files, data, models, rewards, the judge (checks.py).
    checks.check_args(args)
    rank, world, device = init_distributed(args)  # a process per device; rank 0 prints and writes
    with all_or_none(UsageError):  # TRY NOT TO MODIFY: one rank that cannot read a file stops all
        inputs = checks.check_inputs(args, world, this_file)  # its trials run this file's code
        plan = make_plan(args, len(inputs.dataset), world)
    checkpoint.check_same_resume(inputs.resume)  # TRY NOT TO MODIFY: all ranks, one checkpoint
    resume = inputs.resume  # the checkpoint to continue from, or None
    tokenizer = inputs.tokenizer
    B = args.per_device_train_batch_size  # a step: GA micro-batches of B prompts, K samples each
    GA = args.gradient_accumulation_steps
    K = args.num_samples
    set_seed(args.seed)  # Python's, NumPy's and torch's streams, which reward functions may use
    bf16 = wants_bf16(args, device)

    # 1. Models: the policy (or its checkpoint), the reference, the reward models or the judge.
    policy, train_model = load_policy(args, device, world, bf16, resume)
    shard = world > 1 and args.distributed == "fsdp"  # FSDP2 shards the frozen models too
    frozen = dict(args=args, device=device, shard=shard, bf16=bf16)
    ref = load_reference(args, policy, resume, frozen)
    reward_models = load_reward_models(args, inputs.reward_tokenizers, frozen)
    local_judge = load_judge(args, inputs.judge_tokenizer, frozen)  # a local judge, or None
    ctx = Context(args=args, tokenizer=tokenizer, rank=rank, world=world, device=device,
                  autocast=torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16),
                  sampling=sampling_settings(args, tokenizer, policy), reward_models=reward_models,
                  reward_funcs=inputs.reward_funcs, local_judge=local_judge,
                  packed=checks.check_packing(args, this_file, policy, ref),  # trials: a 4D mask?
                  judged=bool(args.judge_model_path or args.judge_api_base),
                  decoder=make_decoder(args, policy, device),  # eager, or compiled
                  logprobs=checks.logprobs_impl(this_file, policy, ref),  # the model's own logits?
                  trainer_state=trainer_state(1, plan))
    say(feedback_line(args))
    generator = torch.Generator(device).manual_seed(args.seed + rank)  # each rank samples its own
    optimizer, scheduler = make_optimizer(policy, args, plan)
    saver = checkpoint.Checkpoints(args, plan, policy, optimizer, scheduler, tokenizer, ref, ctx.reference)
    state = checkpoint.new_state(world)  # what trainer_state.json holds
    since_log = MetricSums()  # the metrics since the last logged line
    if resume:  # TRY NOT TO MODIFY: the optimizer, schedule, data position, streams, metric sums
        state = checkpoint.restore(resume, saver, generator, rank, since_log)
    checkpoint.start_output_dir(args, resume, state)
    log = Log(args, plan, state, resume is not None)
    eval_prompts, eval_columns = held_out(args, inputs.test_set, tokenizer, rank, world)
    data = step_batches(inputs.dataset, args, plan, rank, world, state["micro_batches_done"])

    with stop_signals() as signals, log.bar:  # TRY NOT TO MODIFY: a signal waits for the step's end
        for step in range(state["step"] + 1, plan.total + 1):
            beta = args.beta[min((step - 1) // plan.per_epoch, len(args.beta) - 1)]  # one per epoch
            ctx.trainer_state = trainer_state(step, plan)  # what reward functions see, as in TRL
            this_step = MetricSums()
            batch = next(data)  # the step's GA micro-batches of B prompts, in a row, and columns
            prompts = batch.pop(args.dataset_prompt_column)
            before = checkpoint.rank_state(generator, since_log)  # TRY NOT TO MODIFY: a failing
            failure = saver.on_failure(f"step {step}", state, step - 1, before)  # step saves the one before

            # 2-4. Sample K completions per prompt from the policy as it is now, the step's prompts at once
            # (or --generation_batch_size at a time), (K*GA*B, T); feedback, pairs: each prompt's best and
            # worst sample, or the judge's pick. A failure on one rank stops all (after decoding, each pass).
            with failure, all_or_none(STEP_FAULTS), memory_named():
                samples = rollout(ctx, policy, prompts, generator, K, since_log)
            with failure, all_or_none(STEP_FAULTS), memory_named():
                pairs = preferences(ctx, samples, {k: v * K for k, v in batch.items()})
            kept_in_step = count_kept(pairs)  # on all ranks

            with failure:  # out of memory in training (under torchrun: this rank alone, none saved)
                for micro_step in range(GA):
                    # 5. Log-probs of a micro-batch's pairs' completions, policy (with grad), reference.
                    micro_samples, micro_pairs = micro_batch(samples, pairs, micro_step, B)
                    pick = torch.cat([micro_pairs.chosen, micro_pairs.rejected])  # (2B,) rows
                    if isinstance(train_model, DDP):  # all-reduce in the last micro-step's backward
                        train_model.require_backward_grad_sync = micro_step == GA - 1  # (FSDP2: all)
                    train_inputs = micro_samples.training_inputs(pick, ctx.packed)
                    how = dict(impl=ctx.logprobs, packed=ctx.packed)
                    with ctx.autocast:
                        logps = completion_logprobs(train_model, *train_inputs, **how)  # (2B, T)
                        with torch.no_grad():
                            ref_logps = completion_logprobs(ref, *train_inputs, **how)

                    # 6. Loss: per pair (dpo_loss, plus RPO's term), summed over the pairs kept,
                    # over the step's kept pairs on all ranks: each weighs the same whatever B, GA
                    # and ranks (x world: the ranks' gradients are averaged). None kept: 0.
                    logp = logps.sum(1)  # (2B,) each completion's log-prob
                    ref_logp = ref_logps.sum(1)
                    losses = dpo_loss(logp[:B], logp[B:], ref_logp[:B], ref_logp[B:], beta,
                                      args.loss_type, args.label_smoothing)  # (B,)
                    kept = micro_pairs.kept
                    parts = {}
                    if args.rpo_alpha is not None:  # RPO (Pang et al. 2024): + alpha x chosen's NLL
                        nll = args.rpo_alpha * -logp[:B] / train_inputs.completion_mask[:B].sum(1)
                        parts = {"loss/dpo": losses[kept].detach(), "loss/nll": nll[kept].detach()}
                        losses = losses + nll
                    loss = torch.where(kept, losses, 0.0).sum() * world / kept_in_step.clamp(min=1)
                    loss.backward()
                    metrics = step_metrics(logps.detach(), ref_logps, train_inputs.completion_mask,
                                           micro_pairs, micro_samples, losses[kept], beta)
                    this_step.add(metrics | parts)
            this_step.add(pairs.metrics)  # the step's ties and unscored, after the pairs' metrics

            # 7. Optimizer step: clip, AdamW, schedule; skipped on all ranks for NaN/inf or no pair.
            learning_rate = scheduler.get_last_lr()[0]  # this step's, which HF's trainer logs
            stop_asked = bool(signals)
            grad_norm, status, stopping = optimizer_step(policy, optimizer, scheduler, args, this_step, stop_asked)
            halt = checkpoint.count_steps(state, status, step, args, this_step)  # TRY NOT TO MODIFY
            if args.sync_ref_model and step % args.ref_model_sync_steps == 0:  # TR-DPO: ref moves
                reference_answers(ctx, ref, eval_prompts, eval_columns)  # evaluate(): the first
                mix_reference(ref, policy, args.ref_model_mixup_alpha)
                log.line(step, {"ref_model_sync": 1})
            if status != "nonfinite":
                since_log.add(this_step.sums, this_step.counts)
            since_log.steps += 1
            log.bar.update(1)

            # 8. Log (means over all ranks since the last line), the pairs, evaluate, checkpoint.
            if step % plan.log == 0 or step == plan.total or halt:
                log.line(step, since_log.means(
                    learning_rate=learning_rate, grad_norm=float(grad_norm),
                    epoch=step / plan.per_epoch, nonfinite_steps=state["nonfinite_steps"],
                    empty_steps=state["empty_steps"], **ctx.decoder.stats()))
                since_log = MetricSums()
            if plan.eval and step % plan.eval == 0:  # the last micro-batch's pairs; policy vs ref
                log.pairs(step, micro_samples.prompts, micro_samples.texts, micro_pairs)
                where = f"step {step}, in the comparison with the reference"
                now = checkpoint.rank_state(generator, since_log)
                with saver.on_failure(where, state, step, now):  # TRY NOT TO MODIFY: saves this step
                    if step < plan.total and eval_prompts:
                        log.line(step, *evaluate(ctx, policy, ref, eval_prompts, eval_columns))
            if (plan.save and step % plan.save == 0 and step < plan.total) or stopping or halt:
                state = checkpoint.progress(state, step, plan, args)
                saved = saver.save(state, checkpoint.rank_state(generator, since_log))
            if halt or stopping:  # TRY NOT TO MODIFY: the run ends here, this step saved
                log.close()
                del train_model  # DDP's reducer goes now: freed at exit, it can deadlock gloo
                command_line.end_after_save(step, saved, halt, signals)

        # 9. Save the policy for from_pretrained(output_dir).
        done = checkpoint.progress(state, plan.total, plan, args)
        saver.save_final(done, checkpoint.rank_state(generator, since_log))
    say(f"saved the trained model to {args.output_dir}")

    # 10. Before / after: the reference and the trained policy answer the same held-out prompts.
    if eval_prompts:
        logs, records = evaluate(ctx, policy, ref, eval_prompts, eval_columns)
        log.line(plan.total, logs, records)
        say(before_after(logs, records))
    log.close()
    if args.push_to_hub and is_main():
        checkpoint.push_to_hub(args)
    return policy


# ---- The command line (dpo_support/command_line.py): every failure one line and an exit code


def cli(argv=None):
    """The Args from the command line: a preset's values are defaults that later flags override."""
    return command_line.parse(Args, PRESETS, argv, description=__doc__.split("\n\n")[0])


def run(argv=None):
    """main() from the command line. Returns the exit code: 0, 1 after an error, 2 for a flag, 128 +
    N for signal N before anything was saved."""
    return command_line.run(main, cli, argv)


if __name__ == "__main__":
    sys.exit(run())
