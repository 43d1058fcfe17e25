"""The command line of online_dpo.py: flags (tyro, with TRL's `--flag True|False` booleans and presets), and the
run's end, every way it can end: one `online_dpo.py: error: ...` line and an exit code (1 after an error, 2 for a
flag, 128 + N for signal N before anything was saved), never a traceback."""

import contextlib
import io
import os
import re
import signal
import sys
from typing import Annotated

import torch.distributed as dist
import tyro
from tyro.constructors import PrimitiveConstructorSpec

from dpo_support import faults
from dpo_support.checkpoint import SAVED, latest_checkpoint, unlock_output_dir
from dpo_support.faults import TrainingError, UsageError
from dpo_support.ranks import say
from dpo_support import signals
from dpo_support.signals import SIGNALS, Stopped, on_signal, signal_exit


def _parse_bool(words):
    word = words[0].lower() if words else "true"  # a bare `--flag`: True
    if word not in ("true", "1", "yes", "false", "0", "no"):
        raise ValueError(f"expected True or False, got {words[0]!r}")
    return word in ("true", "1", "yes")


# Booleans take `--flag`, `--flag True` and `--flag False`, as in TRL's commands.
Bool = Annotated[bool, PrimitiveConstructorSpec(
    nargs=(0, 1), metavar="{True,False}", instance_from_str=_parse_bool, is_instance=lambda x: isinstance(x, bool),
    str_from_instance=lambda x: [str(x)])]


def parse(args_class, presets, argv=None, description=""):
    """The Args from the command line; a preset's values are defaults that later flags override."""
    argv = sys.argv[1:] if argv is None else list(argv)
    preset = None
    for i, word in enumerate(argv):
        if word == "--preset" and i + 1 < len(argv):
            preset = argv[i + 1]
        elif word.startswith("--preset="):
            preset = word.split("=", 1)[1]
    default = args_class()
    if preset in presets:  # tyro reports a bad name
        default = args_class(preset=preset, **presets[preset])
    return tyro.cli(args_class, args=argv, default=default, use_underscores=True,
                    config=(tyro.conf.FlagConversionOff,), description=description)


class FlagError(UsageError):
    """A flag the parser refuses: exit code 2, as argparse's."""


def parse_flags(cli, argv):
    """cli(argv), with the parser's box of lines as one line that keeps its suggestions."""
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


def run(main, cli, argv=None):
    """main(cli(argv)), ended every way in one line and an exit code: 1 after an error, 2 for a flag, 128 + N for
    signal N before anything was saved, else signal_exit()'s."""
    signals.reset()
    SAVED.clear()
    faults.EVERYWHERE.clear()
    handlers = {sig: signal.signal(sig, on_signal) for sig in SIGNALS}
    where = f" (rank {os.environ['RANK']})" if "RANK" in os.environ else ""
    for stream in (sys.stdout, sys.stderr):  # under LC_ALL=C, a prompt may not be ASCII
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    args = None
    try:
        args = parse_flags(cli, argv)
        main(args)
        return 0
    except (UsageError, TrainingError, OSError) as e:
        kept = f"; the trained model is saved in {SAVED[0]}" if SAVED else ""  # the closing comparison failed
        say_error(f"online_dpo.py: error{where}: {' '.join(str(e).splitlines())}{kept}")
        if faults.EVERYWHERE:  # none exits (torchrun stops the rest) before all said it
            dist.barrier()
        return 2 if isinstance(e, FlagError) else 1
    except RuntimeError as e:  # under torchrun: a collective broke off, as another rank ended
        if not (dist.is_initialized() and collective_broke(e)):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:200]
        say_error(f"online_dpo.py: error{where}: a collective across the ranks failed ({first}): another rank "
                  f"stopped or lost its connection (its own line says why); the latest checkpoint is intact "
                  f"({latest_checkpoint(args)})")
        return 1
    except SystemExit as e:  # --help, or the loop's stop after a signal, the step saved
        return 0 if e.code is None else e.code
    except (Stopped, KeyboardInterrupt) as e:
        signum = e.args[0] if isinstance(e, Stopped) else signal.SIGINT
        name = signal.Signals(signum).name
        if SAVED:
            say(f"stopped by {name} after the final save: the trained model is in {SAVED[0]}")
            return signal_exit([signum])
        say_error(f"online_dpo.py: error{where}: stopped by {name} before training began: nothing saved")
        return 128 + signum
    finally:
        unlock_output_dir()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if dist.is_initialized():
            dist.destroy_process_group()


def say_error(line):
    """The error line on stderr in one write: the ranks of a node share it, and two writes each (text, then the
    newline) would run their lines together."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):  # a stream in memory (the tests capture it)
        print(line, file=sys.stderr)
        return
    sys.stderr.flush()
    os.write(fd, (line + "\n").encode(sys.stderr.encoding or "utf-8", errors="backslashreplace"))


def collective_broke(error):
    """Whether a RuntimeError is a collective that failed because a peer went away (gloo's or NCCL's words)."""
    text = str(error)
    return isinstance(error, dist.DistError) or any(
        word in text for word in ("Connection closed", "Connection reset", "closed by peer", "gloo", "NCCL"))


def end_after_save(step, saved, halt, stop):
    """The loop's end after `step`, its checkpoint `saved`: a halt (persistent skipped steps) is an error; a
    signal exits with signal_exit()'s code."""
    if halt:
        raise TrainingError(f"{halt}; saved {saved}")
    say(f"stopped by a signal after step {step}; saved {saved}: go on with --resume_from_checkpoint latest")
    raise SystemExit(signal_exit(stop))
