"""One training process per run directory.

A second process training into a directory that another still writes (a `--resume` while the orphaned workers of a
killed launcher still run, or the same `--out` in two terminals) would interleave checkpoints, metrics and the
final model. The process that trains (rank 0 under torchrun) holds an exclusive `flock` on OUT/.lock while it
trains; the kernel drops the lock when the process ends, however it ends (kill -9 included), so a stale lock file
never needs cleaning up.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..data.dataset_folders import RUN_LOCK_FILE

_held: dict[Path, int] = {}  # run directory (resolved) -> the lock file's descriptor, in this process


class RunDirectoryInUse(ValueError):
    """Another live process trains in this run directory (or `longcat grow` reads or writes it); `owner`: its pid."""

    def __init__(self, message: str, owner: str) -> None:
        super().__init__(message)
        self.owner = owner


def hold(out: Path) -> None:
    """Take the run directory's lock for this process (again: a no-op), or fail naming the process holding it."""
    key = out.resolve()
    if key in _held:
        return
    fd = os.open(key / RUN_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunDirectoryInUse(f"{out} is in use by another training process (pid {owner}; or `longcat grow` "
                                "reading or writing it); wait for it to end or stop it, or choose another --out",
                                owner) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[key] = fd


def holds(out: Path) -> bool:
    """Whether this process holds the run directory's lock."""
    return out.resolve() in _held


def release(out: Path) -> None:
    """Give the lock back (the process goes on without training there)."""
    fd = _held.pop(out.resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock
