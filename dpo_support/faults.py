"""What goes wrong in a run, and how it ends: the kinds of error that end in one `online_dpo.py: error: ...` line,
one rank's error raised on every rank, and the steps that are skipped and, when they persist, stop the run."""

import contextlib

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
