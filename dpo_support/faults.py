"""What goes wrong in a run, and how it ends: the kinds of error that end in one `online_dpo.py: error: ...` line,
one rank's error raised on every rank, and the steps that are skipped and, when they persist, stop the run."""

import contextlib

import torch
import torch.distributed as dist

from dpo_support.ranks import gather_lists


class UsageError(ValueError):
    """Bad input: the message names it and says what to do."""


class TrainingError(RuntimeError):
    """Training cannot go on: the message says why and what to do."""


class FeedbackError(UsageError):
    """A reward function or the judge failed on the completions."""


USER_FAULTS = (Exception, SystemExit, KeyboardInterrupt)  # what user code may raise: a reward function's sys.exit() too


def why(e):
    """An exception as the error line shows it."""
    return f"{type(e).__name__}: {e}"


EVERYWHERE: list[str] = []  # all_or_none()'s error, raised on all ranks: they say it before any exits


@contextlib.contextmanager
def all_or_none(kind=FeedbackError):
    """Under torchrun, an error of `kind` (a class, or a tuple of them) on one rank is raised on all (the first one's
    line, as that class), which would wait in their next collective for the rank that ended. An error already raised
    on all (a nested block's) or of this rank alone (OutOfMemory(alone=True)) passes through."""
    error = None
    try:
        yield
    except kind as e:
        if not dist.is_initialized() or str(e) in EVERYWHERE or getattr(e, "alone", False):
            raise
        error = (type(e).__name__, str(e))
    if not dist.is_initialized():
        return
    raised = next(((name, f"{e} (on rank {r})") for r, (name, e) in enumerate(gather_lists([error or ("", "")]))
                   if e), None)
    if raised:
        EVERYWHERE.append(raised[1])
        kinds = kind if isinstance(kind, tuple) else (kind,)
        raise next((k for k in kinds if k.__name__ == raised[0]), kinds[0])(raised[1])


def resume_hint(saved):
    """What to do after a failure, given the checkpoint saved (or None)."""
    if saved:
        return f"saved {saved}: fix it, then resume with --resume_from_checkpoint latest"
    return "nothing saved"


# ---- Out of memory: one line naming the levers

class OutOfMemory(TrainingError):
    """An allocation failed in a step (host memory, or a GPU's). alone: where the other ranks may be waiting in a
    collective of a forward (FSDP2), so that the ranks cannot meet to agree: this rank ends alone."""

    def __init__(self, message, alone=False):
        super().__init__(message)
        self.alone = alone


LEVERS = ("lower --per_device_train_batch_size (or --generation_batch_size), --num_samples or --max_length, or keep "
          "--gradient_checkpointing on")
STEP_FAULTS = (FeedbackError, OutOfMemory)  # what a step may fail by, on all ranks together, the step before saved


def out_of_memory(error):
    """Whether `error` is an allocation failure: CUDA's out-of-memory, Python's MemoryError, or the CPU allocator's
    RuntimeError."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(error, TrainingError):  # ours, already worded
        return False
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def memory_line(error):
    """An allocation failure's line: what failed, and the levers."""
    first = (str(error).strip().splitlines() or [""])[0][:120]
    return f"out of memory ({type(error).__name__}: {first}); {LEVERS}"


@contextlib.contextmanager
def memory_named(alone=False):
    """An allocation failure in the block becomes OutOfMemory, whose line names the levers (alone: see OutOfMemory)."""
    try:
        yield
    except Exception as e:
        if not out_of_memory(e):
            raise
        raise OutOfMemory(memory_line(e), alone) from None
