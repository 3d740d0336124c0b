"""``update_index``: scan -> plan -> reuse moved/copied vectors -> decode+encode -> store -> snapshot.

Crash safety: rows are written in bounded batches, each its own LanceDB
commit, so a killed run loses at most the batch in flight; the next run sees
committed rows as unchanged and redoes only the rest. Rows are also committed
every ``commit_seconds``, so a slow run keeps its work too. Every write goes
through ``protocol.py``, which names the steps; a snapshot left behind the table
by a killed run is told by its stamp, and the next run (``protocol.recover``)
rebuilds it, as it does a damaged one.

SIGINT/SIGTERM stop a run at its next image: it commits what it encoded, publishes
the snapshot and raises ``IndexInterrupted`` (see ``interrupt.py``).
"""
from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..errors import ClipgrepError
from ..paths import index_dir, index_lock_file, snapshot_dir
from ..store import Skipped
from .interrupt import IndexInterrupted, StopRequest, stop_on_signals
from .plan import IMPORTED_FINGERPRINT, FileState, Plan, changes, fingerprint, is_racy, make_plan, under_roots
from .protocol import commit, finish, publish_snapshot, recover
from .roots import RootSet, Selection
from .scan import FileEntry, ScanOptions, ScanProblem, ScanResult, scan
from .writer import BatchWriter

if TYPE_CHECKING:
    from ..bundle import Bundle
    from ..embed.preprocess import PreprocessConfig
    from ..snapshot import Snapshot
    from ..store import IndexStore, StoredFile

__all__ = ["IndexOptions", "IndexProgress", "IndexReport", "publish_snapshot", "update_index"]


class PixelEncoder(Protocol):
    """What indexing needs from a model; ``ImageEncoder`` is the real one, tests pass a fake."""

    config: PreprocessConfig
    batch_size: int

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class IndexOptions:
    scan: ScanOptions = field(default_factory=ScanOptions)  # its excludes are added to the roots indexed, and remembered
    remove_excludes: tuple[str, ...] = ()  # remembered excludes to drop, as they were given
    prune: bool = False                  # drop rows of files left out now, and of roots that look unmounted
    workers: int | None = None          # decode processes; None = one per available CPU
    commit_rows: int = 256              # rows per LanceDB commit: the most a crash can lose
    commit_seconds: float = 10.0         # ... or the rows encoded in this long, whichever comes first
    wait_for_lock: bool = True
    retry_skipped: bool = False          # decode previously skipped files again even if unchanged
    draft: bool = True                   # reduced-size JPEG decoding

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 0:  # checked before the lock, the model and the scan
            raise ClipgrepError(f"the number of decoding workers must be 0 or more, not {self.workers}",
                                "e.g. --workers 2; 0 decodes in the indexing process itself")


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
    skipped_files: list[Skipped] = field(default_factory=list)  # every file skipped now, by any run
    kept: int = 0                        # rows that would have gone without --prune (see _Run._hold_back)
    scan_problems: list[tuple[str, str]] = field(default_factory=list)
    rows: int = 0
    seconds: float = 0.0


Progress = Callable[[IndexProgress], None]


