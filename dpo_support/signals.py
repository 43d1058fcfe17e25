"""SIGTERM (preemption, scancel), SIGINT (Ctrl-C) and SIGHUP (a closed terminal): one request to stop, however many
signals carry it.

Inside stop_signals() (the training loop, the final save) the first signal waits in STOP until the step is done and
saved, and one line says so. Signals within SAME_REQUEST_S of it are the same request: torchrun sends its ranks
SIGTERM right after the SIGINT of a key press, and a double press is no second thought. A signal after that stops the
run at once, without a checkpoint, but never in the middle of a checkpoint's or the final save's write (writing()):
that write finishes first. Outside stop_signals() the first signal raises Stopped and the run ends where it is
(command_line.run() says what was saved); later ones change nothing.
"""

import contextlib
import os
import signal
import sys
import time

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # preemption or scancel, Ctrl-C, a closed terminal
SAME_REQUEST_S = 2.0  # a signal this soon after the first one is the same request
STOP: list[int] = []  # the request's first signal
FIRST: list[float] = []  # when it came (time.monotonic())
WRITES: list[bool] = []  # a checkpoint or the final save being written (writing())
FORCED: list[int] = []  # a signal that stops the run at once, waiting for that write


class Stopped(BaseException):  # as KeyboardInterrupt: `except Exception` lets it through
    """A signal outside stop_signals(): the run ends where it is."""


DEFER = False  # True inside stop_signals()


def tell(text):
    """One line on stderr; a closed terminal (SIGHUP) cannot take it, which changes nothing."""
    with contextlib.suppress(OSError, ValueError):
        print(text, file=sys.stderr, flush=True)


def on_signal(signum, frame):
    """The handler of SIGNALS (see the module's docstring)."""
    now = time.monotonic()
    if STOP and (now - FIRST[0] < SAME_REQUEST_S or not DEFER):
        return  # the same request, or the run is ending already
    if not STOP:
        STOP.append(signum)
        FIRST.append(now)
        if not DEFER:
            raise Stopped(signum)
        if os.environ.get("RANK", "0") == "0":
            again = "press Ctrl-C again" if signum == signal.SIGINT else f"send {signal.Signals(signum).name} again"
            tell(f"online_dpo.py: {signal.Signals(signum).name}: stopping after this step, with a checkpoint; to stop "
                 f"at once, without one, {again} after {SAME_REQUEST_S:g} s")
        return
    if WRITES:
        FORCED.append(signum)
        return
    stop_at_once(signum, waited=False)


def stop_at_once(signum, waited):
    """A second request: end the process by the signal itself, saying what is intact."""
    name = signal.Signals(signum).name
    where = f" (rank {os.environ['RANK']})" if "RANK" in os.environ else ""
    if waited:
        what = "once the write in progress was complete"
    else:
        what = "at once: the step in progress is lost, the latest checkpoint is intact"
    tell(f"online_dpo.py: error{where}: stopped by a second {name} {what}")
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


@contextlib.contextmanager
def writing():
    """A checkpoint or the final save being written: a signal that would stop the run at once waits for it."""
    WRITES.append(True)
    try:
        yield
    finally:
        WRITES.pop()
    if FORCED and not WRITES:
        stop_at_once(FORCED[0], waited=True)


def reset():
    """No request yet: a new run (command_line.run(), stop_signals())."""
    for pending in (STOP, FIRST, WRITES, FORCED):
        pending.clear()


@contextlib.contextmanager
def stop_signals():
    """For the loop and the final save: a signal waits in STOP until the step or save is done."""
    global DEFER
    reset()
    DEFER = True
    old = {sig: signal.signal(sig, on_signal) for sig in SIGNALS}  # as run() does, for main() called alone
    try:
        yield STOP
    finally:
        DEFER = False
        for sig, handler in old.items():
            signal.signal(sig, handler)


def signal_exit(signals):
    """The exit code once the work is saved: 130 after Ctrl-C (as a shell's), else 0."""
    return 128 + signal.SIGINT if signal.SIGINT in signals else 0
