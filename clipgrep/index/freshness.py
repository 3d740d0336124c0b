"""Whether a derived read copy is as new as the LanceDB table it was made from, without lancedb.

The search snapshot (``snapshot.py``) and the roots cache (``roots.py``) are stamped with the
version of the table they were exported from. A reader compares that stamp with the table's
latest committed version, read from the file system by ``table_version`` (``import lancedb``
costs ~1 s, which ``clipgrep search`` and a no-op ``clipgrep index`` must not pay):

- equal: the copy is current;
- behind while an index writer is running: the writer will publish a new copy; readers keep
  the last published one, which is whole (search shows the old index or the new one);
- behind with no writer: a writer was killed between its commit and its publish. Readers then
  read the table itself (``snapshot_from_table``) and never write; the next writer republishes
  (``protocol.recover``). Reading the table costs ``import lancedb`` plus the read: 7.2 s at 10k
  rows and 16.4 s at 100k against 0.43 s and 0.51 s for the snapshot, measured on a machine at
  load 20 (the import alone took up to 11 s there, ~1 s on a quiet one). Rebuilding instead
  would cost that plus the write (0.7 s and 13 s more), need the index lock and write access,
  and a reader must never block or fail a writer; the state lasts only until the next writer.
  Past ``exact_max_rows()`` rows that read would hold every vector in memory (2 GB per 10^6
  rows), so a reader refuses instead, saying to run ``clipgrep index``, whose first step republishes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..snapshot import Snapshot
    from ..store import Skipped

_U64_MAX = 2**64 - 1
_V2_NAME_DIGITS = 20


def table_version(table_dir: Path) -> int:
    """The latest committed version of the Lance table at ``table_dir``; 0 when there is none.

    The one place that reads Lance's private layout (listed in the README): every commit
    writes ``_versions/<n>.manifest`` last, atomically, where ``n`` is the version, or with the
    "V2 manifest paths" that LanceDB 0.40 uses for new tables, ``2**64 - 1 - version`` zero-padded
    to 20 digits (so that the newest lists first on object stores). Listing that directory takes
    ~0.1 ms; ``Table.version`` takes ``import lancedb``.
    """
    try:
        names = os.listdir(Path(table_dir) / "_versions")
    except (FileNotFoundError, NotADirectoryError):
        return 0
    latest = 0
    for name in names:
        stem, _, ext = name.partition(".")
        if ext != "manifest" or not stem.isdigit():
            continue
        number = int(stem)
        latest = max(latest, _U64_MAX - number if len(stem) == _V2_NAME_DIGITS else number)
    return latest


def image_table_dir(index_id: str) -> Path:
    from ..paths import index_dir
    from ..store import TABLE_PREFIX

    return index_dir() / f"{TABLE_PREFIX}{index_id}.lance"


def is_current(snapshot: Snapshot | None, index_id: str) -> bool:
    """Whether ``snapshot`` shows what the table of ``index_id`` holds now (a missing table: trusted as is)."""
    version = table_version(image_table_dir(index_id))
    if version == 0:
        return True
    return snapshot is not None and snapshot.meta.get("table_version") == version


def current_snapshot(snapshot_dir: Path) -> Snapshot | None:
    """The snapshot to search: the published one, or the table's rows when a killed writer left it behind.

    Raises ClipgrepError for a damaged snapshot, as ``read_snapshot`` does.
    """
    from ..paths import index_lock_file
    from ..snapshot import read_snapshot
    from .lock import held_by_a_live_process

    snapshot = read_snapshot(snapshot_dir)
    index_id = snapshot_dir.name
    if is_current(snapshot, index_id) or held_by_a_live_process(index_lock_file()):
        return snapshot
    snapshot = read_snapshot(snapshot_dir)  # a writer may have published and let go in between
    return snapshot if is_current(snapshot, index_id) else snapshot_from_table(index_id)


def snapshot_from_table(index_id: str) -> Snapshot:
    """The snapshot a writer would publish now, built in memory from the table (imports lancedb).

    Raises ClipgrepError past ``exact_max_rows()`` rows (see the module's docstring)."""
    from ..ann import exact_max_rows
    from ..errors import ClipgrepError
    from ..paths import index_dir
    from ..snapshot import snapshot_in_memory
    from ..store import IndexStore
    from .roots import RootSet

    store = IndexStore.existing(index_dir(), index_id)
    if (count := store.count()) > exact_max_rows():
        raise ClipgrepError(f"the index of {count:,} images holds changes that an interrupted `clipgrep index` "
                            "did not publish for search",
                            "run `clipgrep index` (any directory, or none) to publish them, then search again")
    rows, skipped, version = store.export()
    meta = snapshot_meta(store.bundle_id, version, RootSet.load(index_dir()), skipped)
    return snapshot_in_memory(*rows, meta=meta)


def snapshot_meta(index_id: str, version: int, tracked: Any, skipped: dict[str, Skipped]) -> dict[str, Any]:
    """What a snapshot records beside its rows: the table version it shows, the remembered roots
    and files (for ``search --under``, and so an index run that changed them publishes again), and
    the skip notes (so that the no-op fast path of ``clipgrep index`` needs no lancedb)."""
    return {"bundle_id": index_id, "table_version": version,
            "roots": tracked.paths(),
            "skipped": [[s.path, s.size, s.mtime_ns, s.reason] for s in sorted(skipped.values(), key=_by_path)]}


def skipped_in(snapshot: Snapshot) -> dict[str, Skipped]:
    """The skip notes a snapshot recorded, by path."""
    from ..store import Skipped

    notes = snapshot.meta.get("skipped") or []
    return {note[0]: Skipped(*note) for note in notes}


def _by_path(skipped: Skipped) -> str:
    return skipped.path
