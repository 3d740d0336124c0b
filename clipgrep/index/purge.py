"""What the index keeps per model (table, snapshot), its size, and deleting it all.

A model's index outlives the model on purpose: adding the same model again (same
image tower, same index id) reuses it. ``clipgrep models remove NAME --purge`` deletes it
(``protocol.purge_index``, the write protocol's purge steps).
"""
from __future__ import annotations

from pathlib import Path

from ..paths import index_dir, snapshot_dir
from .protocol import TRASH_PREFIX, clear_trash, purge_index

__all__ = ["TRASH_PREFIX", "clear_trash", "index_bytes", "index_paths", "purge_index"]


def index_paths(index_id: str) -> list[Path]:
    """The files and directories the index holds for ``index_id`` that exist now."""
    from ..store import IndexStore

    table = IndexStore(index_dir(), index_id, 0).table_dir
    return [p for p in (table, snapshot_dir(index_id)) if p.exists()]


def index_bytes(index_id: str) -> int:
    """Bytes on disk of ``index_paths`` (what a purge frees)."""
    from ..status import disk_bytes

    return sum(disk_bytes(path) for path in index_paths(index_id))
