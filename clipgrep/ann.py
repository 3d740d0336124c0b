"""Approximate search for big snapshots: an IVF partitioning of the snapshot's own vectors.

Brute force reads every vector per query (2 GB at 10^6 rows), so above
``exact_max_rows()`` rows an index run adds an inverted file to the snapshot
generation it just published: spherical k-means centroids, and every row's vector
as int8 codes stored grouped by partition. A query scores the centroids, reads
the codes of the ``nprobe`` nearest partitions (a few contiguous ranges), and
rescores the best ``RESCORE`` candidates exactly with the snapshot's float32
vectors, so returned scores are exact. benchmarks/bench_scale.py measured this
against LanceDB's IVF_PQ/IVF_HNSW_SQ and an int8 snapshot (README: "Search at scale").

Layout, inside a snapshot generation (numpy + stdlib, memory-mapped)::

    ivf/                   present only when complete (written as .ivf-<pid>, then renamed)
        centroids.npy      float32 [P, D], unit rows
        offsets.npy        int64 [P + 1]: partition p holds grouped rows offsets[p]:offsets[p + 1]
        rows.npy           int64 [N]: the snapshot row of each grouped row
        codes.npy          int8 [N, D]: round(vector / scales), grouped
        scales.npy         float32 [D]: per-dimension step, so q . v ~= (q * scales) . codes
        hashes.npy         uint64 [N]: a hash of each grouped row's vector bytes
        coarse.npy         float32 [C, D]: the coarse k-means level the partitions were split from
        cells.npy          int64 [C + 1]: coarse cell c holds partitions cells[c]:cells[c + 1]
        meta.json          format, rows, partitions, nprobe, exact_max_rows, trained_rows

Past ``FLAT_MAX_PARTITIONS`` the k-means is two-level (C ~ sqrt(P) coarse cells, each split into
partitions in proportion to its rows; a row goes to the best partition of its ``SPILL_CELLS`` best
cells), so a build scores each row against ~4 sqrt(P) centroids instead of P: flat k-means and
assignment at 10^7 rows (~20,000 partitions) would be ~10^14 multiply-adds, hours on 2 cores.
Below it there is one coarse cell. Search scores every partition's centroid either way (the
coarse level serves only the build).

The next generation's build (``publish`` passes it ``live_training``) reuses the centroids and
scales while its rows stay within ``REUSE_GROWTH``x of the rows they were trained on
(``trained_rows``), and keeps the partition of every vector it finds by hash, so adding 1% of
rows costs no k-means and scores only the new rows against the centroids; past that bound it
trains afresh. A generation without ``ivf/`` (small, or its build was interrupted) is searched
exactly; so is one whose ``ivf/`` does not match it. Nothing here ever fails a search.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from .snapshot import fsync_path

if TYPE_CHECKING:
    from collections.abc import Callable

    from .snapshot import Snapshot

FORMAT = "clipgrep-ivf"
FORMAT_VERSION = 1
DIRECTORY = "ivf"
# Up to this many rows (in the whole snapshot, or in a --under subtree) search brute-forces them.
# bench_scale.py, quiet run: 27 ms per query at 10^5 rows, half the inverted file's 52 ms; at
# 10^6 brute force was ~10x slower than it. The crossover lies between; 2*10^5 rows still fit the
# 0.5 s target by linear extrapolation of the 10^5 figures (README: "Search at scale").
EXACT_MAX_ROWS = 200_000
EXACT_MAX_ROWS_ENV = "CLIPGREP_EXACT_MAX_ROWS"
ROWS_PER_PARTITION = 512  # ~2*sqrt(N) partitions at 10^6: a cheap centroid scan, small ranges to read
NPROBE_FRACTION = 1 / 64  # with MIN_NPROBE: recall@10 1.0 / 0.999 at 10^5 / 10^6 clustered rows (16: 0.98 / 0.97)
MIN_NPROBE = 32
# At 10^7 rows (19,530 partitions) 1/64 is 306 probes, 260 ms per query warm, for recall 1.0; 32, 64
# and 128 probes gave 0.998 (31, 56, 121 ms; 16 gave 0.982). 128 keeps a margin for harder data.
MAX_NPROBE = 128
SCAN_ROWS = 32_768  # probed rows scored per step (64 MB of float32 at 512 dims)
RESCORE = 200  # candidates rescored exactly, at least RESCORE_PER_RESULT * k
RESCORE_PER_RESULT = 20
KMEANS_SAMPLE_PER_PARTITION = 32
KMEANS_SAMPLE_MAX = 1 << 19  # rows held in memory for k-means (1 GB at 512 dims): ~27 per partition at 10^7
COARSE_SAMPLE_PER_CELL = 256  # of that sample, for the coarse level
SPILL_CELLS = 3  # coarse cells whose partitions a row is scored against when assigned
# Up to this many partitions (~2*10^6 rows) k-means is flat: the build stays well under a minute per
# 10^6 rows, and two levels cost a little recall (test clusters, 60 queries x 3 seeds: 0.995 vs 1.0).
FLAT_MAX_PARTITIONS = 4_096
KMEANS_ITERATIONS = 8
REFINE_ITERATIONS = 3  # rounds over the whole sample after the two levels (see _train)
CHUNK_ROWS = 65_536  # rows per step of the assignment (128 MB at 512 dims): bounded memory whatever N is
SCORE_ROWS = 8_192  # rows scored against every centroid at once: 64 MB at 2,000 partitions
PERMUTE_ROWS = 32_768  # rows read, encoded and written per step of write_permuted: 64 MB at 512 dims
# Reused centroids keep their count, so 2x growth doubles the rows a query reads (mean partition
# 1024 rows) and 2x shrinkage halves them (recall then rests on fewer candidates); beyond that, or
# when new rows drift to other topics, the partitions would fit the library poorly: train afresh.
REUSE_GROWTH = 2.0
HASH_SEED = 0x1F5  # fixed: the hashes of one build are compared with the next one's
HASH_ROWS = 8_192  # rows per step of hashing (64 MB of uint64 products at D=1024)


def exact_max_rows() -> int:
    """Rows up to which search stays exact (``CLIPGREP_EXACT_MAX_ROWS`` overrides, e.g. in tests)."""
    value = os.environ.get(EXACT_MAX_ROWS_ENV, "")
    return int(value) if value.isdigit() else EXACT_MAX_ROWS


@dataclass(frozen=True)
class Ivf:
    """One generation's inverted file, memory-mapped. Load with ``load_ivf``."""

    centroids: np.ndarray
    offsets: np.ndarray
    rows: np.ndarray
    codes: np.ndarray
    scales: np.ndarray
    nprobe: int
    exact_max_rows: int
    trained_rows: int  # the rows its centroids and scales were fitted to (maybe an older generation's)

    @property
    def partitions(self) -> int:
        return len(self.centroids)

    @property
    def probed_rows(self) -> float:
        """Rows an unfiltered query scores, on average."""
        return self.nprobe * len(self.rows) / max(self.partitions, 1)

    def describe(self) -> str:
        return f"approximate (IVF, {self.partitions} partitions, {self.nprobe} probed, exact rescoring)"

    def top(self, vectors: np.ndarray, query: np.ndarray, k: int, within: slice | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
        """Snapshot rows of (about) the ``k`` best matches, optionally only rows in ``within``, and
        their exact scores against ``vectors`` (the snapshot's float32 rows)."""
        order = np.argsort(-(self.centroids @ query), kind="stable")
        if within is None:  # every probed row counts
            candidates, approx = self._scan(order[:self.nprobe], query)
        else:
            candidates, approx = self._scan_within(order, query, within)
        keep = max(RESCORE, RESCORE_PER_RESULT * k)
        if len(candidates) > keep:
            best = np.argpartition(-approx, keep - 1)[:keep]
            candidates = candidates[best]
        candidates = np.sort(candidates)  # ascending rows: the float32 reads go forward through the file
        exact = read_ranges(vectors, [(int(r), int(r) + 1) for r in candidates]) @ query
        return candidates, np.asarray(exact, dtype=np.float32)

    def _scan(self, partitions: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The rows of ``partitions`` and their approximate scores, codes read and scored about
        ``SCAN_ROWS`` rows at a time (a float32 copy of all 150,000 probed at 10^7 would be 300 MB)."""
        ranges = [(int(self.offsets[p]), int(self.offsets[p + 1])) for p in partitions]
        weights = query * self.scales
        ends = np.cumsum([b - a for a, b in ranges]) // SCAN_ROWS
        groups = np.split(np.arange(len(ranges)), np.flatnonzero(np.diff(ends)) + 1)
        scores = [read_ranges(self.codes, [ranges[i] for i in group]).astype(np.float32) @ weights for group in groups]
        return read_ranges(self.rows, ranges), np.concatenate(scores)

    def _scan_within(self, order: np.ndarray, query: np.ndarray, within: slice) -> tuple[np.ndarray, np.ndarray]:
        """Probe partitions nearest first until as many rows of the subtree were scored as an
        unfiltered query scores (so a subtree's recall does not collapse), or all were probed."""
        wanted = self.probed_rows
        found_rows, found_scores, seen = [], [], 0
        for start in range(0, len(order), self.nprobe):
            rows, scores = self._scan(order[start:start + self.nprobe], query)
            inside = (rows >= within.start) & (rows < within.stop)
            found_rows.append(rows[inside])
            found_scores.append(scores[inside])
            seen += int(inside.sum())
            if seen >= wanted:
                break
        return np.concatenate(found_rows), np.concatenate(found_scores)


def read_ranges(array: np.ndarray, ranges: list[tuple[int, int]]) -> np.ndarray:
    """``array[a:b]`` for each range, concatenated; from a memory-mapped file, one ``pread`` per
    range. Page faults read ahead in small steps: cold, 200 single rows of a 10^6-row file took
    0.9 s through the mapping and 0.05 s by pread."""
    filename, offset = getattr(array, "filename", None), getattr(array, "offset", 0)
    row_bytes = array.itemsize * int(np.prod(array.shape[1:]))
    try:
        whole_file = filename is not None and os.path.getsize(filename) == offset + len(array) * row_bytes
        if not (whole_file and array.flags.c_contiguous):
            return _sliced(array, ranges)
        fd = os.open(filename, os.O_RDONLY)  # type: ignore[arg-type]  # whole_file: not None
    except OSError:  # the generation was replaced and deleted meanwhile: the mapping still reads it
        return _sliced(array, ranges)
    try:
        data = b"".join(os.pread(fd, (b - a) * row_bytes, offset + a * row_bytes) for a, b in ranges)
    finally:
        os.close(fd)
    if len(data) != sum(b - a for a, b in ranges) * row_bytes:
        return _sliced(array, ranges)
    return np.frombuffer(data, dtype=array.dtype).reshape(-1, *array.shape[1:])


def _sliced(array: np.ndarray, ranges: list[tuple[int, int]]) -> np.ndarray:
    return np.concatenate([array[a:b] for a, b in ranges]) if ranges else np.asarray(array[:0])


def approximate_index(snapshot: Snapshot, rows: int, k: int) -> Ivf | None:
    """The inverted file to search ``rows`` rows of ``snapshot`` for the top ``k`` with, or None
    to brute-force them: few rows, or a ``k`` too big for the rows that ``nprobe`` partitions hold."""
    ivf = load_ivf(snapshot.generation, len(snapshot), snapshot.vectors.shape[1])
    if ivf is None or rows <= ivf.exact_max_rows or RESCORE_PER_RESULT * k > ivf.probed_rows:
        return None
    return ivf


def search_mode(snapshot: Snapshot | None) -> str:
    """How ``clipgrep search`` searches the whole of ``snapshot``, in words (for status); a ``-k``
    beyond what the probed partitions hold is still exact."""
    ivf = None if snapshot is None else load_ivf(snapshot.generation, len(snapshot), snapshot.vectors.shape[1])
    return ivf.describe() if snapshot is not None and ivf is not None and len(snapshot) > ivf.exact_max_rows \
        else "exact"


def load_ivf(generation: Path | None, rows: int, dim: int) -> Ivf | None:
    """The complete inverted file of a generation of ``rows`` x ``dim`` vectors, or None
    (none built, build interrupted, generation replaced meanwhile, or damaged)."""
    if generation is None:
        return None
    directory = generation / DIRECTORY
    try:
        meta = json.loads((directory / "meta.json").read_bytes())
        arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r", allow_pickle=False)
                  for name in ("centroids", "offsets", "rows", "codes", "scales")}
    except (OSError, ValueError):
        return None
    if not (isinstance(meta, dict) and meta.get("format") == FORMAT and meta.get("format_version") == FORMAT_VERSION
            and meta.get("rows") == rows and arrays["codes"].shape == (rows, dim)
            and arrays["rows"].shape == (rows,) and arrays["scales"].shape == (dim,)
            and arrays["centroids"].ndim == 2 and arrays["centroids"].shape[1] == dim
            and arrays["offsets"].shape == (len(arrays["centroids"]) + 1,)
            and arrays["offsets"][-1] == rows):
        return None
    return Ivf(arrays["centroids"], arrays["offsets"], arrays["rows"], arrays["codes"], arrays["scales"],
               int(meta.get("nprobe", MIN_NPROBE)), int(meta.get("exact_max_rows", EXACT_MAX_ROWS)),
               int(meta.get("trained_rows", rows)))


@dataclass(frozen=True)
class Training:
    """What an inverted file's build fitted to the rows (k-means centroids, int8 scales), and the
    partitions it gave vectors (by hash, sorted), in memory: the next generation's build reuses it
    while the library has not grown or shrunk too much."""

    centroids: np.ndarray  # [P, D], grouped by coarse cell
    scales: np.ndarray
    rows: int
    coarse: np.ndarray  # [C, D]
    cells: np.ndarray  # [C + 1]: coarse cell c holds partitions cells[c]:cells[c + 1]
    hashes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def fits(self, rows: int, dim: int) -> bool:
        return self.centroids.shape[1] == dim and self.rows / REUSE_GROWTH <= rows <= self.rows * REUSE_GROWTH

    def assign(self, vectors: np.ndarray, hashes: np.ndarray) -> np.ndarray:
        """Each row's partition: a vector seen before keeps its own (its nearest centroid is the
        same); only the others are scored, ``CHUNK_ROWS`` at a time."""
        labels = np.empty(len(vectors), np.int64)
        known = np.zeros(len(vectors), bool)
        if len(self.hashes):
            at = np.minimum(np.searchsorted(self.hashes, hashes), len(self.hashes) - 1)
            known = self.hashes[at] == hashes
            labels[known] = self.labels[at[known]]
        new = np.flatnonzero(~known)
        for a in range(0, len(new), CHUNK_ROWS):
            labels[new[a:a + CHUNK_ROWS]] = self.partition_of(read_rows(vectors, new[a:a + CHUNK_ROWS]))
        return labels

    def partition_of(self, vectors: np.ndarray) -> np.ndarray:
        """The partition of each row: the nearest centroid among those of its ``SPILL_CELLS`` nearest
        coarse cells (its nearest cell's alone misses the nearest centroid for rows near a border)."""
        nearest_cells = _top(vectors, self.coarse, SPILL_CELLS)
        best = np.full(len(vectors), -np.inf, np.float32)
        labels = np.zeros(len(vectors), np.int64)
        rows_by_cell = np.argsort(nearest_cells.ravel(), kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(nearest_cells.ravel(), minlength=len(self.coarse)))])
        for c in np.flatnonzero(np.diff(bounds)):
            first, last = int(self.cells[c]), int(self.cells[c + 1])
            cell_rows = rows_by_cell[bounds[c]:bounds[c + 1]] // nearest_cells.shape[1]
            for a in range(0, len(cell_rows), SCORE_ROWS):  # bounded: one cell may hold every partition
                mine = cell_rows[a:a + SCORE_ROWS]
                scores = np.asarray(vectors[mine], dtype=np.float32) @ self.centroids[first:last].T
                top = np.argmax(scores, axis=1)
                score = scores[np.arange(len(mine)), top]
                better = score > best[mine]
                best[mine[better]], labels[mine[better]] = score[better], first + top[better]
        return labels


