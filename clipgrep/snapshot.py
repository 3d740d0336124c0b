"""The search snapshot: a read-only numpy copy of one index table, for fast searches.

``import lancedb`` alone costs ~1 s and a search over 100k rows must finish in
under 0.5 s, so each index run exports its table here and ``clipgrep search``
reads only this (numpy + stdlib; no lancedb, no pyarrow). The table stays the
source of truth: a lost or damaged snapshot is rebuilt by ``clipgrep index``.

Layout of ``$CLIPGREP_HOME/index/snapshots/<bundle_id>/``::

    CURRENT            name of the live generation (replaced atomically)
    g<ns>-<pid>/       one generation, never modified once CURRENT names it (but for
                       the atomic addition of ivf/, see clipgrep.ann)
        vectors.npy        float32 [N, D]
        path_bytes.npy     uint8: every path's os.fsencode bytes, concatenated in sorted order
        path_offsets.npy   int64 [N + 1]: path i is path_bytes[offsets[i]:offsets[i + 1]]
        sizes.npy, mtimes_ns.npy, indexed_ns.npy    int64 [N]
        fingerprints.npy   bytes [N] (ASCII hex)
        meta.json          bundle_id, embed_dim, rows, table_version, created, ...

Paths are sorted by their bytes, so the files under one directory are a
contiguous row range (``Snapshot.subtree``). Every array is memory-mapped:
loading costs a few file opens, whatever N is, and a reader that opened an old
generation keeps reading it after a writer has switched and deleted it (Linux
keeps unlinked files alive while they are mapped).

Example::

    write_snapshot(d, ["/p/b.jpg", "/p/a.jpg"], vecs, sizes, mtimes, indexed, ["ab", "cd"], {"bundle_id": "x"})
    snap = read_snapshot(d); snap.path(0)   # '/p/a.jpg'
"""
from __future__ import annotations

import bisect
import json
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ClipgrepError

IntColumn = Sequence[int] | np.ndarray  # a list, or a column straight from the table

FORMAT = "clipgrep-snapshot"
FORMAT_VERSION = 1
POINTER = "CURRENT"
_ROW_ARRAYS = ("sizes", "mtimes_ns", "indexed_ns", "fingerprints")
_HINT = "run: clipgrep index"
# A writer may delete the generation a reader just looked up; the reader then retries.
_READ_ATTEMPTS = 5


@dataclass(eq=False)
class Snapshot:
    """One generation of a snapshot, memory-mapped. Create with ``read_snapshot``."""

    path_bytes: np.ndarray  # uint8, all paths concatenated
    path_offsets: np.ndarray  # int64 [N + 1]
    vectors: np.ndarray  # float32 [N, D]
    sizes: np.ndarray
    mtimes_ns: np.ndarray
    indexed_ns: np.ndarray
    fingerprint_bytes: np.ndarray  # bytes_ [N]
    meta: dict[str, Any] = field(default_factory=dict)
    generation: Path | None = None  # its directory, where clipgrep.ann finds an inverted file

    def __len__(self) -> int:
        return len(self.path_offsets) - 1

    def raw_path(self, i: int) -> bytes:
        return self.path_bytes[self.path_offsets[i]:self.path_offsets[i + 1]].tobytes()

    def path(self, i: int) -> str:
        """Row ``i``'s path, decoded on demand (search needs only the top k)."""
        return os.fsdecode(self.raw_path(i))

    def fingerprint(self, i: int) -> str:
        return self.fingerprint_bytes[i].decode("ascii")

    @cached_property
    def paths(self) -> list[str]:
        """Every path (~50 ms for 100k rows); prefer ``path(i)`` on the search path."""
        blob = self.path_bytes.tobytes()
        bounds = self.path_offsets.tolist()
        return [os.fsdecode(blob[a:b]) for a, b in pairwise(bounds)]

    @cached_property
    def fingerprints(self) -> list[str]:
        return [f.decode("ascii") for f in self.fingerprint_bytes.tolist()]

    def find(self, path: str | bytes) -> int | None:
        """The row of ``path``, or None, by binary search.

        >>> snap.find("/p/a.jpg")   # doctest: +SKIP
        0
        """
        key = os.fsencode(path)
        i = bisect.bisect_left(range(len(self)), key, key=self.raw_path)
        return i if i < len(self) and self.raw_path(i) == key else None

    def vector_for(self, path: str | bytes) -> np.ndarray | None:
        """The stored vector of ``path`` (a copy), or None if it is not indexed."""
        i = self.find(path)
        return None if i is None else np.array(self.vectors[i])

    def subtree(self, directory: str | bytes) -> slice:
        """The rows whose path lies inside ``directory`` (absolute, normalised like the stored paths).

        Compares bytes at directory boundaries: ``/a/b`` covers ``/a/b/x.jpg`` but not ``/a/bc.jpg``.
        """
        prefix = os.fsencode(directory).rstrip(os.sep.encode()) + os.sep.encode()
        # Every path starting with prefix sorts in [prefix, prefix with its last byte + 1).
        upper = prefix[:-1] + bytes([prefix[-1] + 1])
        rows = range(len(self))
        start = bisect.bisect_left(rows, prefix, key=self.raw_path)
        return slice(start, bisect.bisect_left(rows, upper, lo=start, key=self.raw_path))


