"""Checkpoints, resume and the final save of online_dpo.py, and the files they are made of.

- Writes that land in one rename (written_in_place): a crash at any moment leaves the old file or the new one.
- One run at a time in an output_dir (lock_output_dir: an flock, freed at any exit).
- Resume: which checkpoint (resume_point), whole and of this run; what it restores (restore): the optimizer,
  schedule, data position, every random stream and the metrics since the last logged line, so that a resumed run
  is the uninterrupted one bit for bit.
- The run's state (trainer_state.json): the step, and the skipped steps that stop the run when they persist
  (count_steps).
- Checkpoints: what main() saves and when (Checkpoints), the trained model at the end, LoRA's adapters in peft's
  layout, and the Hub upload.
"""

import contextlib
import fcntl
import json
import math
import os
import random
import re
import shutil
import socket
from dataclasses import asdict

import huggingface_hub
import numpy as np
import safetensors
import safetensors.torch
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule

from dpo_support import faults
from dpo_support.faults import STEP_FAULTS, OutOfMemory, TrainingError, UsageError, all_or_none, resume_hint, why
from dpo_support.ranks import gather_lists, is_main, say
from dpo_support.signals import STOP, Stopped, writing

# ---- Writes that survive crashes


@contextlib.contextmanager
def written_in_place(path, merge=False):
    """A path that then replaces `path` in one rename (merge: file by file, into the directory `path`). The
    temporary is path.tmp beside it, or with merge path/.saving inside it: always within output_dir, which the run
    owns (and locks), so that no folder of the user's is ever written or removed."""
    tmp = os.path.abspath(path) + ".tmp"
    if merge:
        tmp = os.path.join(os.path.abspath(path), ".saving")
        os.makedirs(path, exist_ok=True)
    remove(tmp)  # left by a crash
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        remove(tmp)
        raise
    if merge:
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
        os.rmdir(tmp)
    else:
        if os.path.isdir(path):  # saved again after resuming from an earlier checkpoint
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


def fsync_tree(path):
    """A file, or a directory and its files, onto the disk."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def read_json(path):
    with open(path) as f:
        return json.load(f)


# ---- One run at a time in an output_dir

LOCK = []  # rank 0's open output_dir/.lock, locked until exit or run()'s end


def lock_output_dir(path):
    """An exclusive flock on path/.lock, naming its holder (freed at any exit). Returns None, or who
    holds it already."""
    unlock_output_dir()  # an earlier main() here (tests, benchmarks)
    f = open(os.path.join(path, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        return holder
    f.truncate(0)
    f.write(f"process {os.getpid()} on {socket.gethostname()}")
    f.flush()
    LOCK.append(f)
    return None


def unlock_output_dir():
    for f in LOCK:
        f.close()
    LOCK.clear()


# ---- Resume: which checkpoint, and what it restores

# Args that change neither completions nor updates: a resumed run may change them. And one memory lever that
# changes only which random numbers the samples draw (after an out-of-memory): generation_batch_size.
RESUMABLE_CHANGES = set("""preset output_dir resume_from_checkpoint overwrite_output_dir logging_steps save_steps
    save_total_limit eval_prompts report_to run_name push_to_hub hub_model_id bf16 gradient_checkpointing
    distributed prefix_sharing eval_steps judge_api_concurrency judge_api_timeout judge_api_retries
    torch_compile generation_batch_size""".split())
CHECKPOINT_FILES = ("trainer_state.json", "online_dpo_args.json", "config.json", "optimizer.pt", "rank_states.pt")
SEVERAL_NODES = "; several nodes need an --output_dir that all of them see"


def latest_checkpoint(args):
    """The path of the newest checkpoint in output_dir, or "none"."""
    with contextlib.suppress(OSError), open(os.path.join(args.output_dir, "latest")) as f:
        return os.path.join(args.output_dir, f.read().strip())
    return "none"


def checkpoint_steps(directory):
    return sorted(int(d[11:]) for d in os.listdir(directory) if re.fullmatch(r"checkpoint-\d+", d))


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
    there = ", ".join(f"checkpoint-{n}" for n in checkpoint_steps(out)) if os.path.isdir(out) else ""
    marker = os.path.join(out, "latest")
    if path == "latest" and os.path.isdir(marker):
        raise UsageError(f"--resume_from_checkpoint latest: {marker!r} is a directory, not the name of a checkpoint; "
                         f"give {out}/checkpoint-N (there: {there or 'none'})")
    if path == "latest" and latest != "none" and not os.path.isdir(latest):
        raise UsageError(f"--resume_from_checkpoint latest: {marker!r} names {os.path.basename(latest)}, which is "
                         f"gone; give {out}/checkpoint-N (there: {there or 'none'})")
    if path == "latest":
        path = latest
    if path == "none" and there:
        raise UsageError(f"--resume_from_checkpoint latest: {out!r} has no `latest`; give {out}/checkpoint-N "
                         f"(there: {there})")
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
    defaults = json.loads(json.dumps(asdict(type(args)())))  # a flag newer than the checkpoint: as if at its default
    here = json.loads(json.dumps(asdict(args)))
    differ = [f"--{k} is {saved.get(k, defaults[k])!r} there and {v!r} here" for k, v in here.items()
              if k not in RESUMABLE_CHANGES and saved.get(k, defaults[k]) != v]
    if ran_on["world_size"] != world:  # the data order and the random streams are per rank
        differ.append(f"it ran on {ran_on['world_size']} processes and this run has {world}")
    if differ:
        raise UsageError(f"--resume_from_checkpoint {path!r} belongs to another run: {'; '.join(differ)}")
    check_checkpoint_files(path, args)
    return path


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


def rank_state(generator, metrics):
    """This rank's random streams and the metric sums since the last logged line, for a resume."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()  # keys (uint32) are saved as int64
    numpy = (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)
    return {"python": random.getstate(), "numpy": numpy, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
            "sampling": generator.get_state(), "sums": dict(metrics.sums), "counts": dict(metrics.counts)}


