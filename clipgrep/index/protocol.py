"""The write protocol of the index: every write of ``index``, ``forget`` and ``models remove --purge``.

LanceDB is the source of truth (``store.py``): the image tables (indexed rows and skip notes),
``roots`` and ``runs``. Each write below is one LanceDB commit or one atomic rename, made under
the index lock, and goes through ``commit(step, write)``, which names it. The search snapshots
and the roots cache are derived copies stamped with the table version they show
(``freshness.py``), so the protocol needs no marker of its own:

- index: recover -> roots -> orphans -> racy / reuse -> remove -> rows (commit after commit: new
  rows with the skip notes of files that stopped decoding, one merge_insert each) ->
  maintain -> publish -> roots (devices) -> run;
- forget: recover -> forget (delete the rows under the path, per table) -> maintain -> roots -> publish;
- models remove --purge: trash-snapshot -> trash-table -> drop-run -> clear-trash.

Killed between any two steps, a reader finds the snapshot stamp behind the table and, with no
writer alive, searches the table itself; the next writer's ``recover`` cleans up and republishes.
``CLIPGREP_CRASH_AT=STEP[#N]`` makes the process ``os._exit`` right after the Nth write of that
step (default the first): the kill tests use it to stop a run between every two steps.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..paths import index_dir, snapshot_dir

if TYPE_CHECKING:
    from ..store import IndexStore, Skipped

T = TypeVar("T")

CRASH_ENV = "CLIPGREP_CRASH_AT"
CRASH_EXIT = 86
INDEX_STEPS = ("roots", "orphans", "racy", "reuse", "remove", "rows", "maintain", "publish", "run")
FORGET_STEPS = ("forget", "maintain", "roots", "publish")
PURGE_STEPS = ("trash-snapshot", "trash-table", "drop-run", "clear-trash")
MIGRATE_STEPS = ("upgrade", "roots", "run", "skip-notes", "legacy-removed", "orphans", "publish")
_ALL_STEPS = frozenset(INDEX_STEPS + FORGET_STEPS + PURGE_STEPS + MIGRATE_STEPS)
_writes: dict[str, int] = {}
TRASH_PREFIX = ".purge-"


def commit(step: str, write: Callable[[], T]) -> T:
    """Make one write of the protocol, named ``step``; a kill point follows it."""
    assert step in _ALL_STEPS, step
    result = write()
    spec = os.environ.get(CRASH_ENV)
    if spec:
        name, _, nth = spec.partition("#")
        if name == step:
            _writes[step] = _writes.get(step, 0) + 1
            if _writes[step] == int(nth or 1):
                os._exit(CRASH_EXIT)  # like kill -9: no cleanup, no lock release but the OS's
    return result


# -- on taking the lock ---------------------------------------------------------------------------


def recover(directory: Path | None = None) -> None:
    """Finish what a killed writer left: import legacy state, clean and republish stale snapshots.

    Every writer calls it first, under the index lock. Costs a directory listing per model when
    there is nothing to do (no lancedb import).
    """
    from ..snapshot import read_snapshot
    from ..store import IndexStore, list_bundle_ids
    from .freshness import is_current
    from .roots import RootSet, refresh_cache

    directory = directory or index_dir()
    _migrate_legacy(directory)
    tracked = RootSet.load(directory)
    for index_id in list_bundle_ids(directory):
        try:
            snapshot = read_snapshot(snapshot_dir(index_id))
        except Exception:  # noqa: BLE001 - damaged: rebuilt from the table below
            snapshot = None
        if snapshot is not None and is_current(snapshot, index_id) and snapshot.meta.get("roots") == tracked.paths():
            continue
        store = IndexStore.existing(directory, index_id)
        if snapshot is None or not is_current(snapshot, index_id):
            commit("orphans", store.cleanup_orphans)  # a writer died after a commit: clean what it left
        publish(store)
    refresh_cache(directory)  # so that the next no-op run reads the roots without lancedb


def _migrate_legacy(directory: Path) -> None:
    """Import ``state.json``, ``skipped-<id>.json`` and DIRTY markers (``legacy.py``) once, then delete them.

    Idempotent, so a kill at any step is finished by the next writer: nothing else writes before it.
    """
    from ..store import IndexStore, list_bundle_ids, record_run
    from . import legacy
    from .roots import RootSet

    state = directory / legacy.STATE_FILE
    skip_files = legacy.skip_files(directory)
    markers = legacy.dirty_markers(directory)
    if not (state.exists() or skip_files or markers):
        return
    tables = {index_id: IndexStore.existing(directory, index_id) for index_id in list_bundle_ids(directory)}
    for store in tables.values():
        if not store.has_skip_column():  # schema version 1: add skip_reason and origin
            commit("upgrade", store.upgrade)
    if state.exists():
        RootSet(*legacy.load_tracked(directory)).save(directory, force=True)
        for index_id, summary in legacy.runs(directory).items():
            if index_id in tables:
                commit("run", functools.partial(record_run, directory, index_id, summary))
    for index_id, path in skip_files.items():
        noted = tables.get(index_id)
        if noted is not None:
            indexed = noted.files()
            notes = [s for p, s in legacy.load_skipped(path).items() if p not in indexed]
            commit("skip-notes", functools.partial(noted.upsert, [], _no_vectors(noted), notes))

    def remove() -> None:  # the markers go too: a stale snapshot is now told by its stamp
        for path in [*markers.values(), *skip_files.values(), state]:
            path.unlink(missing_ok=True)

    commit("legacy-removed", remove)


def _no_vectors(store: IndexStore) -> Any:  # an np.ndarray; numpy is imported late here
    import numpy as np

    return np.zeros((0, store.embed_dim), np.float32)


# -- the snapshot ---------------------------------------------------------------------------------


def publish(store: IndexStore) -> tuple[int, dict[str, Skipped]]:
    """Export the table's indexed rows as the search snapshot, stamped with the version they were
    read at (streamed: memory bounded by the paths, not the vectors); returns the rows and the
    skip notes it recorded."""
    from ..ann import build_ivf, live_training
    from ..snapshot import write_snapshot_batches
    from .freshness import snapshot_meta
    from .roots import RootSet

    # Under the index lock nothing commits between these reads: they show one version.
    version, skipped = store.version(), store.skipped()
    meta = snapshot_meta(store.bundle_id, version, RootSet.load(store.directory), skipped)
    previous = live_training(snapshot_dir(store.bundle_id))  # read before the write deletes its generation
    generation = commit("publish", lambda: write_snapshot_batches(
        snapshot_dir(store.bundle_id), store.export_batches(), store.embed_dim, meta=meta))
    build_ivf(generation, previous)  # a big snapshot's inverted file; search is exact until it is complete
    return int(json.loads((generation / "meta.json").read_bytes())["rows"]), skipped


def publish_snapshot(store: IndexStore) -> int:
    """Export the table's indexed rows as the search snapshot; returns its rows."""
    return publish(store)[0]


