"""``clipgrep forget PATH``: stop indexing a root, a remembered file or a path inside a root,
and drop its rows from every model's index."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..paths import index_dir, index_lock_file
from .roots import RootSet


@dataclass(frozen=True)
class Forgotten:
    path: str
    removed: int                  # rows dropped, over every model
    excluded_from: str | None     # for a path inside a root: that root, which now excludes it
    pattern: str | None           # ... with this pattern ('clipgrep index ROOT --remove-exclude' undoes it)


def forget_root(root: str) -> Forgotten:
    """Stop indexing ``root`` (a remembered root or file, or a path inside a root) and drop its rows.

    Roots never nest (see ``roots.py``), so every row under ``root`` is its own. The rows go
    first and the root last, so a kill at any point leaves the root remembered and rerunning
    forget finishes the job; meanwhile search shows what the tables hold (``protocol.py``).
    """
    from ..store import list_bundle_ids
    from .lock import index_lock
    from .protocol import forget_rows, publish_all, recover

    directory = index_dir()
    path = os.path.abspath(os.path.expanduser(root))
    with index_lock(index_lock_file()):
        recover(directory)
        tracked = RootSet.load(directory)
        outer = tracked.root_of(path)
        pattern = tracked.forget(path)  # raises for a path that is not indexed
        removed = sum(forget_rows(directory, index_id, path) for index_id in list_bundle_ids(directory))
        tracked.save(directory)
        publish_all(directory)
    return Forgotten(path, removed, outer.path if pattern and outer else None, pattern)