def live_training(snapshot_directory: Path) -> Training | None:
    """The training of the live generation's inverted file, copied out of it (the snapshot write that
    follows deletes the generation), or None when it has none."""
    from .snapshot import read_snapshot

    try:
        snapshot = read_snapshot(snapshot_directory)
    except Exception:  # noqa: BLE001 - damaged: the next build trains afresh
        return None
    if snapshot is None or snapshot.generation is None:
        return None
    ivf = load_ivf(snapshot.generation, len(snapshot), snapshot.vectors.shape[1])
    if ivf is None:
        return None
    directory = snapshot.generation / DIRECTORY
    centroids = np.array(ivf.centroids)
    try:  # absent from older inverted files: each partition is then its own coarse cell
        coarse, cells = (np.load(directory / f"{name}.npy", allow_pickle=False) for name in ("coarse", "cells"))
        if not (coarse.ndim == 2 and coarse.shape[1] == centroids.shape[1] and cells.shape == (len(coarse) + 1,)
                and cells[0] == 0 and cells[-1] == len(centroids) and np.all(np.diff(cells) > 0)):
            raise ValueError("coarse level does not match the partitions")
    except (OSError, ValueError):
        coarse, cells = centroids, np.arange(len(centroids) + 1, dtype=np.int64)
    training = Training(centroids, np.array(ivf.scales), ivf.trained_rows, coarse, cells)
    try:  # absent from older inverted files: every row is then assigned afresh
        hashes = np.load(directory / "hashes.npy", allow_pickle=False)
    except (OSError, ValueError):
        return training
    if hashes.shape != (len(ivf.rows),) or hashes.dtype != np.uint64:
        return training
    order = np.argsort(hashes)
    labels = np.repeat(np.arange(ivf.partitions, dtype=np.int64), np.diff(ivf.offsets))
    return replace(training, hashes=hashes[order], labels=labels[order])


