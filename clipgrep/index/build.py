"""``update_index``: scan -> plan -> reuse moved/copied vectors -> decode+encode -> store -> snapshot.

Crash safety: rows are written in bounded batches, each its own LanceDB
commit, so a killed run loses at most the batch in flight; the next run sees
committed rows as unchanged and redoes only the rest. A DIRTY marker says the
snapshot may lag the table; it is cleared only after a fresh snapshot is
written, so search never trusts a snapshot older than a half-finished run
without the next run fixing it.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..paths import index_dir, snapshot_dir
from .plan import RACY_WINDOW_NS, Plan, fingerprint, is_racy, make_plan, under_roots
from .scan import FileEntry, ScanOptions, scan
from .state import Skipped, load_skipped, record_run, remembered_roots, save_roots, save_skipped
from .writer import BatchWriter

if TYPE_CHECKING:
    from ..bundle import Bundle
    from ..embed.preprocess import PreprocessConfig
    from ..snapshot import Snapshot
    from ..store import IndexStore, StoredFile

DIRTY = "DIRTY"


class PixelEncoder(Protocol):
    """What indexing needs from a model; ``ImageEncoder`` is the real one, tests pass a fake."""

    config: PreprocessConfig
    batch_size: int

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class IndexOptions:
    scan: ScanOptions = ScanOptions()
    workers: int | None = None          # decode processes; None = one per available CPU
    commit_rows: int = 256              # rows per LanceDB commit: the most a crash can lose
    wait_for_lock: bool = True
    retry_skipped: bool = False          # decode previously skipped files again even if unchanged
    draft: bool = True                   # reduced-size JPEG decoding
    vector_index_min_rows: int = 50_000


@dataclass
class IndexProgress:
    phase: str = "scanning"              # scanning | planning | encoding | finishing
    scanned: int = 0
    to_encode: int = 0
    encoded: int = 0
    skipped: int = 0


@dataclass
class IndexReport:
    roots: list[str]
    scanned: int = 0
    unchanged: int = 0
    added: int = 0
    updated: int = 0
    reused: int = 0                      # moved or copied files whose vectors were reused
    removed: int = 0
    encoded: int = 0
    skipped: list[Skipped] = field(default_factory=list)   # skipped in this run (new reasons)
    skipped_total: int = 0
    scan_problems: list[tuple[str, str]] = field(default_factory=list)
    rows: int = 0
    seconds: float = 0.0
    vector_index: bool = False


Progress = Callable[[IndexProgress], None]


def update_index(roots: Sequence[str | os.PathLike[str]] = (), *, bundle: Bundle | None = None,
                 options: IndexOptions = IndexOptions(), encoder: PixelEncoder | None = None,
                 on_progress: Progress | None = None, on_wait: Callable[[], None] | None = None) -> IndexReport:
    """Bring the index of ``bundle`` up to date with ``roots`` (default: every remembered root).

    >>> report = update_index(["~/Pictures"], bundle=load_model())  # doctest: +SKIP
    >>> report.added, report.removed, len(report.skipped)            # doctest: +SKIP
    """
    from ..models import load_model
    from .lock import index_lock

    bundle = bundle or load_model()
    started = time.time()
    directory = index_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with index_lock(directory / ".lock", wait=options.wait_for_lock, on_wait=on_wait):
        root_list, missing = _resolve_roots(roots, directory)
        run = _Run(bundle, directory, root_list, options, encoder, on_progress or (lambda _: None))
        report = run.execute()
        report.scan_problems += [(root, "root not found (unmounted?); its images stay indexed, "
                                        "'clipgrep forget ROOT' drops them") for root in missing]
        save_roots(directory, remembered_roots(directory) + root_list)
        report.seconds = round(time.time() - started, 3)
        record_run(directory, bundle.index_id, {
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": report.seconds, "rows": report.rows,
            "added": report.added, "updated": report.updated, "removed": report.removed,
            "reused": report.reused, "skipped": report.skipped_total})
    return report


def _resolve_roots(roots: Sequence[str | os.PathLike[str]], directory: Path) -> tuple[list[str], list[str]]:
    """The roots to scan, and remembered roots that are missing now.

    A remembered root that vanished (an unmounted disk) is skipped, not emptied:
    deleting its rows because a drive is unplugged would throw away hours of work.
    """
    if roots:
        return sorted({os.path.abspath(os.path.expanduser(os.fspath(r))) for r in roots}), []
    remembered = remembered_roots(directory)
    if not remembered:
        return [os.getcwd()], []
    present = [r for r in remembered if os.path.exists(r)]
    return present, [r for r in remembered if r not in present]


class _Run:
    def __init__(self, bundle: Bundle, directory: Path, roots: list[str], options: IndexOptions,
                 encoder: PixelEncoder | None, on_progress: Progress) -> None:
        self.bundle = bundle
        self.directory = directory
        self.roots = roots
        self.options = options
        self.encoder = encoder
        self.progress = IndexProgress()
        self.on_progress = on_progress
        self.report = IndexReport(roots=roots)
        self.snapshot_path = snapshot_dir(bundle.index_id)
        self.dirty_marker = self.snapshot_path.parent / f"{bundle.index_id}.{DIRTY}"

    def _tick(self, **changes: object) -> None:
        for key, value in changes.items():
            setattr(self.progress, key, value)
        self.on_progress(self.progress)

    def execute(self) -> IndexReport:
        # Taken before any file is stat'ed or read: the indexed_ns of every row this run encodes,
        # so that a file rewritten after the decoder read it, within its mtime's tick, is racy.
        self.started_ns = time.time_ns()
        result = scan(self.roots, self.options.scan, on_progress=lambda n: self._tick(scanned=n))
        self.report.scanned = len(result.files)
        self.report.scan_problems = [(p.path, p.reason) for p in result.problems]
        self._tick(phase="planning", scanned=len(result.files))
        skipped = load_skipped(self.directory, self.bundle.index_id)
        # Skip notes of files deleted or excluded since: they were never stored, so no plan removes them.
        present = {e.path for e in result.files} if skipped else set()
        vanished = [p for p in skipped if p not in present and under_roots(p, self.roots)]
        if not vanished and self._snapshot_is_current(result.files, skipped):
            return self.report
        for path in vanished:
            del skipped[path]
        from ..store import IndexStore

        store = IndexStore(self.directory, self.bundle.index_id, self.bundle.embed_dim)
        store.cleanup_orphans()
        stored = store.files()
        plan = make_plan(result.files, stored, self.roots)
        self._mark_dirty()
        self._apply(plan, store, stored, skipped)
        self._finish(store, skipped)
        return self.report

    # -- fast path: nothing changed, so neither LanceDB nor the model is needed -------------------

    def _snapshot_is_current(self, files: list[FileEntry], skipped: dict[str, Skipped]) -> bool:
        """True when the snapshot already matches the scan (the common no-op re-index)."""
        from ..snapshot import read_snapshot

        if self.dirty_marker.exists() or self.options.retry_skipped:
            return False
        snapshot = read_snapshot(self.snapshot_path)
        if snapshot is None:
            return False
        # Vectorised: at 100k files a per-row loop over the memory-mapped arrays took ~0.4 s.
        row_of = dict(zip(snapshot.paths, range(len(snapshot))))
        rows = np.fromiter((row_of.get(e.path, -1) for e in files), np.int64, len(files))
        for i in np.flatnonzero(rows < 0):  # not indexed: fine only if skipped before, unchanged
            entry, old = files[i], skipped.get(files[i].path)
            if old is None or (old.size, old.mtime_ns) != (entry.size, entry.mtime_ns):
                return False
        known = rows >= 0
        rows = rows[known]
        sizes = np.fromiter((e.size for e in files), np.int64, len(files))[known]
        mtimes = np.fromiter((e.mtime_ns for e in files), np.int64, len(files))[known]
        if not (np.array_equal(snapshot.sizes[rows], sizes) and np.array_equal(snapshot.mtimes_ns[rows], mtimes)):
            return False
        if np.any(mtimes + RACY_WINDOW_NS >= snapshot.indexed_ns[rows]):
            return False
        if self._rows_under_roots(snapshot) != len(rows):
            return False  # something indexed under these roots is gone
        self.report.unchanged = len(rows)
        self.report.rows = len(snapshot)
        self.report.skipped_total = len(skipped)
        return True

    def _rows_under_roots(self, snapshot: Snapshot) -> int:
        covered = np.zeros(len(snapshot), dtype=bool)
        for root in self.roots:
            covered[snapshot.subtree(root)] = True
            exact = snapshot.find(root)  # a root that is a single image file
            if exact is not None:
                covered[exact] = True
        return int(covered.sum())

    # -- the work ---------------------------------------------------------------------------------

    def _apply(self, plan: Plan, store: IndexStore, stored: dict[str, StoredFile],
               skipped: dict[str, Skipped]) -> None:
        from ..store import StoredFile

        now = time.time_ns()
        confirmed, candidates = self._check_racy(plan, stored)
        self.report.unchanged = len(plan.unchanged) + len(confirmed)
        if confirmed:  # content unchanged: refresh indexed_ns so they stop being racy
            olds = [stored[e.path] for e in confirmed]
            vectors = store.vectors([o.path for o in olds])
            store.upsert([StoredFile(o.path, o.size, o.mtime_ns, o.fingerprint, now) for o in olds],
                         np.stack([vectors[o.path] for o in olds]))
        to_encode, reused, touched = self._reuse_vectors(candidates, store, stored, skipped, now)
        if plan.removed:  # after the reuse commit, so a crash in between loses no vector
            store.delete(plan.removed)
        self.report.removed = len(plan.removed)
        to_encode = [e for e in to_encode if not self._still_skipped(e, skipped)]
        self.report.reused = reused
        self.report.unchanged += touched
        self._encode(to_encode, store, stored, skipped, {e.path for e in plan.changed})

    def _check_racy(self, plan: Plan, stored: dict[str, StoredFile]) -> tuple[list[FileEntry], list]:
        """Racy entries whose fingerprint still matches are unchanged; the rest join new/changed."""
        confirmed, candidates = [], [(e, None) for e in plan.new] + [(e, None) for e in plan.changed]
        for entry in plan.racy:
            try:
                fp = fingerprint(entry.path, entry.size)
            except OSError:
                continue
            if fp == stored[entry.path].fingerprint:
                if is_racy(_Stamped(entry.mtime_ns, time.time_ns())):
                    plan.unchanged.append(entry.path)  # still in the window: check again next run
                    continue
                confirmed.append(entry)
            else:
                candidates.append((entry, fp))
                plan.changed.append(entry)
        return confirmed, candidates

    def _reuse_vectors(self, candidates: list, store: IndexStore, stored: dict[str, StoredFile],
                       skipped: dict[str, Skipped], now: int) -> tuple[list[tuple[FileEntry, str]], int, int]:
        """Give moved and copied files the vector of a stored file with the same fingerprint.

        Returns what is left to encode, the number of moved/copied files, and the number of
        touched ones (a new mtime on the same content: they keep their own vector).
        """
        from ..store import StoredFile

        by_fingerprint = {s.fingerprint: s.path for s in stored.values()}
        reuse, to_encode = [], []
        for entry, fp in candidates:
            try:
                fp = fp or fingerprint(entry.path, entry.size)
            except OSError:
                to_encode.append((entry, ""))  # let the decoder report why it is unreadable
                continue
            source = by_fingerprint.get(fp)
            if source is not None and stored[source].size == entry.size:
                reuse.append((entry, fp, source))
            else:
                to_encode.append((entry, fp))
        if reuse:
            vectors = store.vectors(sorted({s for _, _, s in reuse}))
            for start in range(0, len(reuse), self.options.commit_rows):
                chunk = reuse[start:start + self.options.commit_rows]
                store.upsert([StoredFile(e.path, e.size, e.mtime_ns, fp, now) for e, fp, _ in chunk],
                             np.stack([vectors[s] for _, _, s in chunk]))
            for entry, _, _ in reuse:  # e.g. a skipped file replaced by a copy of an indexed one
                skipped.pop(entry.path, None)
        touched = sum(1 for entry, _, source in reuse if source == entry.path)
        return to_encode, len(reuse) - touched, touched

    def _still_skipped(self, item: tuple[FileEntry, str], skipped: dict[str, Skipped]) -> bool:
        entry = item[0]
        old = skipped.get(entry.path)
        if old is None or self.options.retry_skipped:
            return False
        return (old.size, old.mtime_ns) == (entry.size, entry.mtime_ns)

    def _encode(self, items: list[tuple[FileEntry, str]], store: IndexStore, stored: dict[str, StoredFile],
                skipped: dict[str, Skipped], changed: set[str]) -> None:
        """Decode in worker processes, encode in batches, commit every ``commit_rows`` rows."""
        from .decode import decode_images

        self._tick(phase="encoding", to_encode=len(items))
        if not items:
            return
        encoder = self.encoder or self.bundle.image_encoder()
        writer = BatchWriter(encoder, store, self.options.commit_rows, indexed_ns=self.started_ns)
        decoded = decode_images([e.path for e, _ in items], encoder.config, workers=self.options.workers,
                                draft=self.options.draft)
        with contextlib.closing(decoded):  # stops the worker processes even if encoding fails
            for result in decoded:
                entry, fp = items[result.index]
                if result.pixels is None:
                    skipped[entry.path] = Skipped(entry.path, entry.size, entry.mtime_ns,
                                                  result.skip_reason or "unknown error")
                    self.report.skipped.append(skipped[entry.path])
                    self._tick(skipped=self.progress.skipped + 1)
                    if entry.path in stored:  # it no longer decodes: its row describes old content
                        store.delete([entry.path])  # now, before any save_skipped records the skip
                    continue
                committed = writer.add(entry, fp or _safe_fingerprint(entry), result.pixels)
                self._count_committed(committed, skipped, changed)
                self._tick(encoded=writer.encoded)
        self._count_committed(writer.close(), skipped, changed)
        self.report.encoded = writer.encoded
        self._tick(encoded=writer.encoded)

    def _count_committed(self, committed: list[str], skipped: dict[str, Skipped], changed: set[str]) -> None:
        if not committed:
            return
        for path in committed:
            skipped.pop(path, None)
            if path in changed:
                self.report.updated += 1
            else:
                self.report.added += 1
        save_skipped(self.directory, self.bundle.index_id, skipped)

    def _finish(self, store: IndexStore, skipped: dict[str, Skipped]) -> None:
        from ..snapshot import write_snapshot

        self._tick(phase="finishing")
        save_skipped(self.directory, self.bundle.index_id, skipped)
        # Index first: maintain() then folds the newest rows into it and prunes old versions.
        self.report.vector_index = store.ensure_vector_index(self.options.vector_index_min_rows)
        store.maintain()
        rows = store.snapshot_rows()
        write_snapshot(self.snapshot_path, *rows, meta={"bundle_id": self.bundle.index_id,
                                                         "embed_dim": self.bundle.embed_dim,
                                                         "table_version": store.version(),
                                                         "vector_index": self.report.vector_index})
        self.report.rows = len(rows.paths)
        self.report.skipped_total = len(skipped)
        self.dirty_marker.unlink(missing_ok=True)

    def _mark_dirty(self) -> None:
        self.dirty_marker.parent.mkdir(parents=True, exist_ok=True)
        self.dirty_marker.touch()


@dataclass(frozen=True)
class _Stamped:
    mtime_ns: int
    indexed_ns: int


def _safe_fingerprint(entry: FileEntry) -> str:
    try:
        return fingerprint(entry.path, entry.size)
    except OSError:
        return ""