def update_index(roots: Sequence[str | os.PathLike[str]] = (), *, bundle: Bundle | None = None,
                 options: IndexOptions = IndexOptions(), encoder: PixelEncoder | None = None,
                 on_progress: Progress | None = None, on_wait: Callable[[], None] | None = None) -> IndexReport:
    """Bring the index of ``bundle`` up to date with ``roots`` (default: every remembered root and file).

    ``options.scan.excludes`` are remembered with the roots (see ``roots.py``). Rows of files that
    are still there but left out now, and of roots that look unmounted, are kept (counted in
    ``report.kept``, with a warning in ``report.scan_problems``) unless ``options.prune``.

    On SIGINT/SIGTERM (main thread only) it stops at the next image, keeps what it encoded
    and raises ``IndexInterrupted`` (a KeyboardInterrupt) with the report.

    >>> report = update_index(["~/Pictures"], bundle=load_model())  # doctest: +SKIP
    >>> report.added, report.removed, len(report.skipped)            # doctest: +SKIP
    """
    from ..models import load_model

    bundle = bundle or load_model()
    started = time.time()
    with index_writer(bundle, options.wait_for_lock, on_wait) as (directory, stop):
        tracked = RootSet.load(directory)
        args = [os.path.abspath(os.path.expanduser(os.fspath(r))) for r in roots]
        tracked.remove_excludes(options.remove_excludes, args)
        excludes = options.scan.excludes
        selection = tracked.select(args, (excludes,) if isinstance(excludes, str) else tuple(excludes))
        run = _Run(bundle, directory, selection, tracked, options, encoder, on_progress or (lambda _: None), stop)
        report = run.execute()
        missing = "not found (unmounted?); its images stay indexed, 'clipgrep forget PATH' drops them"
        report.scan_problems += [(path, missing) for path in selection.missing]
        tracked.save(directory)  # also when interrupted, so that a rerun resumes these roots
        report.seconds = round(time.time() - started, 3)
        if stop.signum is not None:
            raise IndexInterrupted(stop.signum, report, report.added + report.updated + report.reused)
        if run.wrote:  # a no-op run (the fast path) stays free of lancedb: it records nothing
            from ..store import record_run

            commit("run", lambda: record_run(directory, bundle.index_id, {
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": report.seconds, "rows": report.rows,
                "added": report.added, "updated": report.updated, "removed": report.removed,
                "reused": report.reused, "skipped": report.skipped_total}))
    return report


@contextlib.contextmanager
def index_writer(bundle: Bundle, wait: bool, on_wait: Callable[[], None] | None
                 ) -> Iterator[tuple[Path, StopRequest]]:
    """The index directory and the run's stop request, for a run that writes ``bundle``'s index:
    under the index lock, the model checked still installed, what a killed writer left recovered.

    Signals are caught only once the lock is held: Ctrl-C while waiting for it just quits.
    """
    from .lock import index_lock

    directory = index_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with index_lock(index_lock_file(), wait=wait, on_wait=on_wait), stop_on_signals() as stop:
        _check_still_installed(bundle)
        recover(directory)
        yield directory, stop


def _check_still_installed(bundle: Bundle) -> None:
    """Refuse to go on if the model was removed or replaced before the lock was ours.

    ``models remove`` and ``models add --replace`` take the index lock, so once it is
    held the model stays put; but they may have run while this run waited for it.
    """
    from ..bundle import load_bundle
    from ..errors import BundleError, ClipgrepError

    try:
        current = load_bundle(bundle.path).bundle_id
    except BundleError:
        current = None
    if current != bundle.bundle_id:
        raise ClipgrepError(f"model {bundle.name} was {'replaced' if current else 'removed'} while this run "
                            "waited for the index lock", "run clipgrep index again")


class _Stopped(Exception):
    """A signal arrived before this run wrote anything."""


