"""The image index: one LanceDB table per bundle, the source of truth for indexed files.

This is the only module that imports lancedb (and pyarrow), always inside a
method: ``import lancedb`` costs about 1 s, and ``--help``, completion and
``clipgrep search`` (which reads the numpy snapshot instead) must not pay it.

Rows are keyed by ``id``, a 63-bit blake2b hash of the path bytes. Paths are
stored as bytes because Arrow strings must be valid UTF-8 and file names need
not be; a numeric key also means SQL filters (``id IN (1, 2)``) need no quoting.
Every write is one LanceDB commit, so a killed writer leaves the table at the
last completed ``upsert``/``delete`` (docs/stack.md section 7).

Example::

    store = IndexStore(paths.index_dir(), bundle.index_id, bundle.embed_dim)
    store.upsert([StoredFile("/p/a.jpg", 10, 1, "ab12", 2)], np.zeros((1, 512), np.float32))
"""
from __future__ import annotations

import datetime
import hashlib
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .errors import ClipgrepError

if TYPE_CHECKING:
    import pyarrow as pa

TABLE_PREFIX = "images_"
SCHEMA_VERSION = "1"
_FILE_COLUMNS = ["path", "size", "mtime_ns", "fingerprint", "indexed_ns"]
# Tables made before imported embeddings (clipgrep index --from-embeddings) lack this last column.
_ORIGIN = "origin"
# PQ trains 2**num_bits centroids per sub-vector; fewer rows than that cannot train it.
_MIN_PQ_ROWS = 256
_CLEANUP_WARNING = r"optimize\(cleanup_older_than=0\)"


@dataclass(frozen=True)
class StoredFile:
    """The state of one indexed file, without its vector."""

    path: str  # absolute, os.fsdecode'd: may hold surrogate escapes
    size: int
    mtime_ns: int
    fingerprint: str  # content fingerprint (hex), computed by the caller; plan.IMPORTED_FINGERPRINT if imported
    indexed_ns: int  # wall clock when the file was stat'ed; an mtime this close is "racy"
    # None: found by a walk of the roots. Otherwise where the vector came from (e.g.
    # "clip-retrieval:/abs/dir"): such a row is never deleted because a walk did not find it.
    origin: str | None = None


class TableRows(NamedTuple):
    """Every row, column-wise, in the argument order of ``snapshot.write_snapshot``."""

    paths: list[bytes]
    vectors: np.ndarray
    sizes: np.ndarray
    mtimes_ns: np.ndarray
    indexed_ns: np.ndarray
    fingerprints: list[str]


