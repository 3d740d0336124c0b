"""One index run at a time: an exclusive OS file lock held for the whole run.

The lock is ``filelock``'s native lock (``flock`` on POSIX, a byte-range lock
on Windows), which the OS drops when its holder exits, however it exits
(SIGKILL included), so a crashed run never leaves a stale lock behind. It is taken on a
sibling file (``<path>.os``), so that ``path`` itself stays a plain, readable
note of the holder's pid: a refused run reads it to say who holds the lock
(Windows forbids reading a locked byte range). The pid is never trusted for the
locking itself. Native locks may not work on network file systems (e.g. some
NFS setups), so keep CLIPGREP_HOME local.

Example::

    with index_lock(paths.index_dir() / "index.lock", wait=False):
        ...  # update the table, write the snapshot
"""
from __future__ import annotations

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
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path.with_name(path.name + ".os"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if not wait:
            raise ClipgrepError(f"another clipgrep index is running ({_holder(path)})",
                                f"wait for it to finish, or stop it (lock file: {path})") from None
        if on_wait is not None:
            on_wait()
        lock.acquire()
    try:
        path.write_text(f"{os.getpid()}\n", encoding="ascii")
        try:
            yield
        finally:
            path.write_text("", encoding="ascii")  # so a stale pid is never reported
    finally:
        lock.release()


def _holder(path: Path) -> str:
    # The holder writes its pid just after taking the lock, so it can briefly be empty.
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "pid unknown"


def held_by_a_live_process(path: Path) -> bool:
    """Whether an index writer holds the lock at ``path`` now, without taking it.

    Readers must not take the lock even for a moment (a writer started with ``wait=False`` would
    fail), so this reads the holder's pid, which a holder killed by SIGKILL leaves behind, and asks
    the OS whether that process still lives (a reused pid only makes a reader trust an old snapshot).
    """
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return False
    if not text.isdigit():
        return False
    pid = int(text)
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill would terminate it; probe the OS lock instead
        from filelock import FileLock, Timeout

        probe = FileLock(path.with_name(path.name + ".os"))
        try:
            probe.acquire(timeout=0)
        except Timeout:
            return True
        probe.release()
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
