"""``clipgrep forget ROOT``: stop tracking a root and drop its rows from every model's index."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import ClipgrepError
from ..paths import index_dir
from .plan import under_roots
from .state import load_skipped, remembered_roots, save_roots, save_skipped


def forget_root(root: str) -> int:
    """Stop tracking ``root`` and drop its rows from every model's index; returns rows removed.

    Rows that another remembered root still covers (``forget /a/b`` while ``/a``
    is indexed) stay. Killed at any point, it leaves no snapshot showing a row the table
    no longer holds, and running it again finishes the job.
    """
    from ..store import list_bundle_ids
    from .lock import index_lock

    directory = index_dir()
    path = os.path.abspath(os.path.expanduser(root))
    with index_lock(directory / ".lock"):
        roots = remembered_roots(directory)
        if path not in roots:
            raise ClipgrepError(f"{path} is not an indexed root", "see the indexed roots with: clipgrep status")
        remaining = [r for r in roots if r != path]
        removed = sum(_forget_in_table(directory, bundle_id, path, remaining)
                      for bundle_id in list_bundle_ids(directory))
        # Roots last: a crash before this point leaves the root remembered, so rerunning forget works.
        save_roots(directory, remaining)
    return removed


def _forget_in_table(directory: Path, bundle_id: str, path: str, remaining: list[str]) -> int:
    """Drop the rows under ``path`` (and not under ``remaining``) from one model's table and snapshot.

    Each step is safe to be killed after: the DIRTY marker goes first, so that a rerun (or the
    next index run) rewrites the snapshot even when no row is left to delete; the snapshot
    without the rows goes before their delete, so search never shows an image the table no
    longer holds; the marker goes once the snapshot matches the table again.
    """
    from ..store import IndexStore
    from .build import dirty_marker, publish_snapshot

    store = IndexStore.existing(directory, bundle_id)
    marker = dirty_marker(bundle_id)
    gone = sorted(p for p in store.files() if under_roots(p, [path]) and not under_roots(p, remaining))
    if gone or marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        vector_index = store.has_vector_index()
        if gone:
            publish_snapshot(store, vector_index=vector_index, without=gone)
            store.delete(gone)
            store.maintain()
        publish_snapshot(store, vector_index=vector_index)
        marker.unlink()
    skipped = load_skipped(directory, bundle_id)
    save_skipped(directory, bundle_id, {p: s for p, s in skipped.items() if not under_roots(p, [path])})
    return len(gone)
