"""What keeps online_dpo.py's files whole through crashes and signals.

- written_in_place(path): write into path.tmp, fsync it, then one rename over path, so that a crash at any moment
  leaves either the old path or the new one (checkpoints, `latest`, the final save, metrics files).
- lock_output_dir(path): one run at a time in an output_dir (an flock, freed at any exit).
- stop_signals(): inside it (the training loop, the final save) SIGTERM, SIGINT and SIGHUP wait in STOP until the
  step is done and saved; outside it they raise Stopped, and run() ends the run where it is.
"""

import contextlib
import fcntl
import os
import shutil
import signal
import socket


@contextlib.contextmanager
def written_in_place(path, merge=False):
    """A path that then replaces `path` in one rename (merge: file by file)."""
    tmp = os.path.abspath(path) + ".tmp"  # beside path, in its parent
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
