"""Crash-atomic changes to ``$CLIPGREP_HOME/models``: install, replace, take out, recover.

Every change is a rename, so a model directory is always whole: it exists under
its name or it does not. The temporaries in between are hidden siblings:

    .NAME.new-XXXX/   a model being built (conversion or copy); never complete on its own
    .NAME.old-XXXX/   the previous model during ``--replace``: moved aside, then deleted
    .NAME.del-XXXX/   a removed model being deleted

A kill can leave any of them behind. ``recover`` (run under the models lock by
every models command before it changes anything, and by ``list_models``) finishes
the job: an ``.old`` whose NAME is missing is renamed back (the replace never
happened), every other temporary is deleted, and so is the trash of a killed
``--purge`` (index/purge.py). So after a kill at any step the next command sees
the old model or the new one, never none.

Every writer holds the models lock (``$CLIPGREP_HOME/models/.lock``) for its whole
run, conversion included: while it is held, any temporary found belongs to a
dead process.
"""
from __future__ import annotations

import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ClipgrepError
from .index.lock import index_lock
from .paths import index_dir, index_lock_file, models_dir

LOCK_FILE = ".lock"
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>new|old|del)-[A-Za-z0-9_]+$")


@contextmanager
def models_lock(*, wait: bool = True, on_wait: Callable[[], None] | None = None) -> Iterator[Path]:
    """Hold the models lock, then clear what killed writers left; yields the models dir."""
    root = models_dir()
    root.mkdir(parents=True, exist_ok=True)
    with index_lock(root / LOCK_FILE, wait=wait, on_wait=on_wait):
        recover(root)
        yield root


def try_recover() -> None:
    """Recover if no models command is running now (else it will): for readers such as ``models list``."""
    if not models_dir().is_dir():
        return
    try:
        with models_lock(wait=False):
            pass
    except (ClipgrepError, OSError):  # busy, or a read-only home: nothing to recover from here
        pass


def recover(root: Path) -> None:
    """Undo or finish what killed writers left in ``root``. The caller holds the models lock."""
    for entry in sorted(root.iterdir()):
        match = _TEMPORARY.match(entry.name)
        if match is None:
            continue
        installed = root / match["name"]
        if match["kind"] == "old" and not installed.exists() and not installed.is_symlink():
            entry.rename(installed)  # a replace killed between its two renames: keep the old model
        else:
            _delete(entry)
    _clear_index_trash()


def _clear_index_trash() -> None:
    """Delete what a killed ``models remove --purge`` left in the index dir, if no index run holds it."""
    from .index.purge import TRASH_PREFIX, clear_trash

    directory = index_dir()
    if not any(directory.glob(f"{TRASH_PREFIX}*")):
        return
    try:
        with index_lock(index_lock_file(), wait=False):
            clear_trash(directory)
    except ClipgrepError:
        pass  # an index run holds the lock: the next models command clears it


@contextmanager
def staging(name: str) -> Iterator[Path]:
    """A fresh ``.NAME.new-XXXX/NAME`` path to build a model in; deleted on the way out."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.new-", dir=models_dir()))
    try:
        yield tmp / name
    finally:
        _delete(tmp)


def swap_in(staged: Path, dest: Path) -> None:
    """Install ``staged`` as ``dest``, replacing the model there: old -> ``.old``, new -> dest, delete old."""
    old = None
    if dest.exists() or dest.is_symlink():
        old = _aside(dest, "old")
        dest.rename(old)
    staged.rename(dest)
    if old is not None:
        _delete(old)


def take_out(dest: Path) -> None:
    """Remove the model at ``dest``: gone in one rename, then deleted."""
    doomed = _aside(dest, "del")
    dest.rename(doomed)
    _delete(doomed)


def _aside(dest: Path, kind: str) -> Path:
    return dest.with_name(f".{dest.name}.{kind}-{secrets.token_hex(4)}")


def _delete(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)