def finish(store: IndexStore, upkeep: bool) -> tuple[int, dict[str, Skipped]]:
    """The end of an index run: compaction (unless interrupted), then publish.

    Returns the snapshot's rows and the skip notes. No LanceDB vector index: search reads the
    snapshot (and its own inverted file past ``ann.exact_max_rows()``), never the table's.
    """
    if upkeep:
        commit("maintain", store.maintain)
    return publish(store)


# -- forget ---------------------------------------------------------------------------------------


def forget_rows(directory: Path, index_id: str, path: str) -> int:
    """Delete the rows and skip notes under ``path`` from one model's table (one commit); returns
    the indexed rows deleted. The caller publishes once the roots are saved."""
    from ..store import IndexStore
    from .plan import under_roots

    store = IndexStore.existing(directory, index_id)
    indexed = [p for p in store.files() if under_roots(p, [path])]
    gone = indexed + [p for p in store.skipped() if under_roots(p, [path])]
    if gone:
        commit("forget", lambda: store.delete(gone))
        commit("maintain", store.maintain)
    return len(indexed)


def publish_all(directory: Path) -> None:
    from ..store import IndexStore, list_bundle_ids

    for index_id in list_bundle_ids(directory):
        publish(IndexStore.existing(directory, index_id))


# -- models remove --purge ------------------------------------------------------------------------


def purge_index(index_id: str) -> None:
    """Delete everything the index holds for ``index_id``. The caller holds the index lock.

    The snapshot goes before the table (a reader that finds a table without a snapshot reads
    the table), each in one rename into a ``.purge-XXXX`` trash directory, so a kill never leaves
    a half-deleted LanceDB table; the trash is deleted last, or by ``clear_trash`` after a kill.
    """
    from ..store import IndexStore, drop_run
    from . import legacy

    directory = index_dir()
    clear_trash(directory)
    trash: Path | None = None
    for step, path in (("trash-snapshot", snapshot_dir(index_id)),
                       ("trash-table", IndexStore(directory, index_id, 0).table_dir)):
        if path.exists():
            trash = trash or Path(tempfile.mkdtemp(prefix=TRASH_PREFIX, dir=directory))
            commit(step, functools.partial(path.rename, trash / step))
    commit("drop-run", lambda: drop_run(directory, index_id))
    for leftover in (legacy.skip_files(directory).get(index_id), legacy.dirty_markers(directory).get(index_id)):
        if leftover is not None:
            leftover.unlink(missing_ok=True)
    commit("clear-trash", lambda: clear_trash(directory))


def clear_trash(directory: Path) -> None:
    """Delete what a killed purge left. The caller holds the index lock."""
    for trash in directory.glob(f"{TRASH_PREFIX}*"):
        shutil.rmtree(trash, ignore_errors=True)
