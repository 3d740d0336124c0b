"""What the index keeps per model (table, snapshot, run records), and deleting it all.

A model's index outlives the model on purpose: adding the same model again (same
image tower, same index id) reuses it. ``clipgrep models remove NAME --purge`` deletes it.

Directories are first renamed into one ``.purge-XXXX`` trash directory, so a kill
never leaves a half-deleted LanceDB table that a later run would trip over; the
trash is deleted next, or by ``clear_trash`` after a kill. Callers hold the index lock.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ..paths import dirty_marker, index_dir, snapshot_dir
from .state import forget_bundle

TRASH_PREFIX = ".purge-"


def index_paths(index_id: str) -> list[Path]:
    """The files and directories the index holds for ``index_id`` that exist now."""
    from ..store import IndexStore

    table = IndexStore(index_dir(), index_id, 0).table_dir
    return [p for p in (table, snapshot_dir(index_id), dirty_marker(index_id)) if p.exists()]


def index_bytes(index_id: str) -> int:
    """Bytes on disk of ``index_paths`` (what a purge frees; the dirty marker is empty)."""
    from ..status import disk_bytes

    return sum(disk_bytes(path) for path in index_paths(index_id))


def purge_index(index_id: str) -> None:
    """Delete everything the index holds for ``index_id``. The caller holds the index lock."""
    directory = index_dir()
    clear_trash(directory)
    doomed = index_paths(index_id)
    if doomed:
        trash = Path(tempfile.mkdtemp(prefix=TRASH_PREFIX, dir=directory))
        for i, path in enumerate(doomed):
            path.rename(trash / str(i))  # each one gone in a single step
    forget_bundle(directory, index_id)
    clear_trash(directory)


def clear_trash(directory: Path) -> None:
    """Delete what a killed purge left. The caller holds the index lock."""
    for trash in directory.glob(f"{TRASH_PREFIX}*"):
        shutil.rmtree(trash, ignore_errors=True)