RowBatch = tuple[Sequence[str | bytes], np.ndarray, IntColumn, IntColumn, IntColumn, Sequence[str]]
"""Some rows, column-wise: paths, vectors, sizes, mtimes_ns, indexed_ns, fingerprints (as ``store.TableRows``)."""


def write_snapshot(directory: Path, paths: Sequence[str | bytes], vectors: np.ndarray, sizes: IntColumn,
                   mtimes_ns: IntColumn, indexed_ns: IntColumn, fingerprints: Sequence[str],
                   meta: dict[str, Any]) -> Path:
    """Write a new generation under ``directory``, switch readers to it atomically, return it.

    Rows may come in any order; they are sorted by path bytes here. Call under the index
    lock: two concurrent writers would delete each other's generations.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"expected {len(paths)} vectors, got an array of shape {vectors.shape}")
    batch = (paths, vectors, sizes, mtimes_ns, indexed_ns, fingerprints)
    return write_snapshot_batches(directory, [batch], vectors.shape[1], meta)


def write_snapshot_batches(directory: Path, batches: Iterable[RowBatch], embed_dim: int,
                           meta: dict[str, Any]) -> Path:
    """``write_snapshot`` for rows that come in batches, in memory bounded by the paths.

    Only the paths (and the small per-row columns) are held to sort; the vectors go to a
    scratch file in the new generation as they come, then into ``vectors.npy`` in path order
    a chunk at a time. Plain reads and writes, not memory maps: mapped pages count as the
    process's own (RSS), and at 10^6 x 512 they would be 4 GB.
    """
    directory.mkdir(parents=True, exist_ok=True)
    generation = directory / f"g{time.time_ns()}-{os.getpid()}"
    generation.mkdir()
    try:
        _write_generation(generation, batches, embed_dim, meta)
    except BaseException:
        shutil.rmtree(generation, ignore_errors=True)  # a killed writer's goes with the next write
        raise
    fsync_path(generation)
    _switch_pointer(directory, generation.name)
    _remove_other_generations(directory, keep=generation.name)
    return generation


def _write_generation(generation: Path, batches: Iterable[RowBatch], embed_dim: int, meta: dict[str, Any]) -> None:
    scratch = generation / ".vectors-unsorted"
    encoded: list[bytes] = []
    columns: dict[str, list[np.ndarray]] = {name: [np.zeros(0, np.int64)] for name in _ROW_ARRAYS[:3]}
    columns["fingerprints"] = [_fingerprint_array([])]
    with open(scratch, "wb") as f:
        for paths, vectors, *ints, fingerprints in batches:  # ints: sizes, mtimes_ns, indexed_ns
            vectors = np.ascontiguousarray(vectors, dtype=np.float32)
            if vectors.shape != (len(paths), embed_dim):
                raise ValueError(f"expected {len(paths)} vectors of {embed_dim}, got an array of shape {vectors.shape}")
            encoded.extend(os.fsencode(p) for p in paths)
            f.write(vectors.tobytes())
            for name, column in zip(_ROW_ARRAYS[:3], ints, strict=True):
                columns[name].append(np.asarray(column, dtype=np.int64))
            columns["fingerprints"].append(_fingerprint_array(fingerprints))
    take, arrays = _sorted_rows(encoded, *(np.concatenate(columns[name]) for name in _ROW_ARRAYS))
    del encoded, columns
    n = len(take)
    full_meta = {**meta, "format": FORMAT, "format_version": FORMAT_VERSION, "rows": n, "embed_dim": embed_dim}
    full_meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    _write_durably(generation / "vectors.npy", lambda f: _write_permuted(f, scratch, take, embed_dim))
    scratch.unlink()
    for name, array in arrays.items():
        _write_durably(generation / f"{name}.npy", lambda f, a=array: np.save(f, a, allow_pickle=False))
    _write_durably(generation / "meta.json", lambda f: f.write(json.dumps(full_meta, indent=1).encode()))


def _write_permuted(f: Any, scratch: Path, take: np.ndarray, dim: int) -> None:
    """Write the .npy of the float32 rows ``take`` of the raw [N, dim] file ``scratch``, in that order."""
    from .ann import write_permuted

    # An empty file cannot be mapped; with no rows there is nothing to read.
    unsorted = np.memmap(scratch, dtype=np.float32, mode="r", shape=(len(take), dim)) if len(take) \
        else np.zeros((0, dim), np.float32)
    write_permuted(f, unsorted, take)


def snapshot_in_memory(paths: Sequence[str | bytes], vectors: np.ndarray, sizes: IntColumn, mtimes_ns: IntColumn,
                       indexed_ns: IntColumn, fingerprints: Sequence[str], meta: dict[str, Any]) -> Snapshot:
    """What ``write_snapshot`` would write, as a Snapshot in memory (for a reader that found the table ahead)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(paths):
        raise ValueError(f"expected {len(paths)} vectors, got an array of shape {vectors.shape}")
    take, a = _sorted_rows([os.fsencode(p) for p in paths], sizes, mtimes_ns, indexed_ns,
                           _fingerprint_array(fingerprints))
    full_meta = {**meta, "format": FORMAT, "format_version": FORMAT_VERSION, "rows": len(take),
                 "embed_dim": int(vectors.shape[1])}
    return Snapshot(a["path_bytes"], a["path_offsets"], np.ascontiguousarray(vectors[take]), a["sizes"],
                    a["mtimes_ns"], a["indexed_ns"], a["fingerprints"], full_meta)


