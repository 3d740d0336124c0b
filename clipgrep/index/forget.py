"""``clipgrep forget ROOT``: stop tracking a root and drop its rows from every model's index."""
from __future__ import annotations

import os

from ..errors import ClipgrepError
from ..paths import index_dir, index_lock_file, snapshot_dir
from .plan import under_roots
from .state import load_skipped, remembered_roots, save_roots, save_skipped


def forget_root(root: str) -> int:
    """Stop tracking ``root`` and drop its rows from every model's index; returns rows removed.

    Rows that another remembered root still covers (``forget /a/b`` while ``/a``
    is indexed) stay.
    """
    from ..snapshot import read_snapshot, write_snapshot
    from ..store import IndexStore, list_bundle_ids
    from .lock import index_lock

    directory = index_dir()
    path = os.path.abspath(os.path.expanduser(root))
    with index_lock(index_lock_file()):
        roots = remembered_roots(directory)
        if path not in roots:
            raise ClipgrepError(f"{path} is not an indexed root", "see the indexed roots with: clipgrep status")
        remaining = [r for r in roots if r != path]
        removed = 0
        for bundle_id in list_bundle_ids(directory):
            snapshot = read_snapshot(snapshot_dir(bundle_id))
            if snapshot is None:
                continue
            store = IndexStore(directory, bundle_id, int(snapshot.meta["embed_dim"]))
            gone = {p for p in store.files() if under_roots(p, [path]) and not under_roots(p, remaining)}
            if gone:
                store.delete(sorted(gone))
                store.maintain()
                write_snapshot(snapshot_dir(bundle_id), *store.snapshot_rows(),
                               meta={**snapshot.meta, "table_version": store.version()})
            skipped = load_skipped(directory, bundle_id)
            save_skipped(directory, bundle_id, {p: s for p, s in skipped.items() if not under_roots(p, [path])})
            removed += len(gone)
        # Roots last: a crash before this point leaves the root remembered, so rerunning forget works.
        save_roots(directory, remaining)
    return removed
