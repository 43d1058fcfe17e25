"""SIGTERM (preemption, scancel), SIGINT (Ctrl-C) and SIGHUP (a closed terminal): inside stop_signals() (the training
loop, the final save) a signal waits in STOP until the step is done and saved; outside it, it raises Stopped and
the run ends where it is (command_line.run() says what was saved)."""

import contextlib
import os
import signal

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # preemption or scancel, Ctrl-C, a closed terminal
STOP: list[int] = []  # the signals that stop_signals() deferred


class Stopped(BaseException):  # as KeyboardInterrupt: `except Exception` lets it through
    """A signal outside stop_signals(): the run ends where it is."""


DEFER = False  # True inside stop_signals()


def on_signal(signum, frame):
    """Inside stop_signals(), a signal waits in STOP (a second kills); elsewhere it ends the run."""
    if not DEFER:
        raise Stopped(signum)
    if STOP:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    STOP.append(signum)


@contextlib.contextmanager
def stop_signals():
    """For the loop and the final save: a signal waits in STOP until the step or save is done."""
    global DEFER
    STOP.clear()
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