class _Run:
    def __init__(self, bundle: Bundle, directory: Path, selection: Selection, tracked: RootSet,
                 options: IndexOptions, encoder: PixelEncoder | None, on_progress: Progress,
                 stop: StopRequest) -> None:
        self.bundle = bundle
        self.directory = directory
        self.units = selection.units
        # Where rows may go: what is walked, and remembered files that were deleted.
        self.roots = [u.path for u in self.units] + selection.gone
        self.tracked = tracked
        self.options = options
        self.suspect: dict[str, str] = {}    # root -> why its rows look like those of an unmounted drive
        self.held: set[str] = set()          # suspect roots whose rows this run kept
        self.device_now: dict[str, int] = {}
        self.encoder = encoder
        self.progress = IndexProgress()
        self.on_progress = on_progress
        self.report = IndexReport(roots=[u.path for u in self.units])
        self.stop = stop
        self.snapshot_path = snapshot_dir(bundle.index_id)
        self.wrote = False                   # whether the run went past the no-op fast path

    def _tick(self, **changes: object) -> None:
        for key, value in changes.items():
            setattr(self.progress, key, value)
        if self.stop.signum is not None and self.progress.phase in ("scanning", "planning"):
            raise _Stopped  # nothing written yet: nothing to finish
        self.on_progress(self.progress)

    def execute(self) -> IndexReport:
        try:
            return self._execute()
        except _Stopped:
            return self.report

    def _execute(self) -> IndexReport:
        # Taken before any file is stat'ed or read: the indexed_ns of every row this run encodes,
        # so that a file rewritten after the decoder read it, within its mtime's tick, is racy.
        self.started_ns = time.time_ns()
        result = self._scan()
        self.tracked.save(self.directory)  # what the user asked to index, before any work: a rerun resumes it
        self.report.scanned = len(result.files)
        self.report.scan_problems = [(p.path, p.reason) for p in result.problems]
        self._tick(phase="planning", scanned=len(result.files))
        if self._snapshot_is_current(result.files):
            from ..ann import ensure_ivf

            ensure_ivf(self.snapshot_path)  # redoes a build that was killed after its snapshot was published
            self._record_devices()
            return self.report
        from ..store import IndexStore

        self.wrote = True
        store = IndexStore(self.directory, self.bundle.index_id, self.bundle.embed_dim)
        commit("orphans", store.cleanup_orphans)
        stored, skipped = store.files(), store.skipped()
        plan = make_plan(result.files, stored, self.roots)
        plan.removed = self._hold_back(plan.removed, report=True)
        # Skip notes of files deleted or excluded since: no plan removes them, as they have no row.
        plan.removed += self._vanished(skipped, result.files)
        self._apply(plan, store, stored, skipped)
        self._finish(store)
        self._record_devices()
        return self.report

    def _vanished(self, skipped: dict[str, Skipped], files: list[FileEntry]) -> list[str]:
        present = {e.path for e in files} if skipped else set()
        return [p for p in skipped if p not in present and under_roots(p, self.roots)
                and (self.options.prune or not under_roots(p, list(self.suspect)))]

    # -- what may be deleted (issue 12, items 1 and 16) -------------------------------------------

    def _scan(self) -> ScanResult:
        """Walk each root with its own excludes; note the roots whose rows would all look deleted
        because their drive is not mounted (another device at the path, or nothing in it)."""
        files: list[FileEntry] = []
        problems: list[ScanProblem] = []
        excluded = 0
        for unit in self.units:
            def progress(n: int, before: int = self.progress.scanned) -> None:  # entries seen, over all roots
                self._tick(scanned=before + n)

            result = scan([unit.path], replace(self.options.scan, excludes=unit.excludes), on_progress=progress)
            files += result.files
            problems += result.problems
            excluded += result.excluded
            with contextlib.suppress(OSError):
                self.device_now[unit.path] = os.stat(unit.path).st_dev
            if unit.path in self.tracked.roots and unit.path in self.device_now:
                if unit.device is not None and self.device_now[unit.path] != unit.device:
                    self.suspect[unit.path] = "is on another device than when it was indexed"
                elif not result.files:
                    self.suspect[unit.path] = "is empty now"
        return ScanResult(sorted(files, key=lambda e: e.path), problems, excluded)

    def _hold_back(self, paths: list[str], report: bool) -> list[str]:
        """The rows of ``paths`` (indexed, not found by the scan) that this run may delete.

        Without ``prune``, only rows of files that are really gone are deleted: a file that is
        still there but left out now (an exclude, the hidden or symlink rule, an unreadable
        folder) keeps its row, and so does every row of a root that looks unmounted. Each root
        that keeps rows gets one warning; ``report`` says whether to record them.
        """
        if self.options.prune or not paths:
            return paths
        deletable: list[str] = []
        kept: dict[str, tuple[int, str]] = {}
        for path in paths:
            root = next((r for r in self.suspect if under_roots(path, [r])), None)
            if root is not None:
                why = f"{self.suspect[root]} (a drive that is not mounted?)"
            elif _still_there(path):
                root = next((r for r in self.roots if under_roots(path, [r])), path)
                why = "excluded now or unreadable"
            else:
                deletable.append(path)
                continue
            count, _ = kept.get(root, (0, why))
            kept[root] = (count + 1, why)
        if report:
            self.held = {root for root in kept if root in self.suspect}
            self.report.kept = sum(count for count, _ in kept.values())
            self.report.scan_problems += [
                (root, f"{count} indexed images kept: {why}; 'clipgrep index --prune' drops them")
                for root, (count, why) in sorted(kept.items())]
        return deletable

    def _record_devices(self) -> None:
        """Remember each root's device, except where rows were kept because it changed."""
        for path, device in self.device_now.items():
            if path not in self.held:
                self.tracked.record_device(path, device)

    # -- fast path: nothing changed, so neither LanceDB nor the model is needed -------------------

    def _snapshot_is_current(self, files: list[FileEntry]) -> bool:
        """True when the snapshot already matches the scan (the common no-op re-index).

        ``protocol.recover`` has made the snapshot current with its table, so comparing with it
        is comparing with the table, without lancedb.
        """
        from ..snapshot import read_snapshot
        from .freshness import is_current, skipped_in

        if self.options.retry_skipped:
            return False
        try:
            snapshot = read_snapshot(self.snapshot_path)
        except ClipgrepError:  # damaged: the full run below writes a new one from the table
            return False
        if snapshot is None or not is_current(snapshot, self.bundle.index_id):
            return False
        if snapshot.meta.get("roots") != self.tracked.paths():  # roots came or went: publish them
            return False
        skipped = skipped_in(snapshot)
        if self._vanished(skipped, files):
            return False
        # Vectorised: at 100k files a per-row loop over the memory-mapped arrays took ~0.4 s.
        row_of = dict(zip(snapshot.paths, range(len(snapshot))))
        rows = np.fromiter((row_of.get(e.path, -1) for e in files), np.int64, len(files))
        for i in np.flatnonzero(rows < 0):  # not indexed: fine only if skipped before, unchanged
            if not _skip_holds(skipped.get(files[i].path), files[i]):
                return False
        known = rows >= 0
        rows = rows[known]
        sizes = np.fromiter((e.size for e in files), np.int64, len(files))[known]
        mtimes = np.fromiter((e.mtime_ns for e in files), np.int64, len(files))[known]
        if changes(sizes, mtimes, snapshot.sizes[rows], snapshot.mtimes_ns[rows], snapshot.indexed_ns[rows]).any():
            return False
        # Rows under these roots that the scan did not find: gone, unless they are to be kept
        # or were imported (make_plan never removes those either).
        gone = [snapshot.paths[i] for i in np.setdiff1d(self._rows_under_roots(snapshot), rows)
                if snapshot.fingerprint(i) != IMPORTED_FINGERPRINT]
        if self._hold_back(gone, report=False):
            return False
        self._hold_back(gone, report=True)
        self.report.unchanged = len(rows)
        self.report.rows = len(snapshot)
        self.report.skipped_total = len(skipped)
        self.report.skipped_files = sorted(skipped.values(), key=lambda s: s.path)
        return True

    def _rows_under_roots(self, snapshot: Snapshot) -> np.ndarray:
        covered = np.zeros(len(snapshot), dtype=bool)
        for root in self.roots:
            covered[snapshot.subtree(root)] = True
            exact = snapshot.find(root)  # a remembered file
            if exact is not None:
                covered[exact] = True
        return np.flatnonzero(covered)

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
            commit("racy", lambda: store.upsert([StoredFile(o.path, o.size, o.mtime_ns, o.fingerprint, now)
                                                 for o in olds], np.stack([vectors[o.path] for o in olds])))
        to_encode, reused, touched = self._reuse_vectors(candidates, store, stored, skipped, now)
        if plan.removed:  # after the reuse commit, so a crash in between loses no vector
            commit("remove", lambda: store.delete(plan.removed))
        self.report.removed = len([p for p in plan.removed if p in stored])
        to_encode = [e for e in to_encode if not self._still_skipped(e, skipped)]
        self.report.reused = reused
        self.report.unchanged += touched
        self._encode(to_encode, store, {e.path for e in plan.changed})

    def _check_racy(self, plan: Plan, stored: dict[str, StoredFile]
                    ) -> tuple[list[FileState], list[tuple[FileState, str | None]]]:
        """Racy entries whose fingerprint still matches are unchanged; the rest join new/changed."""
        confirmed: list[FileState] = []
        candidates: list[tuple[FileState, str | None]] = [(e, None) for e in [*plan.new, *plan.changed]]
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
                rows = [StoredFile(e.path, e.size, e.mtime_ns, fp, now) for e, fp, _ in chunk]
                commit("reuse", functools.partial(store.upsert, rows, np.stack([vectors[s] for _, _, s in chunk])))
            for entry, _, _ in reuse:  # e.g. a skipped file replaced by a copy of an indexed one
                skipped.pop(entry.path, None)
        touched = sum(1 for entry, _, source in reuse if source == entry.path)
        return to_encode, len(reuse) - touched, touched

    def _still_skipped(self, item: tuple[FileEntry, str], skipped: dict[str, Skipped]) -> bool:
        return not self.options.retry_skipped and _skip_holds(skipped.get(item[0].path), item[0])

    def _encode(self, items: list[tuple[FileEntry, str]], store: IndexStore, changed: set[str]) -> None:
        """Decode in worker processes, encode in batches, commit every ``commit_rows`` rows."""
        from .decode import decode_images

        self._tick(phase="encoding", to_encode=len(items))
        if not items or self.stop.signum is not None:
            return
        encoder = self.encoder or self.bundle.image_encoder()
        writer = BatchWriter(encoder, store, self.options.commit_rows, self.options.commit_seconds,
                             indexed_ns=self.started_ns)
        decoded = decode_images([e.path for e, _ in items], encoder.config, workers=self.options.workers,
                                draft=self.options.draft)
        with contextlib.closing(decoded):  # stops the worker processes even if encoding fails
            for result in decoded:
                if self.stop.signum is not None:
                    break  # what was encoded so far is committed just below
                entry, fp = items[result.index]
                if result.pixels is None:
                    # A row it had (old content) is replaced by the skip note in the same commit.
                    note = Skipped(entry.path, entry.size, entry.mtime_ns, result.skip_reason or "unknown error")
                    self.report.skipped.append(note)
                    self._tick(skipped=self.progress.skipped + 1)
                    self._count_committed(writer.skip(note), changed)
                    continue
                committed = writer.add(entry, fp or _safe_fingerprint(entry), result.pixels)
                self._count_committed(committed, changed)
                self._tick(encoded=writer.encoded)
        self._count_committed(writer.close(), changed)
        self.report.encoded = writer.encoded
        self._tick(encoded=writer.encoded)

    def _count_committed(self, committed: list[str], changed: set[str]) -> None:
        for path in committed:
            if path in changed:
                self.report.updated += 1
            else:
                self.report.added += 1

    def _finish(self, store: IndexStore) -> None:
        self._tick(phase="finishing")
        # An interrupted run leaves the slow upkeep to the next one.
        self.report.rows, skipped = finish(store, upkeep=self.stop.signum is None)
        self.report.skipped_total = len(skipped)
        self.report.skipped_files = sorted(skipped.values(), key=lambda s: s.path)


@dataclass(frozen=True)
class _Stamped:
    mtime_ns: int
    indexed_ns: int


def _skip_holds(note: Skipped | None, entry: FileEntry) -> bool:
    """Whether a skip note still applies: the file is as it was when it failed to decode."""
    return note is not None and (note.size, note.mtime_ns) == (entry.size, entry.mtime_ns)


def _still_there(path: str) -> bool:
    """Whether ``path`` may still exist: only "no such file" says it is gone, not a folder
    that cannot be read now."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True
    return True


def _safe_fingerprint(entry: FileEntry) -> str:
    try:
        return fingerprint(entry.path, entry.size)
    except OSError:
        return ""