def path_key(path: str | bytes) -> int:
    """The row key of ``path``: blake2b of its bytes, as a non-negative int64.

    63 bits rather than 64 keep every key a plain positive SQL literal
    (``-9223372036854775808`` does not parse as an int64). Collisions among a
    million paths have odds of about 5e-8; ``vectors`` double-checks the path.

    >>> path_key("/a.jpg") == path_key(b"/a.jpg")
    True
    """
    digest = hashlib.blake2b(os.fsencode(path), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def table_name(bundle_id: str) -> str:
    return f"{TABLE_PREFIX}{bundle_id}"


def list_bundle_ids(directory: Path) -> list[str]:
    """Bundle ids that have an index table under ``directory``, without importing lancedb.

    >>> list_bundle_ids(Path("/nonexistent"))
    []
    """
    if not directory.is_dir():
        return []
    return sorted(p.name[len(TABLE_PREFIX):-len(".lance")] for p in directory.glob(f"{TABLE_PREFIX}*.lance")
                  if _has_manifest(p))


def _has_manifest(table_dir: Path) -> bool:
    # A writer killed while creating the table can leave a directory with no version in it.
    versions = table_dir / "_versions"
    return versions.is_dir() and any(versions.glob("*.manifest"))


def _import_lancedb() -> Any:
    # Must precede the first import: LANCEDB_LOG is read once, when the Rust logger starts,
    # and it is the only variable that silences the Rust-side WARN lines (stack.md section 7).
    os.environ.setdefault("LANCEDB_LOG", "error")
    import lancedb

    return lancedb


def _sql_ids(keys: Sequence[int]) -> str:
    return "id IN (" + ",".join(map(str, keys)) + ")"


class IndexStore:
    """One bundle's table in the LanceDB database at ``directory`` ($CLIPGREP_HOME/index).

    The table is created by the first ``upsert``. Writers must hold the index lock;
    the store itself does no locking.
    """

    def __init__(self, directory: Path, bundle_id: str, embed_dim: int) -> None:
        self.directory = Path(directory)
        self.bundle_id = bundle_id
        self.embed_dim = embed_dim
        self.name = table_name(bundle_id)
        self.table_dir = self.directory / f"{self.name}.lance"
        self._table: Any = None

    @classmethod
    def existing(cls, directory: Path, bundle_id: str) -> IndexStore:
        """The store of an existing table, with the vector size its schema records (no model needed)."""
        table = _import_lancedb().connect(str(directory)).open_table(table_name(bundle_id))
        store = cls(directory, bundle_id, table.schema.field("vector").type.list_size)
        store._table = table
        return store

    # -- reading ---------------------------------------------------------------------------

    def exists(self) -> bool:
        """Whether the table has been created; checks the file system only (no lancedb import)."""
        return _has_manifest(self.table_dir)

    def files(self) -> dict[str, StoredFile]:
        """Every row's file state by path (~0.5 s per 100k rows); the vector column is never read."""
        if not self.exists():
            return {}
        columns = [*_FILE_COLUMNS, _ORIGIN] if self._has_origin else _FILE_COLUMNS
        rows = self._scan(columns).to_pydict()
        origins = rows.get(_ORIGIN) or [None] * len(rows["path"])
        return {
            os.fsdecode(p): StoredFile(os.fsdecode(p), s, m, f, i, o)
            for p, s, m, f, i, o in zip(*(rows[c] for c in _FILE_COLUMNS), origins)
        }

    def vectors(self, paths: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored (read-only) vectors of those ``paths`` that are indexed, e.g. to reuse for moved files."""
        if not paths or not self.exists():
            return {}
        wanted = {path_key(p): os.fsencode(p) for p in paths}
        table = self._scan(["id", "path", "vector"], where=_sql_ids(list(wanted)))
        matrix = self._matrix(table)
        found = {}
        for row, (key, raw) in enumerate(zip(table.column("id").to_pylist(), table.column("path").to_pylist())):
            if wanted.get(key) == raw:  # a hash collision would return another file's vector
                found[os.fsdecode(raw)] = matrix[row]
        return found

    def count(self) -> int:
        return self._open().count_rows() if self.exists() else 0

    def version(self) -> int:
        return self._open().version if self.exists() else 0

    def snapshot_rows(self) -> TableRows:
        """All rows column-wise (one Arrow scan, no per-row Python) for ``snapshot.write_snapshot``."""
        if not self.exists():
            empty = np.zeros(0, np.int64)
            return TableRows([], np.zeros((0, self.embed_dim), np.float32), empty, empty, empty, [])
        table = self._open().to_arrow()  # a plain dataset read: ~2x faster than a query scan
        ints = {c: table.column(c).to_numpy() for c in ("size", "mtime_ns", "indexed_ns")}
        return TableRows(table.column("path").to_pylist(), self._matrix(table), ints["size"],
                         ints["mtime_ns"], ints["indexed_ns"], table.column("fingerprint").to_pylist())

    def disk_bytes(self) -> int:
        """Bytes the table takes on disk, including old versions and orphaned files."""
        total = 0
        for root, _, names in os.walk(self.table_dir):  # nothing if the table does not exist
            for name in names:
                try:
                    total += os.lstat(os.path.join(root, name)).st_size
                except FileNotFoundError:  # removed by a concurrent optimize
                    pass
        return total

    # -- writing ---------------------------------------------------------------------------

    def upsert(self, files: Sequence[StoredFile], vectors: np.ndarray) -> int:
        """Insert or replace (by path) ``files`` with their ``vectors`` [len(files), embed_dim], in one commit.

        Returns how many of the paths were not in the table before.
        """
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (len(files), self.embed_dim):
            raise ValueError(f"vectors have shape {vectors.shape}, expected ({len(files)}, {self.embed_dim})")
        if not files:
            return 0
        # merge_insert refuses two source rows with one key; the last one wins, as in a dict.
        last = {path_key(f.path): i for i, f in enumerate(files)}
        keys, keep = zip(*sorted(last.items(), key=lambda item: item[1]))
        table = self._open(create=True)
        kept = [files[i] for i in keep]
        if not self._has_origin and any(f.origin is not None for f in kept):
            self._add_origin_column()
        data = self._arrow_rows(kept, vectors[list(keep)], list(keys))
        result = table.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(data)
        return int(result.num_inserted_rows)

    def delete(self, paths: Sequence[str]) -> None:
        """Remove the rows of ``paths`` (missing ones are ignored), in one commit.

        One ``IN`` list of 10k ids deletes in ~0.1 s and 500k in ~7 s, so it is never chunked.
        """
        if paths and self.exists():
            self._open().delete(_sql_ids(sorted({path_key(p) for p in paths})))

    def maintain(self) -> None:
        """Compact fragments, fold new rows into the vector index and drop old versions.

        Dropping every old version would break a concurrent reader of an older one; index
        runs are the only writers and ``search`` reads the snapshot, so nobody is.
        Takes ~1 ms when there is nothing to do.
        """
        if self.exists():
            self._optimize(delete_unverified=False)

    def cleanup_orphans(self) -> int:
        """Delete what killed writers left in the table; returns the bytes freed.

        Lance writes each data file as ``data/.tmpXXXXXX`` and renames it when complete;
        no LanceDB call removes a temp file whose writer died (stack.md section 7). A writer
        killed between that rename and its commit leaves a whole ``.lance`` data file that no
        version references; only ``optimize(delete_unverified=True)`` removes those, and it
        also compacts and prunes old versions (fast unless a previous run was interrupted).
        Call only while holding the index lock: a live writer's files look just the same.
        """
        if not self.table_dir.is_dir():
            return 0
        before = self.disk_bytes()
        for orphan in self.table_dir.rglob(".tmp*"):
            if orphan.is_file() and not orphan.is_symlink():
                orphan.unlink(missing_ok=True)
        if self.exists():
            self._optimize(delete_unverified=True)
        return max(0, before - self.disk_bytes())

    def _optimize(self, delete_unverified: bool) -> None:
        with warnings.catch_warnings():
            # LanceDB warns that cleanup_older_than=0 breaks concurrent readers of old versions.
            warnings.filterwarnings("ignore", message=_CLEANUP_WARNING, category=UserWarning)
            table = self._open()
            table.optimize(cleanup_older_than=datetime.timedelta(0), delete_unverified=delete_unverified)
            # optimize prunes versions before it updates the vector index, so an index update
            # leaves one stale version behind; a second pass (~5 ms) prunes it.
            if len(table.list_versions()) > 1:
                table.optimize(cleanup_older_than=datetime.timedelta(0))

    # -- vector index ----------------------------------------------------------------------

    def has_vector_index(self) -> bool:
        return self._vector_index_name() is not None

    def ensure_vector_index(self, min_rows: int = 50_000) -> bool:
        """Build an IVF_PQ (cosine) index once the table has ``min_rows`` rows; returns whether one exists.

        ``clipgrep search`` scans the numpy snapshot and never uses this index; it serves
        Python-API users of the table and very large tables. Such users must search with
        ``refine_factor`` (e.g. 10): PQ alone reaches recall@10 of only ~0.3 (stack.md section 7).
        The index is retrained when the table has grown ~4x since training (its ideal
        partition count, sqrt(rows), doubled); rows added in between are folded in by
        ``maintain``, so call this before ``maintain`` at the end of an index run.
        Costs ~35 s per 100k rows of 512 dims on 2 cores.
        """
        if not self.exists():
            return False
        rows = self.count()
        current = self._vector_index_name()
        if rows < max(min_rows, _MIN_PQ_ROWS):
            return current is not None
        partitions = _ivf_partitions(rows)
        if current is not None and partitions < 2 * _trained_partitions(current):
            return True
        try:
            self._build_vector_index(partitions, current)
        except Exception:  # noqa: BLE001 - an optional accelerator must never fail an index run
            # e.g. k-means finding fewer distinct vectors than partitions (a library of duplicates)
            return current is not None
        return True

    def _build_vector_index(self, partitions: int, old_name: str | None) -> None:
        from lancedb.index import IvfPq

        config = IvfPq(distance_type="cosine", num_partitions=partitions,
                       num_sub_vectors=_pq_sub_vectors(self.embed_dim))
        table = self._open()
        table.create_index("vector", config=config, replace=True, name=f"vector_ivfpq_p{partitions}")
        if old_name is not None and old_name != f"vector_ivfpq_p{partitions}":
            table.drop_index(old_name)

    def _vector_index_name(self) -> str | None:
        if not self.exists():
            return None
        names = [ix.name for ix in self._open().list_indices() if list(ix.columns) == ["vector"]]
        return names[0] if names else None

    # -- internals -------------------------------------------------------------------------

    @property
    def _has_origin(self) -> bool:
        return _ORIGIN in self._open().schema.names

    def _add_origin_column(self) -> None:
        """Give a table made before imported embeddings its (all-null) origin column, in one commit."""
        import pyarrow as pa

        self._open().add_columns(pa.field(_ORIGIN, pa.string()))

    def _open(self, create: bool = False) -> Any:
        if self._table is None:
            db = _import_lancedb().connect(str(self.directory))
            if create and not self.exists():
                self.directory.mkdir(parents=True, exist_ok=True)
                self._table = db.create_table(self.name, schema=self._schema, exist_ok=True)
            else:
                self._table = db.open_table(self.name)
            self._check_schema(self._table.schema)
        return self._table

    def _check_schema(self, schema: pa.Schema) -> None:
        expected = self._schema
        if schema.names not in (expected.names, expected.names[:-1]) or schema.field("vector").type != expected.field("vector").type:
            raise ClipgrepError(
                f"the index table {self.table_dir} has an unexpected layout "
                f"(vector {schema.field('vector').type if 'vector' in schema.names else 'missing'}, "
                f"model has {self.embed_dim} dims)",
                f"delete {self.table_dir} and run: clipgrep index",
            )

    @cached_property
    def _schema(self) -> pa.Schema:
        _import_lancedb()
        import pyarrow as pa

        fields = [
            pa.field("id", pa.int64(), nullable=False),
            pa.field("path", pa.binary(), nullable=False),
            pa.field("size", pa.int64(), nullable=False),
            pa.field("mtime_ns", pa.int64(), nullable=False),
            pa.field("fingerprint", pa.string(), nullable=False),
            pa.field("indexed_ns", pa.int64(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), self.embed_dim), nullable=False),
            pa.field(_ORIGIN, pa.string(), nullable=True),
        ]
        return pa.schema(fields, metadata={"clipgrep.bundle_id": self.bundle_id,
                                           "clipgrep.schema_version": SCHEMA_VERSION})

    def _arrow_rows(self, files: Sequence[StoredFile], vectors: np.ndarray, keys: list[int]) -> pa.Table:
        import pyarrow as pa

        flat = pa.array(np.ascontiguousarray(vectors).reshape(-1))
        columns = {
            "id": pa.array(keys, pa.int64()),
            "path": pa.array([os.fsencode(f.path) for f in files], pa.binary()),
            "size": pa.array([f.size for f in files], pa.int64()),
            "mtime_ns": pa.array([f.mtime_ns for f in files], pa.int64()),
            "fingerprint": pa.array([f.fingerprint for f in files], pa.string()),
            "indexed_ns": pa.array([f.indexed_ns for f in files], pa.int64()),
            "vector": pa.FixedSizeListArray.from_arrays(flat, self.embed_dim),
            _ORIGIN: pa.array([f.origin for f in files], pa.string()),
        }
        if not self._has_origin:  # an older table, and no row here has an origin
            del columns[_ORIGIN]
            return pa.table(columns, schema=self._schema.remove(self._schema.get_field_index(_ORIGIN)))
        return pa.table(columns, schema=self._schema)

    def _scan(self, columns: list[str], where: str | None = None) -> pa.Table:
        # A plain scan (no query vector), so LanceDB adds no _distance column and logs
        # no autoprojection deprecation notice.
        query = self._open().search().select(columns).limit(None)
        return (query.where(where) if where else query).to_arrow()

    def _matrix(self, table: pa.Table) -> np.ndarray:
        flat = table.column("vector").combine_chunks().flatten().to_numpy()
        return flat.reshape(-1, self.embed_dim)


def _ivf_partitions(rows: int) -> int:
    # LanceDB's documented default: about sqrt(rows), i.e. ~316 rows per partition at 100k.
    return max(1, round(math.sqrt(rows)))


def _trained_partitions(index_name: str) -> int:
    # Our index names record the partition count they were trained with; anything else
    # (an index made by hand) counts as 1 and is retrained once.
    _, _, tail = index_name.rpartition("_p")
    return int(tail) if tail.isdigit() else 1


def _pq_sub_vectors(embed_dim: int) -> int:
    # 16 (else 8) dims per sub-vector keep Lance on its SIMD path (IvfPq docstring). 32
    # sub-vectors at 512 dims build in ~35 s per 100k rows vs ~58 s for 64, with equal
    # recall once refine_factor re-ranks (0.997 vs 0.999, stack.md section 7).
    for width in (16, 8):
        if embed_dim % width == 0:
            return embed_dim // width
    return 1