def restore(path, saver, generator, rank, metrics):
    """Restore the optimizer and schedule (of `saver`, the run's Checkpoints), the random streams, the metric sums
    since the last logged line (into `metrics`), the reference's held-out answers. Returns trainer_state."""
    policy = saver.policy
    optimizer = saver.optimizer
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
    saver.scheduler.load_state_dict(saved["scheduler"])
    mine = torch.load(f"{path}/rank_states.pt", weights_only=True)[rank]
    name, keys, pos, has_gauss, gauss = mine["numpy"]
    random.setstate(mine["python"])
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(mine["torch"])
    if mine["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"])
    generator.set_state(mine["sampling"])
    saver.reference.extend(mine.get("reference", []))  # none in checkpoints before 12-03
    metrics.sums = {k: v.to(device) for k, v in mine["sums"].items()}
    metrics.counts = mine["counts"]
    state = read_json(f"{path}/trainer_state.json")
    say(f"resuming from {path} at step {state['step']}")
    return state


# ---- The run's state: trainer_state.json

def new_state(world):
    """trainer_state.json before step 1."""
    return dict(step=0, epoch=0.0, micro_batches_done=0, world_size=world, nonfinite_steps=0, empty_steps=0,
                wandb_id=None)


def progress(state, step, plan, args):
    """trainer_state after `step`."""
    return state | {"step": step, "epoch": step / plan.per_epoch,
                    "micro_batches_done": step * args.gradient_accumulation_steps}


MAX_EMPTY_STEPS = 5  # steps in a row in which no pair carried a preference: the run stops
MAX_NONFINITE_STEPS = 10  # steps in a row with a NaN/inf loss or gradient: the run stops
EMPTY_CAUSES = {  # why no pair was kept: the metric that counts it, and what it means
    "pairs/unscored": "no reward scored the completions (None or NaN)",
    "pairs/ties": "the samples tied",
    "judge/undecided": "the judge was undecided",
    "judge/invalid": "the judge gave no A or B (is it up?)",
}


def count_steps(state, status, step, args, metrics):
    """Count the skipped steps into trainer_state, in all and in a row (status from optimizer_step()); why the run
    must stop now, or None."""
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
        share = {k: float(metrics.sums[k]) / metrics.counts[k] for k in EMPTY_CAUSES if metrics.counts.get(k)}
        state["empty_cause"] = EMPTY_CAUSES[max(share, key=share.get)]
    if state["empty_in_a_row"] >= MAX_EMPTY_STEPS:
        return (f"no pair carried a preference in {MAX_EMPTY_STEPS} steps in a row (up to step {step}): "
                + state["empty_cause"])
    return None


# ---- Saving: checkpoints, the trained model, LoRA's adapters, the Hub

SAVED: list[str] = []  # output_dir, once the final save has written the model into it
# What a failed write raises: OSError (a full disk, a read-only mount), torch.save's RuntimeError,
# safetensors' SafetensorError.
WRITE_FAULTS = (OSError, RuntimeError, safetensors.SafetensorError)


