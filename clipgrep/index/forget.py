"""``clipgrep forget PATH``: stop indexing a root, a remembered file or a path inside a root,
and drop its rows from every model's index."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..paths import index_dir, index_lock_file, snapshot_dir
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

    Roots never nest (see ``roots.py``), so every row under ``root`` is its own.
    """
    from ..snapshot import read_snapshot, write_snapshot
    from ..store import IndexStore, list_bundle_ids
    from .lock import index_lock

    directory = index_dir()
    path = os.path.abspath(os.path.expanduser(root))
    with index_lock(index_lock_file()):
        tracked = RootSet.load(directory)
        outer = tracked.root_of(path)
        pattern = tracked.forget(path)  # raises for a path that is not indexed
        removed = 0
        for bundle_id in list_bundle_ids(directory):
            snapshot = read_snapshot(snapshot_dir(bundle_id))
            if snapshot is None:
                continue
            store = IndexStore(directory, bundle_id, int(snapshot.meta["embed_dim"]))
            gone = sorted(p for p in store.files() if under_roots(p, [path]))
            if gone:
                store.delete(gone)
                store.maintain()
                write_snapshot(snapshot_dir(bundle_id), *store.snapshot_rows(),
                               meta={**snapshot.meta, "table_version": store.version()})
            skipped = load_skipped(directory, bundle_id)
            save_skipped(directory, bundle_id, {p: s for p, s in skipped.items() if not under_roots(p, [path])})
            removed += len(gone)
        # Roots last: a crash before this point leaves the root remembered, so rerunning forget works.
        tracked.save(directory)
    return Forgotten(path, removed, outer.path if pattern and outer else None, pattern)