def ensure_ivf(snapshot_directory: Path) -> bool:
    """``build_ivf`` for the live generation of a snapshot directory, if there is one."""
    from .snapshot import read_snapshot

    snapshot = read_snapshot(snapshot_directory)
    return snapshot is not None and snapshot.generation is not None and build_ivf(snapshot.generation)


def build_ivf(generation: Path, previous: Training | None = None, *, seed: int = 0,
              rows_per_partition: int = ROWS_PER_PARTITION) -> bool:
    """Add an inverted file to ``generation`` if it has more rows than ``exact_max_rows()``;
    True when it has one afterwards. Reads the vectors memory-mapped, in chunks. Reuses the
    ``previous`` generation's training when it ``fits``, else runs k-means.

    Written to a temporary directory and renamed into place, so a search sees a complete
    inverted file or none; a killed build leaves only a temporary directory, which the
    next build (or the next snapshot write, with the whole generation) removes. Call under
    the index lock.
    """
    vectors = np.load(generation / "vectors.npy", mmap_mode="r", allow_pickle=False)
    limit = exact_max_rows()
    if len(vectors) <= limit:
        return False
    if load_ivf(generation, len(vectors), vectors.shape[1]) is not None:
        return True
    n = len(vectors)
    hashes = _row_hashes(vectors)
    training = previous if previous is not None and previous.fits(n, vectors.shape[1]) else None
    if training is None:
        partitions = max(1, min(n // rows_per_partition, 65_536))  # capped: every query reads all centroids
        training = _train(vectors, partitions, np.random.default_rng(seed))
    labels = training.assign(vectors, hashes)
    for stale in generation.glob(f".{DIRECTORY}-*"):  # left by killed builds
        shutil.rmtree(stale, ignore_errors=True)
    tmp = generation / f".{DIRECTORY}-{os.getpid()}"
    tmp.mkdir()
    try:
        _write_ivf(tmp, vectors, training, labels, hashes, limit)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, generation / DIRECTORY)
    fsync_path(generation)
    return True


def _scales(vectors: np.ndarray) -> np.ndarray:
    """Per-dimension int8 steps from a sample: CLIP embeddings have a few dims far wider than the rest."""
    sample = read_rows(vectors, _sample_rows(len(vectors), 65_536, np.random.default_rng(len(vectors))))
    scales = (np.abs(sample).max(axis=0) * 1.05 / 127).astype(np.float32)  # headroom for unseen rows
    scales[scales == 0] = 1.0
    return scales


def _write_ivf(tmp: Path, vectors: np.ndarray, training: Training, labels: np.ndarray, hashes: np.ndarray,
               limit: int) -> None:
    n, partitions, scales = len(vectors), len(training.centroids), training.scales
    grouped = np.argsort(labels, kind="stable").astype(np.int64)  # by partition, then by snapshot row
    offsets = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=partitions))]).astype(np.int64)
    with open(tmp / "codes.npy", "wb") as f:
        write_permuted(f, vectors, grouped, np.int8, lambda rows: np.clip(np.rint(rows / scales), -127, 127))
    nprobe = min(partitions, MAX_NPROBE, max(MIN_NPROBE, math.ceil(partitions * NPROBE_FRACTION)))
    meta: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "rows": n, "partitions": partitions,
                            "nprobe": nprobe, "exact_max_rows": limit, "trained_rows": training.rows}
    for name, array in (("centroids", training.centroids), ("offsets", offsets), ("rows", grouped), ("scales", scales),
                        ("hashes", hashes[grouped]), ("coarse", training.coarse), ("cells", training.cells)):
        np.save(tmp / f"{name}.npy", array, allow_pickle=False)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    for entry in tmp.iterdir():
        fsync_path(entry)
    fsync_path(tmp)