class Checkpoints:
    """What main() saves: checkpoint-N (every --save_steps, after a signal or a halt, and the step before a failed
    reward or judge), and the trained model at the end. Rank 0 writes; under FSDP2 every rank gathers."""

    def __init__(self, args, plan, policy, optimizer, scheduler, tokenizer, ref, reference):
        self.args = args
        self.plan = plan
        self.policy = policy
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.ref = ref  # saved in reference/ with --sync_ref_model (TR-DPO has moved it)
        self.reference = reference  # the reference's held-out answers (evaluate()), filled in place

    def save(self, trainer_state, my_state):
        """output_dir/checkpoint-{step}, complete before it takes its name; then `latest`. `my_state`: this rank's
        rank_state()."""
        args = self.args
        policy = self.policy
        state_dict = full_state_dict(policy)
        ref_state = full_state_dict(self.ref) if args.sync_ref_model else None
        # FSDP2: a collective. DDP: rank 0 reads it, but reading an empty one (no update yet) takes a zero-lr
        # step, which every rank must take, or their step counts part.
        if is_main() or isinstance(policy, FSDPModule) or not self.optimizer.state:
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            optimizer_state = get_optimizer_state_dict(policy, self.optimizer, options=options)
        sums = {k: v.cpu() for k, v in my_state["sums"].items()}
        ranks = gather_lists([my_state | {"sums": sums, "reference": self.reference}])
        step = trainer_state["step"]
        earlier = {"earlier": trainer_state.pop("earlier", [])}
        name = f"checkpoint-{step}"
        with all_or_none(TrainingError), writing():  # rank 0's failed write stops all; a signal waits for it
            if is_main():
                try:
                    with written_in_place(os.path.join(args.output_dir, name)) as tmp:
                        write_model(policy, state_dict, self.tokenizer, args, tmp)
                        optimizer_pt = {"optimizer": optimizer_state, "scheduler": self.scheduler.state_dict()}
                        torch.save(optimizer_pt, f"{tmp}/optimizer.pt")
                        torch.save(ranks, f"{tmp}/rank_states.pt")
                        if args.sync_ref_model:
                            self.ref.save_pretrained(f"{tmp}/reference", state_dict=ref_state)
                        with open(f"{tmp}/trainer_state.json", "w") as f:
                            json.dump(trainer_state, f, indent=2)
                    replace_file(os.path.join(args.output_dir, "latest"), name)
                except WRITE_FAULTS as e:  # a full disk: torch.save raises RuntimeError, safetensors its own
                    raise TrainingError(f"could not write {name} ({why(e)}); the latest checkpoint is intact "
                                        f"({latest_checkpoint(args)})") from None
        if not is_main():
            return name
        remove_earlier(args, earlier, name)
        steps = checkpoint_steps(args.output_dir)
        too_old = steps[: -args.save_total_limit] if args.save_total_limit else []
        for old in set(too_old) - {step}:
            try:
                remove(os.path.join(args.output_dir, f"checkpoint-{old}"))
            except OSError as e:  # training goes on: only the disk fills
                say(f"note: could not remove checkpoint-{old} for --save_total_limit ({why(e)}); it stays, "
                    f"and {name} is written and intact")
        return name

    def on_failure(self, where, trainer_state, step, my_state):
        """A context (OnFailure) for a part of a step: its failure ends the run with one line naming `where`,
        after saving trainer_state at `step` with this rank's `my_state`."""
        return OnFailure(self, where, trainer_state, step, my_state)

    def save_final(self, trainer_state, my_state):
        """The trained model into output_dir; if that fails, a checkpoint, which the error names."""
        args = self.args
        plan = self.plan
        if trainer_state["nonfinite_steps"] + trainer_state["empty_steps"] >= plan.total:
            cause = ""
            if "empty_cause" in trainer_state:
                cause = f"; the last: {trainer_state['empty_cause']}"
            raise TrainingError(f"every one of the {plan.total} steps was skipped ({trainer_state['nonfinite_steps']}"
                                f" NaN/inf, {trainer_state['empty_steps']} with no preference{cause}): nothing to save")
        error = None
        state_dict = full_state_dict(self.policy)
        try:
            if is_main():
                with writing(), written_in_place(args.output_dir, merge=True) as tmp:  # a signal waits for it
                    write_model(self.policy, state_dict, self.tokenizer, args, tmp, merge=True)
        except WRITE_FAULTS as e:
            error = why(e)
        errors = [e for e in gather_lists([error]) if e]  # rank 0 wrote; every rank learns how that went
        if errors:
            try:
                where = f"they are in {self.save(trainer_state, my_state)}"
            except TrainingError:
                where = f"so did a checkpoint (the latest: {latest_checkpoint(args)})"
            raise TrainingError(f"could not write the trained model into {args.output_dir!r} ({errors[0]}); {where}")
        remove_earlier(args, trainer_state, "")
        SAVED.append(args.output_dir)
        if STOP:  # a signal during the save, which has finished
            raise Stopped(STOP[0])


