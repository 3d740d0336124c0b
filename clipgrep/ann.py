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
        meta.json          format, rows, partitions, nprobe, exact_max_rows, trained_rows

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
from dataclasses import dataclass, field
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
RESCORE = 200  # candidates rescored exactly, at least RESCORE_PER_RESULT * k
RESCORE_PER_RESULT = 20
KMEANS_SAMPLE_PER_PARTITION = 32
KMEANS_ITERATIONS = 8
CHUNK_ROWS = 16_384  # rows per step of the assignment: bounded memory whatever N is
SCORE_ROWS = 8_192  # rows scored against every centroid at once: 64 MB at 2,000 partitions
PERMUTE_ROWS = 16_384  # rows read, encoded and written per step of write_permuted: 32 MB at 512 dims
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
        ranges = [(int(self.offsets[p]), int(self.offsets[p + 1])) for p in partitions]
        codes = read_ranges(self.codes, ranges)
        return read_ranges(self.rows, ranges), codes.astype(np.float32) @ (query * self.scales)

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

    centroids: np.ndarray
    scales: np.ndarray
    rows: int
    hashes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def fits(self, rows: int, dim: int) -> bool:
        return self.centroids.shape[1] == dim and self.rows / REUSE_GROWTH <= rows <= self.rows * REUSE_GROWTH

    def assign(self, vectors: np.ndarray, hashes: np.ndarray) -> np.ndarray:
        """Each row's partition: a vector seen before keeps its own (its nearest centroid is the
        same); only the others are scored against every centroid."""
        labels = np.empty(len(vectors), np.int64)
        known = np.zeros(len(vectors), bool)
        if len(self.hashes):
            at = np.minimum(np.searchsorted(self.hashes, hashes), len(self.hashes) - 1)
            known = self.hashes[at] == hashes
            labels[known] = self.labels[at[known]]
        new = np.flatnonzero(~known)
        for a in range(0, len(new), CHUNK_ROWS):
            labels[new[a:a + CHUNK_ROWS]] = _nearest(read_rows(vectors, new[a:a + CHUNK_ROWS]), self.centroids)
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
    training = Training(np.array(ivf.centroids), np.array(ivf.scales), ivf.trained_rows)
    try:  # absent from older inverted files: every row is then assigned afresh
        hashes = np.load(snapshot.generation / DIRECTORY / "hashes.npy", allow_pickle=False)
    except (OSError, ValueError):
        return training
    if hashes.shape != (len(ivf.rows),) or hashes.dtype != np.uint64:
        return training
    order = np.argsort(hashes)
    labels = np.repeat(np.arange(ivf.partitions, dtype=np.int64), np.diff(ivf.offsets))
    return Training(training.centroids, training.scales, training.rows, hashes[order], labels[order])


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
        training = Training(_kmeans(vectors, partitions, np.random.default_rng(seed)), _scales(vectors), n)
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
    nprobe = min(partitions, max(MIN_NPROBE, math.ceil(partitions * NPROBE_FRACTION)))
    meta: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "rows": n, "partitions": partitions,
                            "nprobe": nprobe, "exact_max_rows": limit, "trained_rows": training.rows}
    for name, array in (("centroids", training.centroids), ("offsets", offsets), ("rows", grouped), ("scales", scales),
                        ("hashes", hashes[grouped])):
        np.save(tmp / f"{name}.npy", array, allow_pickle=False)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    for entry in tmp.iterdir():
        fsync_path(entry)
    fsync_path(tmp)


def _kmeans(vectors: np.ndarray, partitions: int, rng: np.random.Generator) -> np.ndarray:
    """Spherical k-means on a sample: unit centroids maximising the dot product."""
    sample = read_rows(vectors, _sample_rows(len(vectors), partitions * KMEANS_SAMPLE_PER_PARTITION, rng))
    centroids = sample[rng.choice(len(sample), partitions, replace=False)].copy()
    for _ in range(KMEANS_ITERATIONS):
        labels = _nearest(sample, centroids)
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


def _nearest(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Each row's best centroid, scoring ``SCORE_ROWS`` rows at a time (the scores of all rows at
    once would take rows x partitions x 4 bytes: 0.5 GB for a 10^6-row k-means sample)."""
    return np.concatenate([np.argmax(np.asarray(vectors[a:a + SCORE_ROWS], dtype=np.float32) @ centroids.T, axis=1)
                           for a in range(0, len(vectors), SCORE_ROWS)] or [np.zeros(0, np.int64)]).astype(np.int64)


def write_permuted(f: BinaryIO, vectors: np.ndarray, take: np.ndarray, dtype: type[np.generic] = np.float32,
                   encode: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
    """Write to ``f`` the .npy of ``encode(vectors[take])`` as ``dtype``, ``PERMUTE_ROWS`` rows at a
    time, by plain reads (``read_rows``) and writes: the pages of a memory map that are read or
    written count as the process's RSS (4 GB to permute 10^6 x 512 float32 rows through maps)."""
    n, dim = len(take), vectors.shape[1]
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                             "fortran_order": False, "shape": (n, dim)})
    for a in range(0, n, PERMUTE_ROWS):
        rows = take[a:a + PERMUTE_ROWS]
        by_file = np.argsort(rows, kind="stable")  # read forward through the file, in runs
        chunk = np.empty((len(rows), dim), np.float32)
        chunk[by_file] = read_rows(vectors, rows[by_file])
        f.write((encode(chunk) if encode else chunk).astype(dtype).tobytes())


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


