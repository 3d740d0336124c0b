"""The index: LanceDB tables, the one source of truth for what is indexed.

- ``images_<index_id>``: one row per indexed file (path, stat, fingerprint, vector) and one per
  skipped file (``skip_reason`` set, a zero vector), so a file that stops decoding swaps its row
  for its skip note in one ``merge_insert``; skip rows never reach the search snapshot.
- ``roots``: the remembered root directories (with excludes and device) and image files.
- ``runs``: the last run of each index id, for ``clipgrep status``.

This is the only module that imports lancedb (and pyarrow), always inside a
method: ``import lancedb`` costs about 1 s, and ``--help``, completion and
``clipgrep search`` (which reads the numpy snapshot instead) must not pay it.
The write protocol that keeps these and the snapshots consistent is ``index/protocol.py``.

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
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .errors import ClipgrepError

if TYPE_CHECKING:
    import pyarrow as pa

TABLE_PREFIX = "images_"
ROOTS_TABLE = "roots"
RUNS_TABLE = "runs"
SCHEMA_VERSION = "2"  # 2: skip rows (skip_reason) and origin; tables of version 1 are upgraded in place
_FILE_COLUMNS = ["path", "size", "mtime_ns", "fingerprint", "indexed_ns"]
_INDEXED = "skip_reason IS NULL"
_SKIPPED = "skip_reason IS NOT NULL"
EXPORT_BATCH_ROWS = 16_384  # rows per query of a streamed export: 32 MB of vectors at 512 dims
_CLEANUP_WARNING = r"optimize\(cleanup_older_than=0\)"


@dataclass(frozen=True)
class StoredFile:
    """The state of one indexed file, without its vector."""

    path: str  # absolute, os.fsdecode'd: may hold surrogate escapes
    size: int
    mtime_ns: int
    fingerprint: str  # content fingerprint (hex), computed by the caller; plan.IMPORTED_FINGERPRINT if imported
    indexed_ns: int  # wall clock when the file was stat'ed; an mtime this close is "racy"
    origin: str | None = None  # None: found by a walk of local roots; else imported (a walk never deletes it)


@dataclass(frozen=True)
class Skipped:
    """A file that could not be indexed, and why; kept until it changes (or ``--retry-skipped``)."""

    path: str
    size: int
    mtime_ns: int
    reason: str


@dataclass(frozen=True)
class Tracked:
    """A remembered root directory, with the excludes given for it, or a remembered image file.

    ``device`` is the ``st_dev`` it had when last indexed: a different one means another drive,
    or none (an empty mount point), is there now.
    """

    path: str
    excludes: tuple[str, ...] = ()
    device: int | None = None


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


def table_dir(directory: Path, name: str) -> Path:
    return Path(directory) / f"{name}.lance"


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
        """Every indexed file's state by path (~0.5 s per 100k rows); the vector column is never read."""
        if not self.exists():
            return {}
        upgraded = self.has_skip_column()  # a table of version 1 has neither column yet
        rows = self._scan([*_FILE_COLUMNS, "origin"] if upgraded else _FILE_COLUMNS,
                          where=_INDEXED if upgraded else None).to_pydict()
        origins = rows.get("origin") or [None] * len(rows["path"])
        return {
            os.fsdecode(p): StoredFile(os.fsdecode(p), s, m, f, i, o)
            for p, s, m, f, i, o in zip(*(rows[c] for c in _FILE_COLUMNS), origins)
        }

    def skipped(self) -> dict[str, Skipped]:
        """The skip notes: files that did not decode, by path."""
        if not self.exists() or not self.has_skip_column():
            return {}
        rows = self._scan(["path", "size", "mtime_ns", "skip_reason"], where=_SKIPPED).to_pydict()
        return {os.fsdecode(p): Skipped(os.fsdecode(p), s, m, r)
                for p, s, m, r in zip(rows["path"], rows["size"], rows["mtime_ns"], rows["skip_reason"])}

    def vectors(self, paths: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored (read-only) vectors of those ``paths`` that are indexed, e.g. to reuse for moved files."""
        if not paths or not self.exists():
            return {}
        wanted = {path_key(p): os.fsencode(p) for p in paths}
        where = _sql_ids(list(wanted)) + (f" AND {_INDEXED}" if self.has_skip_column() else "")
        table = self._scan(["id", "path", "vector"], where=where)
        matrix = self._matrix(table)
        found = {}
        for row, (key, raw) in enumerate(zip(table.column("id").to_pylist(), table.column("path").to_pylist())):
            if wanted.get(key) == raw:  # a hash collision would return another file's vector
                found[os.fsdecode(raw)] = matrix[row]
        return found

    def count(self) -> int:
        """Indexed rows (skip notes not counted)."""
        return self._open().count_rows(self._indexed_only()) if self.exists() else 0

    def version(self) -> int:
        return self._open().version if self.exists() else 0

    def snapshot_rows(self) -> TableRows:
        """All indexed rows column-wise (one Arrow scan, no per-row Python) for ``snapshot.write_snapshot``."""
        return self.export()[0]

    def export(self) -> tuple[TableRows, dict[str, Skipped], int]:
        """Indexed rows, skip notes and the table version they were read at, from one read of one version."""
        if not self.exists():
            empty = np.zeros(0, np.int64)
            return TableRows([], np.zeros((0, self.embed_dim), np.float32), empty, empty, empty, []), {}, 0
        import pyarrow.compute as pc

        table = self._open()
        version = table.version
        data = table.to_arrow()  # a plain dataset read: ~2x faster than a query scan
        skipped: dict[str, Skipped] = {}
        if "skip_reason" in data.column_names:
            skips = data.filter(pc.is_valid(data.column("skip_reason")))
            for p, s, m, r in zip(*(skips.column(c).to_pylist() for c in ("path", "size", "mtime_ns", "skip_reason"))):
                skipped[os.fsdecode(p)] = Skipped(os.fsdecode(p), s, m, r)
            data = data.filter(pc.is_null(data.column("skip_reason")))
        ints = {c: data.column(c).to_numpy() for c in ("size", "mtime_ns", "indexed_ns")}
        rows = TableRows(data.column("path").to_pylist(), self._matrix(data), ints["size"],
                         ints["mtime_ns"], ints["indexed_ns"], data.column("fingerprint").to_pylist())
        return rows, skipped, version

    def export_batches(self, batch_rows: int | None = None) -> Iterator[TableRows]:
        """The indexed rows in batches of at most ``batch_rows``: memory bounded by a batch, whatever
        the table holds. The caller holds the index lock, so no commit lands in between (``export``
        reads one version without it).

        One query per batch (``offset``/``limit``): one streamed scan (``to_batches``) reads ahead
        without bound (3.4 GB peak RSS at 10^6 x 512); a query of 16,384 rows takes ~0.03 s.
        """
        if not self.exists():
            return
        batch_rows = batch_rows or EXPORT_BATCH_ROWS
        table, where = self._open(), self._indexed_only()
        total = table.count_rows(where)
        columns = ["path", "size", "mtime_ns", "indexed_ns", "fingerprint", "vector"]
        for start in range(0, total, batch_rows):
            query = table.search().select(columns).offset(start).limit(batch_rows)
            part = (query.where(where) if where else query).to_arrow()
            # Queries of one version scan in one order; a row seen twice would be refused by write_snapshot.
            if part.num_rows != min(batch_rows, total - start):
                raise RuntimeError(f"the table changed while it was exported ({part.num_rows} rows at {start})")
            ints = {c: part.column(c).to_numpy() for c in ("size", "mtime_ns", "indexed_ns")}
            yield TableRows(part.column("path").to_pylist(), self._matrix(part), ints["size"],
                            ints["mtime_ns"], ints["indexed_ns"], part.column("fingerprint").to_pylist())

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

    def upsert(self, files: Sequence[StoredFile], vectors: np.ndarray, skips: Sequence[Skipped] = ()) -> int:
        """Insert or replace (by path) ``files`` with their ``vectors`` [len(files), embed_dim], and the
        skip notes ``skips`` (replacing the rows of files that no longer decode), in one commit.

        Returns how many of the paths were not in the table before.
        """
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (len(files), self.embed_dim):
            raise ValueError(f"vectors have shape {vectors.shape}, expected ({len(files)}, {self.embed_dim})")
        if not files and not skips:
            return 0
        # merge_insert refuses two source rows with one key; the last one wins, as in a dict.
        entries: list[StoredFile | Skipped] = [*files, *skips]
        last = {path_key(e.path): i for i, e in enumerate(entries)}
        keys, keep = zip(*sorted(last.items(), key=lambda item: item[1]))
        blank = np.zeros((len(skips), self.embed_dim), np.float32)
        data = self._arrow_rows([entries[i] for i in keep], np.concatenate([vectors, blank])[list(keep)], list(keys))
        table = self._open(create=True)
        result = table.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(data)
        return int(result.num_inserted_rows)

    def delete(self, paths: Sequence[str]) -> None:
        """Remove the rows (indexed or skip notes) of ``paths`` (missing ones are ignored), in one commit.

        One ``IN`` list of 10k ids deletes in ~0.1 s and 500k in ~7 s, so it is never chunked.
        """
        if paths and self.exists():
            self._open().delete(_sql_ids(sorted({path_key(p) for p in paths})))

    def upgrade(self) -> bool:
        """Add the columns of schema version 2 to a table of version 1 (one commit); returns whether it did.

        Existing rows get nulls: indexed rows, found by a walk.
        """
        if not self.exists():
            return False
        table = self._open()
        missing = [name for name in ("skip_reason", "origin") if name not in table.schema.names]
        if not missing:
            return False
        import pyarrow as pa

        table.add_columns([pa.field(name, pa.string()) for name in missing])
        return True

    def maintain(self) -> None:
        """Compact fragments and drop old versions, of this table and of the small ``roots`` and
        ``runs`` tables beside it (every index run commits to ``runs``: without this, a version
        and a data file each).

        Dropping every old version would break a concurrent reader of an older one; index
        runs are the only writers and ``search`` reads the snapshot, so nobody is.
        Takes ~1 ms when there is nothing to do.
        """
        if self.exists():
            _prune(self._open(), delete_unverified=False)
        db = None
        for name in (ROOTS_TABLE, RUNS_TABLE):
            if _has_manifest(table_dir(self.directory, name)):
                db = db or _import_lancedb().connect(str(self.directory))
                _prune(db.open_table(name), delete_unverified=False)

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
            _prune(self._open(), delete_unverified=True)
        return max(0, before - self.disk_bytes())

    # -- internals -------------------------------------------------------------------------

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
        upgradable = schema.names == expected.names[:len(schema.names)] and len(schema.names) >= 7
        if not upgradable or schema.field("vector").type != expected.field("vector").type:
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
            pa.field("skip_reason", pa.string()),  # set: a skip note (zero vector), never searched
            pa.field("origin", pa.string()),  # last: see StoredFile.origin
        ]
        return pa.schema(fields, metadata={"clipgrep.bundle_id": self.bundle_id,
                                           "clipgrep.schema_version": SCHEMA_VERSION})

    def _arrow_rows(self, entries: Sequence[StoredFile | Skipped], vectors: np.ndarray, keys: list[int]) -> pa.Table:
        import pyarrow as pa

        flat = pa.array(np.ascontiguousarray(vectors).reshape(-1))
        files = [e if isinstance(e, StoredFile) else None for e in entries]
        columns = {
            "id": pa.array(keys, pa.int64()),
            "path": pa.array([os.fsencode(e.path) for e in entries], pa.binary()),
            "size": pa.array([e.size for e in entries], pa.int64()),
            "mtime_ns": pa.array([e.mtime_ns for e in entries], pa.int64()),
            "fingerprint": pa.array([f.fingerprint if f else "" for f in files], pa.string()),
            "indexed_ns": pa.array([f.indexed_ns if f else 0 for f in files], pa.int64()),
            "vector": pa.FixedSizeListArray.from_arrays(flat, self.embed_dim),
            "skip_reason": pa.array([e.reason if isinstance(e, Skipped) else None for e in entries], pa.string()),
            "origin": pa.array([f.origin if f else None for f in files], pa.string()),
        }
        return pa.table(columns, schema=self._schema)

    def has_skip_column(self) -> bool:
        return "skip_reason" in self._open().schema.names  # False only for a table not upgraded yet

    def _indexed_only(self) -> str | None:
        return _INDEXED if self.has_skip_column() else None

    def _scan(self, columns: list[str], where: str | None = None) -> pa.Table:
        # A plain scan (no query vector), so LanceDB adds no _distance column and logs
        # no autoprojection deprecation notice.
        query = self._open().search().select(columns).limit(None)
        return (query.where(where) if where else query).to_arrow()

    def _matrix(self, table: pa.Table) -> np.ndarray:
        flat = table.column("vector").combine_chunks().flatten().to_numpy()
        return flat.reshape(-1, self.embed_dim)


# -- the small tables beside the images: roots and runs ----------------------------------------------


def load_tracked(directory: Path) -> tuple[dict[str, Tracked], dict[str, Tracked], int]:
    """The remembered root directories and files, by path, and the ``roots`` table version read."""
    if not _has_manifest(table_dir(directory, ROOTS_TABLE)):
        return {}, {}, 0
    table = _import_lancedb().connect(str(directory)).open_table(ROOTS_TABLE)
    version = table.version
    rows = table.to_arrow().to_pylist()
    found: dict[str, dict[str, Tracked]] = {"root": {}, "file": {}}
    for row in rows:
        path = os.fsdecode(row["path"])
        found[row["kind"]][path] = Tracked(path, tuple(row["excludes"] or ()), row["device"])
    return found["root"], found["file"], version


def save_tracked(directory: Path, roots: dict[str, Tracked], files: dict[str, Tracked]) -> int:
    """Replace the remembered roots and files in one commit; returns the new ``roots`` table version."""
    import pyarrow as pa

    schema = pa.schema([pa.field("path", pa.binary(), nullable=False), pa.field("kind", pa.string(), nullable=False),
                        pa.field("excludes", pa.list_(pa.string())), pa.field("device", pa.int64())])
    entries = [("root", t) for t in roots.values()] + [("file", t) for t in files.values()]
    data = pa.table({"path": [os.fsencode(t.path) for _, t in entries], "kind": [k for k, _ in entries],
                     "excludes": [list(t.excludes) for _, t in entries], "device": [t.device for _, t in entries]},
                    schema=schema)
    table = _small_table(directory, ROOTS_TABLE, schema)
    table.add(data, mode="overwrite")
    return int(table.version)


def record_run(directory: Path, index_id: str, summary: dict[str, Any]) -> None:
    """Keep ``summary`` as the last run of ``index_id`` (one commit)."""
    import json

    import pyarrow as pa

    schema = pa.schema([pa.field("index_id", pa.string(), nullable=False),
                        pa.field("summary", pa.string(), nullable=False)])
    row = pa.table({"index_id": [index_id], "summary": [json.dumps(summary)]}, schema=schema)
    _small_table(directory, RUNS_TABLE, schema).merge_insert("index_id") \
        .when_matched_update_all().when_not_matched_insert_all().execute(row)


def last_run(directory: Path, index_id: str) -> dict[str, Any] | None:
    import json

    if not _has_manifest(table_dir(directory, RUNS_TABLE)):
        return None
    table = _import_lancedb().connect(str(directory)).open_table(RUNS_TABLE)
    rows = table.search().where(f"index_id = '{_sql_text(index_id)}'").limit(None).to_arrow().to_pylist()
    return json.loads(rows[0]["summary"]) if rows else None


def drop_run(directory: Path, index_id: str) -> None:
    if _has_manifest(table_dir(directory, RUNS_TABLE)):
        table = _import_lancedb().connect(str(directory)).open_table(RUNS_TABLE)
        table.delete(f"index_id = '{_sql_text(index_id)}'")


def _sql_text(value: str) -> str:
    return value.replace("'", "''")


def _prune(table: Any, delete_unverified: bool) -> None:
    """Compact ``table`` and drop every version but the latest."""
    with warnings.catch_warnings():
        # LanceDB warns that cleanup_older_than=0 breaks concurrent readers of old versions.
        warnings.filterwarnings("ignore", message=_CLEANUP_WARNING, category=UserWarning)
        table.optimize(cleanup_older_than=datetime.timedelta(0), delete_unverified=delete_unverified)
        # optimize prunes versions before it updates a vector index (tables indexed by older
        # clipgreps have one), so an index update leaves one stale version behind; a second
        # pass (~5 ms) prunes it.
        if len(table.list_versions()) > 1:
            table.optimize(cleanup_older_than=datetime.timedelta(0))


def _small_table(directory: Path, name: str, schema: pa.Schema) -> Any:
    db = _import_lancedb().connect(str(directory))
    if _has_manifest(table_dir(directory, name)):
        return db.open_table(name)
    Path(directory).mkdir(parents=True, exist_ok=True)
    return db.create_table(name, schema=schema, exist_ok=True)