class OnFailure:
    """A reward function, the judge or an allocation that fails in the block ends the run with an error naming
    `where`, after saving the step `step` (none before step 1): the point from which a resume is exact. Every rank
    saves together: so the failure must be on all of them (all_or_none), or there is one process. An allocation
    failure of this rank alone, under torchrun (in training, or in a sharded reward model's or judge's forward: where
    ranks cannot meet to agree), saves nothing: its line names the latest checkpoint, and torchrun stops the other
    ranks. Reusable, for each part of a step."""

    def __init__(self, saver, where, trainer_state, step, my_state):
        self.saver = saver
        self.where = where
        self.trainer_state = trainer_state
        self.step = step
        self.my_state = my_state

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if error is not None and faults.out_of_memory(error):
            error = OutOfMemory(faults.memory_line(error))
        if not isinstance(error, STEP_FAULTS):
            return False
        args = self.saver.args
        alone = isinstance(error, OutOfMemory) and dist.is_initialized() and (error.alone or not faults.EVERYWHERE)
        if alone:
            raise TrainingError(f"{self.where}: {error} (on rank {dist.get_rank()}); the latest checkpoint is intact "
                                f"({latest_checkpoint(args)})") from None
        saved = None
        if self.step > 0:
            state = progress(self.trainer_state, self.step, self.saver.plan, args)
            saved = self.saver.save(state, self.my_state)
        raise TrainingError(f"{self.where}: {error}; {resume_hint(saved)}") from None


def full_state_dict(model):
    """FSDP2: the whole model's weights, gathered onto the CPU (a collective); otherwise None."""
    if isinstance(model, FSDPModule):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return None


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


def save_adapter(tensors, directory, base_model, r, alpha, dropout):
    """The adapters of a state dict into `directory` in peft's layout (its PeftModel loads them); returns the base
    model's state dict."""
    adapter = {"base_model.model." + k: v.contiguous() for k, v in tensors.items() if ".lora_" in k}
    os.makedirs(directory)
    safetensors.torch.save_file(adapter, os.path.join(directory, "adapter_model.safetensors"))
    targets = sorted({k.split(".")[-3] for k in adapter})  # ...q_proj.lora_A.weight: q_proj
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": r,
              "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": targets}
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return {k: v for k, v in tensors.items() if ".lora_" not in k}


def load_adapter(model, directory):
    """The adapters saved by save_adapter into `directory` (a checkpoint's adapter/), into the model's."""
    adapter = safetensors.torch.load_file(os.path.join(directory, "adapter_model.safetensors"))
    model.load_state_dict({name.removeprefix("base_model.model."): w for name, w in adapter.items()}, strict=False)


@contextlib.contextmanager
def merged(base, tensors, scale):
    """The base weights of `base` (a state dict) with W + scale B A while in the block, the adapters from `tensors`:
    in place, so that there is no second copy of the weights (7B: 28 GB in fp32); then back, to float rounding."""
    layers = [(base[k.replace("lora_A.", "")], tensors[k.replace("_A", "_B")], tensors[k])
              for k in tensors if k.endswith("lora_A.weight")]
    for w, b, a in layers:
        w.addmm_(b, a, alpha=scale)
    try:
        yield
    finally:  # the reference needs the base weights
        for w, b, a in layers:
            w.addmm_(b, a, alpha=-scale)


def push_to_hub(args):
    """The trained model and tokenizer in output_dir to the Hub (--push_to_hub), checkpoints left out."""
    repo = args.hub_model_id
    if not repo:
        repo = os.path.basename(os.path.abspath(args.output_dir))
    api = huggingface_hub.HfApi()
    api.create_repo(repo, exist_ok=True)
    api.upload_folder(folder_path=args.output_dir, repo_id=repo, ignore_patterns=["checkpoint-*", "latest", ".lock"])
    print(f"pushed to https://huggingface.co/{repo}")