def _train(vectors: np.ndarray, partitions: int, rng: np.random.Generator) -> Training:
    """K-means on one sample of the rows: flat up to ``FLAT_MAX_PARTITIONS``, else two-level,
    ~sqrt(partitions) coarse cells, each cell's share of the sample split into partitions in
    proportion to it (so ~equal rows per partition)."""
    sample = read_rows(vectors, _sample_rows(len(vectors), min(partitions * KMEANS_SAMPLE_PER_PARTITION,
                                                              KMEANS_SAMPLE_MAX), rng))
    partitions = min(partitions, len(sample))
    cells = 1 if partitions <= FLAT_MAX_PARTITIONS else math.ceil(math.sqrt(partitions))
    coarse = _kmeans(sample[rng.choice(len(sample), min(len(sample), cells * COARSE_SAMPLE_PER_CELL), replace=False)],
                     cells, rng)
    cell_of = _nearest(sample, coarse)
    counts = np.bincount(cell_of, minlength=cells)
    if not counts.all():  # a coarse cell no sample row is nearest to would have no partitions: drop it
        coarse = coarse[counts > 0]
        cell_of = _nearest(sample, coarse)
        counts = np.bincount(cell_of, minlength=len(coarse))
    quota = np.clip(np.rint(counts * (partitions / len(sample))), 1, counts).astype(np.int64)
    order = np.argsort(cell_of, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    centroids = [_kmeans(sample[order[starts[c]:starts[c + 1]]], int(quota[c]), rng) for c in range(len(coarse))]
    training = Training(np.concatenate(centroids), _scales(vectors), len(vectors), coarse,
                        np.concatenate([[0], np.cumsum(quota)]).astype(np.int64))
    if cells == 1:
        return training
    # Each cell's partitions were fitted to its own rows only; a few rounds over the whole sample, each
    # row assigned as the build assigns it, move the partitions at the cells' borders to fit all rows.
    refined = _lloyd(sample, training.centroids, rng, REFINE_ITERATIONS,
                     lambda rows, centroids: replace(training, centroids=centroids).partition_of(rows))
    return replace(training, centroids=refined)


def _kmeans(sample: np.ndarray, partitions: int, rng: np.random.Generator) -> np.ndarray:
    """Spherical k-means of the rows of ``sample`` (in memory): unit centroids maximising the dot product."""
    initial = sample[rng.choice(len(sample), partitions, replace=False)]
    return _lloyd(sample, initial, rng, KMEANS_ITERATIONS, _nearest)


def _lloyd(sample: np.ndarray, centroids: np.ndarray, rng: np.random.Generator, iterations: int,
           assign: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """``iterations`` rounds of spherical Lloyd: ``assign`` each row a centroid, move each to its rows' mean."""
    partitions = len(centroids)
    for _ in range(iterations):
        labels = assign(sample, centroids)
        counts = np.bincount(labels, minlength=partitions)
        sums = np.empty_like(centroids)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        filled = counts > 0  # reduceat over the non-empty runs of the label-sorted sample
        sums[filled] = np.add.reduceat(sample[np.argsort(labels, kind="stable")], starts[filled], axis=0)
        sums[~filled] = sample[rng.choice(len(sample), int((~filled).sum()))]  # restart empty ones on a sample row
        centroids = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    return centroids.astype(np.float32)


def _row_hashes(vectors: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row's float32 bytes (a fixed random linear form, wrapping): equal
    vectors, equal hashes. A collision would only cost that row some recall, never a wrong score."""
    weights = np.random.default_rng(HASH_SEED).integers(1, 2**63, size=vectors.shape[1], dtype=np.uint64)
    n = len(vectors)
    return np.concatenate([(np.ascontiguousarray(read_ranges(vectors, [(a, min(a + HASH_ROWS, n))]), dtype=np.float32)
                            .view(np.uint32).astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)
                           for a in range(0, n, HASH_ROWS)] or [np.zeros(0, np.uint64)])


def _top(vectors: np.ndarray, centroids: np.ndarray, k: int) -> np.ndarray:
    """Each row's ``k`` best centroids [rows, min(k, C)], ``SCORE_ROWS`` rows at a time."""
    k = min(k, len(centroids))
    return np.concatenate([np.argpartition(-(np.asarray(vectors[a:a + SCORE_ROWS], dtype=np.float32) @ centroids.T),
                                           k - 1, axis=1)[:, :k] for a in range(0, len(vectors), SCORE_ROWS)]
                          or [np.zeros((0, k), np.int64)]).astype(np.int64)


def _nearest(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Each row's best centroid, scoring ``SCORE_ROWS`` rows at a time (the scores of all rows at
    once would take rows x partitions x 4 bytes: 0.5 GB for a 10^6-row k-means sample)."""
    return np.concatenate([np.argmax(np.asarray(vectors[a:a + SCORE_ROWS], dtype=np.float32) @ centroids.T, axis=1)
                           for a in range(0, len(vectors), SCORE_ROWS)] or [np.zeros(0, np.int64)]).astype(np.int64)


def write_permuted(f: BinaryIO, vectors: np.ndarray, take: np.ndarray, dtype: type[np.generic] = np.float32,
                   encode: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
    """Write to ``f`` (opened for writing, empty) the .npy of ``encode(vectors[take])`` as ``dtype``,
    where ``take`` holds distinct rows. Reads ``vectors`` forward, ``PERMUTE_ROWS`` rows at a time,
    and writes each row to its place with ``pwrite`` (one call per run of consecutive places):
    reading in ``take`` order instead costs a random read per row, at 10^7 rows mostly from disk,
    and the pages of a memory map that are read or written count as the process's RSS."""
    n, dim = len(take), vectors.shape[1]
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                             "fortran_order": False, "shape": (n, dim)})
    f.flush()
    start, row_bytes = f.tell(), np.dtype(dtype).itemsize * dim
    place = np.full(len(vectors), -1, np.int64)
    place[take] = np.arange(n)
    for a in range(0, len(vectors), PERMUTE_ROWS):
        places = place[a:a + PERMUTE_ROWS]
        wanted = np.flatnonzero(places >= 0)
        if not len(wanted):
            continue
        wanted = wanted[np.argsort(places[wanted])]
        chunk = read_ranges(vectors, [(a, a + len(places))])[wanted]
        data = memoryview(np.ascontiguousarray((encode(chunk) if encode else chunk).astype(dtype)).tobytes())
        at = places[wanted]
        breaks = (np.flatnonzero(np.diff(at) != 1) + 1).tolist()
        for s, e in zip([0, *breaks], [*breaks, len(at)]):
            os.pwrite(f.fileno(), data[s * row_bytes:e * row_bytes], start + int(at[s]) * row_bytes)
    f.seek(0, os.SEEK_END)


def read_rows(vectors: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``vectors[rows]`` for ascending ``rows``, read by ``read_ranges`` (a run of consecutive rows
    in one read): pages of a memory-mapped file that are touched count as the process's RSS."""
    if len(rows) == 0:
        return np.zeros((0, *vectors.shape[1:]), np.float32)
    breaks = (np.flatnonzero(np.diff(rows) != 1) + 1).tolist()
    starts, stops = [0, *breaks], [*breaks, len(rows)]
    return np.asarray(read_ranges(vectors, [(int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(starts, stops)]),
                      dtype=np.float32)


def _sample_rows(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(n) if n <= size else np.sort(rng.choice(n, size, replace=False))


