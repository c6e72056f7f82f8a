"""One job per output directory: an exclusive `fcntl.flock` on `<dir>/<name>`, held for the process lifetime.

The kernel drops the lock when the holding process ends however it ends (crash, SIGKILL, OOM kill), so a crashed
run never leaves it stuck; a process that is alive but stopped (SIGSTOP) still holds it, as it should. The file
also records who holds it (pid, host, start time, command) for the refusal message; that text is only a
description, the lock itself is the flock. Taking a lock this process already holds is a no-op (sequential runs
in one process: tests, the in-process pipeline).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

RUN_LOCK = ".chatrlhf_run.lock"
_held: dict[str, int] = {}  # resolved lock path -> open file descriptor holding the flock


class DirectoryLocked(RuntimeError):
    """Another live process holds the lock of this directory."""


def acquire(directory: str | Path, name: str = RUN_LOCK, what: str = "run", hint: str = "") -> Path:
    """Takes the exclusive lock of `directory` (created if needed) or raises DirectoryLocked naming the holder."""
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    path = (directory / name).resolve()
    if _holds(path):
        return path
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = describe_holder(path)
        os.close(fd)
        raise DirectoryLocked(f"{directory} is in use by another {what} ({holder}); two jobs writing one output "
                              f"directory would overwrite each other's checkpoints and model. Wait for it to end or "
                              f"stop it, or use another output directory{hint}. (Lock file: {path}; it is released "
                              "when that process ends, however it ends.)") from None
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:500]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    _held[str(path)] = fd
    return path


def _holds(path: Path) -> bool:
    """Whether this process holds the lock of `path` (the same file: a folder deleted and made again is not)."""
    fd = _held.get(str(path))
    if fd is None:
        return False
    try:
        if os.fstat(fd).st_ino == os.stat(path).st_ino:
            return True
    except OSError:
        pass
    os.close(_held.pop(str(path)))
    return False


def describe_holder(path: Path) -> str:
    try:
        info = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "holder unknown"
    return (f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}: "
            f"{info.get('command', '')}").rstrip(": ")


def is_locked(directory: str | Path, name: str = RUN_LOCK) -> str | None:
    """A description of the live holder of `directory`'s lock, or None when it is free (or held by this process).
    Takes and drops the lock to find out; creates nothing."""
    path = Path(directory).expanduser() / name
    if not path.is_file() or _holds(path.resolve()):
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return describe_holder(path)
    finally:
        os.close(fd)
    return None


def release(directory: str | Path, name: str = RUN_LOCK) -> None:
    path = str((Path(directory).expanduser() / name).resolve())
    fd = _held.pop(path, None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor drops the flock