def _fingerprint_array(fingerprints: Sequence[str]) -> np.ndarray:
    # np.bytes_ strips trailing NULs only; hex fingerprints have none.
    n = len(fingerprints)
    return np.array([f.encode("ascii") for f in fingerprints] or [b""], dtype=np.bytes_)[:n]


def _sorted_rows(encoded: list[bytes], sizes: IntColumn, mtimes_ns: IntColumn, indexed_ns: IntColumn,
                 fingerprints: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The row order by path bytes, and every array but the vectors in that order."""
    n = len(encoded)
    order = sorted(range(n), key=encoded.__getitem__)
    if any(encoded[a] == encoded[b] for a, b in pairwise(order)):
        raise ValueError("snapshot rows must have distinct paths")
    take = np.asarray(order, dtype=np.int64)
    del order
    lengths = np.fromiter((len(encoded[i]) for i in take), dtype=np.int64, count=n)
    return take, {
        "path_bytes": np.frombuffer(b"".join([encoded[i] for i in take]), dtype=np.uint8),
        "path_offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "sizes": np.asarray(sizes, dtype=np.int64)[take],
        "mtimes_ns": np.asarray(mtimes_ns, dtype=np.int64)[take],
        "indexed_ns": np.asarray(indexed_ns, dtype=np.int64)[take],
        "fingerprints": np.asarray(fingerprints, dtype=np.bytes_)[take],
    }


def _write_durably(path: Path, write: Any) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory (so that the renames in it are durable)."""
    if os.name == "nt" and path.is_dir():  # Windows cannot open a directory; its renames need no directory fsync
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _switch_pointer(directory: Path, generation: str) -> None:
    tmp = directory / f".{POINTER}.{os.getpid()}.tmp"
    _write_durably(tmp, lambda f: f.write(generation.encode()))
    os.replace(tmp, directory / POINTER)
    fsync_path(directory)


def _remove_other_generations(directory: Path, keep: str) -> None:
    # Also removes generations and pointer temp files of writers killed half-way.
    for entry in directory.iterdir():
        if entry.name in (keep, POINTER):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def read_snapshot(directory: Path) -> Snapshot | None:
    """The live snapshot in ``directory``, or None if none was written yet.

    Raises ClipgrepError (hint: run clipgrep index) if it is damaged.
    """
    seen = None
    for _ in range(_READ_ATTEMPTS):
        generation = _read_pointer(directory)
        if generation is None:
            return None
        try:
            return _load_generation(directory / generation)
        except FileNotFoundError:
            if generation == seen:  # the pointer names a generation that is not there
                break
            seen = generation
    raise _damaged(directory, f"generation {seen!r} is missing files")


def _read_pointer(directory: Path) -> str | None:
    try:
        name = (directory / POINTER).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    if not name or "/" in name or name.startswith("."):
        raise _damaged(directory, f"{POINTER} holds {name!r}")
    return name


def _load_generation(generation: Path) -> Snapshot:
    try:
        meta = json.loads((generation / "meta.json").read_bytes())
        arrays = {name: np.load(generation / f"{name}.npy", mmap_mode="r", allow_pickle=False)
                  for name in ("vectors", "path_bytes", "path_offsets", *_ROW_ARRAYS)}
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:  # bad JSON, bad .npy header, truncated file
        raise _damaged(generation.parent, str(e)) from None
    problem = _inconsistency(meta, arrays)
    if problem:
        raise _damaged(generation.parent, problem)
    return Snapshot(arrays["path_bytes"], arrays["path_offsets"], arrays["vectors"], arrays["sizes"],
                    arrays["mtimes_ns"], arrays["indexed_ns"], arrays["fingerprints"], meta, generation)


def _inconsistency(meta: Any, arrays: dict[str, np.ndarray]) -> str | None:
    """What makes this generation unusable, or None."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return "meta.json is not a clipgrep snapshot"
    if meta.get("format_version") != FORMAT_VERSION:
        return f"format version {meta.get('format_version')} (this clipgrep reads {FORMAT_VERSION})"
    rows, vectors, offsets = meta.get("rows"), arrays["vectors"], arrays["path_offsets"]
    if not isinstance(rows, int) or rows < 0:
        return f"meta.json says rows={rows!r}"
    if vectors.dtype != np.float32 or vectors.shape != (rows, meta.get("embed_dim")):
        return f"vectors have shape {vectors.shape}, meta says ({rows}, {meta.get('embed_dim')})"
    if offsets.dtype != np.int64 or offsets.shape != (rows + 1,) or any(len(arrays[a]) != rows for a in _ROW_ARRAYS):
        return "row arrays disagree in length"
    if offsets[0] != 0 or offsets[-1] != len(arrays["path_bytes"]) or np.any(np.diff(offsets) < 0):
        return "path offsets are out of range"
    return None


def _damaged(directory: Path, reason: str) -> ClipgrepError:
    return ClipgrepError(f"the search snapshot in {directory} is damaged ({reason})", _HINT)
