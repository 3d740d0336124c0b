"""One index run at a time: an exclusive ``flock`` held for the whole run.

The kernel drops a flock when its holder exits, however it exits (SIGKILL
included), so a crashed run never leaves a stale lock behind. The holder writes
its pid into the file only so that a refused run can say who holds it; the pid
is never trusted for the locking itself. flock is POSIX-only and may not work
on network file systems (e.g. some NFS setups), so keep CLIPGREP_HOME local.

Example::

    with index_lock(paths.index_dir() / "index.lock", wait=False):
        ...  # update the table, write the snapshot
"""
from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import ClipgrepError


@contextmanager
def index_lock(path: Path, *, wait: bool = True, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the exclusive lock at ``path`` for the ``with`` block.

    If another process holds it: with ``wait=False`` raise ClipgrepError naming its pid;
    otherwise call ``on_wait`` once (e.g. to tell the user) and block until it is free.
    Not re-entrant: taking it again in the same process blocks (or raises) like any other.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd):
            if not wait:
                raise ClipgrepError(f"another clipgrep index is running ({_holder(fd)})",
                                    f"wait for it to finish, or stop it (lock file: {path})")
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        _write_pid(fd)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # so a stale pid is never reported
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _write_pid(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _holder(fd: int) -> str:
    # The holder writes its pid just after taking the lock, so it can briefly be empty.
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return f"pid {text}" if text.isdigit() else "pid unknown"
