"""A long stage process that is the only one of its kind and does not outlive DVC.

- `exclusive(lock)`: one trainer per workspace. Two trainers would resume from the same state
  and write the same files; the second one refuses, naming the first (an `fcntl.flock` the
  kernel releases when its holder dies, however it dies: no stale lock to clean up).
- `die_with_dvc()`: a stage whose `dvc` was killed (SIGKILL, an OOM kill, a CI timeout) stops
  instead of training on as an orphan that the next `dvc repro` would race.
- `die_with_launcher()`: likewise a torchrun worker whose launcher is gone (torchrun starts its
  workers in sessions of their own, so a SIGKILLed launcher would leave them running).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from training import StageError

log = logging.getLogger(__name__)

# The shells DVC runs a stage's cmd with (`$SHELL -c "<cmd>"`, /bin/sh without $SHELL).
SHELLS = frozenset({"sh", "dash", "bash", "zsh", "fish", "ksh", "mksh"})


@contextlib.contextmanager
def exclusive(lock: Path, what: str = "training run") -> Iterator[None]:
    """Hold `lock` for the block; if another process holds it, raise StageError naming it."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a+") as f:  # not "w": truncating would erase the holder's record
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise StageError(_refusal(lock, what, f.read())) from None
        f.truncate(0)
        holder = {
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join([Path(sys.executable).name, *sys.orig_argv[1:]]),
            "cwd": os.getcwd(),
        }
        f.write(json.dumps(holder) + "\n")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)


def _refusal(lock: Path, what: str, record: str) -> str:
    try:
        holder = json.loads(record)
    except ValueError:  # the holder has not written its record yet
        return (
            f"another {what} holds {lock} in this workspace (starting up): one at a time. "
            "Wait for it to finish, or stop it, then run `dvc repro` again."
        )
    pid = holder["pid"]
    return (
        f"another {what} is running in this workspace: pid {pid} ({holder['command']}, "
        f"started {holder['started']}) holds {lock}. One at a time: wait for it to finish, "
        f"or stop it (`kill {pid}`), then run `dvc repro` again."
    )


def die_with_dvc(poll_s: float = 1.0) -> psutil.Process | None:
    """Under DVC, stop this process (SIGTERM) once the `dvc` that started it is gone.

    DVC runs a stage as `$SHELL -c "<cmd>"`: bash execs the command, but dash (/bin/sh on
    Debian, what DVC uses without $SHELL) stays in between and outlives a killed dvc. So the
    process watched is the first ancestor that is not such a shell, by a thread that looks
    every `poll_s` seconds. (prctl's PR_SET_PDEATHSIG would fire when the parent *thread*
    ends, which would be the shell here.) Outside DVC (no DVC_STAGE set) nothing is watched:
    `nohup python -m training.stages.train &` is a choice. Returns the process watched, or None.
    """
    if "DVC_STAGE" not in os.environ:
        return None
    launcher = psutil.Process().parent()
    while launcher is not None and _is_shell_wrapper(launcher):
        launcher = launcher.parent()
    if launcher is None:
        return None
    threading.Thread(
        target=_watch, args=(launcher, poll_s), name="die-with-dvc", daemon=True
    ).start()
    return launcher


def die_with_launcher(poll_s: float = 1.0) -> psutil.Process:
    """Stop this process (SIGTERM) once its parent, the torchrun agent that started it, is gone;
    returns the process watched."""
    launcher = psutil.Process().parent()
    threading.Thread(
        target=_watch, args=(launcher, poll_s), name="die-with-launcher", daemon=True
    ).start()
    return launcher


def _is_shell_wrapper(proc: psutil.Process) -> bool:
    try:
        args = proc.cmdline()
    except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    return bool(args) and Path(args[0]).name.lstrip("-") in SHELLS and "-c" in args[1:]


def _watch(launcher: psutil.Process, poll_s: float) -> None:
    while _alive(launcher):
        time.sleep(poll_s)
    log.error(
        "the process that started this stage (pid %d) is gone: stopping rather than running on "
        "as an orphan; `dvc repro` resumes from the last completed epoch",
        launcher.pid,
    )
    os.kill(os.getpid(), signal.SIGTERM)


def _alive(proc: psutil.Process) -> bool:
    try:  # is_running() also tells a reused pid apart (by start time)
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
