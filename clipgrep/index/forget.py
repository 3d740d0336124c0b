"""``clipgrep forget PATH``: stop indexing a root, a remembered file or a path inside a root,
and drop its rows from every model's index."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..paths import dirty_marker, index_dir, index_lock_file
from .plan import under_roots
from .roots import RootSet
from .state import load_skipped, save_skipped


@dataclass(frozen=True)
class Forgotten:
    path: str
    removed: int                  # rows dropped, over every model
    excluded_from: str | None     # for a path inside a root: that root, which now excludes it
    pattern: str | None           # ... with this pattern ('clipgrep index ROOT --remove-exclude' undoes it)


def forget_root(root: str) -> Forgotten:
    """Stop indexing ``root`` (a remembered root or file, or a path inside a root) and drop its rows.

    Roots never nest (see ``roots.py``), so every row under ``root`` is its own. Killed at
    any point, it leaves no snapshot showing a row the table no longer holds, and running it
    again finishes the job.
    """
    from ..store import list_bundle_ids
    from .lock import index_lock

    directory = index_dir()
    path = os.path.abspath(os.path.expanduser(root))
    with index_lock(index_lock_file()):
        tracked = RootSet.load(directory)
        outer = tracked.root_of(path)
        pattern = tracked.forget(path)  # raises for a path that is not indexed
        removed = sum(_forget_in_table(directory, bundle_id, path) for bundle_id in list_bundle_ids(directory))
        # Roots last: a crash before this point leaves the root remembered, so rerunning forget works.
        tracked.save(directory)
    return Forgotten(path, removed, outer.path if pattern and outer else None, pattern)


def _forget_in_table(directory: Path, bundle_id: str, path: str) -> int:
    """Drop the rows under ``path`` from one model's table and snapshot.

    Each step is safe to be killed after: the DIRTY marker goes first, so that a rerun (or the
    next index run) rewrites the snapshot even when no row is left to delete; the snapshot
    without the rows goes before their delete, so search never shows an image the table no
    longer holds; the marker goes once the snapshot matches the table again.
    """
    from ..store import IndexStore
    from .build import publish_snapshot

    store = IndexStore.existing(directory, bundle_id)
    marker = dirty_marker(bundle_id)
    gone = sorted(p for p in store.files() if under_roots(p, [path]))
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
