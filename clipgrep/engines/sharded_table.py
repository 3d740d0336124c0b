"""The tables an ``index --engine ray`` run writes, at a ``--table URI`` (local or object storage).

- ``<name>``: clipgrep's image table (``store.IndexStore``'s columns, so any later column a
  merge adds comes along as nulls) plus ``shard``, the id of the shard whose commit added the row.
- ``<name>_skipped``: files that could not be decoded, with the reason, so that a re-run does not
  try them again until they change.

Each shard's image rows are one Lance append (Ray's Lance sink commits once, from the driver),
so a row's shard id is present exactly when its shard committed. Everything else here is
LanceDB's public API. The only module of the engine that opens a table.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ClipgrepError, first_line
from ..store import IndexStore, _import_lancedb, path_key
from ..table_uri import TableLocation
from .shard_plan import RowState

if TYPE_CHECKING:
    import pyarrow as pa

# PQ trains 2**num_bits centroids per sub-vector; fewer rows than that cannot train it.
_MIN_PQ_ROWS = 256
SHARD = "shard"
SKIPPED_SUFFIX = "_skipped"
_STATE_COLUMNS = ["path", "size", "mtime_ns", "fingerprint", "indexed_ns", SHARD]
_DELETE_CHUNK = 5_000  # ids per delete predicate: one commit each, ~0.1 s per 10k ids (store.py)


class ShardedTable:
    """The image and skipped-files tables of one ``--table`` location, for one image tower."""

    def __init__(self, location: TableLocation, bundle_id: str, embed_dim: int) -> None:
        self.location = location
        self.bundle_id = bundle_id
        self.embed_dim = embed_dim
        self._db: Any = None

    @classmethod
    def existing(cls, location: TableLocation) -> ShardedTable:
        """The tables as written, with the tower id and vector size their schema records."""
        table = cls(location, "", 0)
        try:
            images = table._connect().open_table(location.name)
        except (FileNotFoundError, ValueError) as e:
            raise ClipgrepError(f"no table at {location.uri} ({first_line(e)})",
                                f"index into it first: clipgrep index --engine ray SOURCE --table {location.uri}"
                                ) from None
        schema = images.schema
        if SHARD not in schema.names or "vector" not in schema.names:
            raise ClipgrepError(f"{location.uri} is not a table clipgrep's ray engine wrote",
                                "give the --table that 'clipgrep index --engine ray' wrote")
        table.bundle_id = (schema.metadata or {}).get(b"clipgrep.bundle_id", b"").decode()
        table.embed_dim = schema.field("vector").type.list_size
        table.__dict__["images"] = images
        return table

    # -- schemas ------------------------------------------------------------------------------

    @cached_property
    def schema(self) -> pa.Schema:
        import pyarrow as pa

        base = IndexStore(Path(), self.bundle_id, self.embed_dim)._schema  # the local table's columns
        return base.append(pa.field(SHARD, pa.string(), nullable=False))

    @cached_property
    def skipped_schema(self) -> pa.Schema:
        import pyarrow as pa

        return pa.schema([pa.field("id", pa.int64(), nullable=False), pa.field("path", pa.binary(), nullable=False),
                          pa.field("size", pa.int64(), nullable=False), pa.field("mtime_ns", pa.int64(), nullable=False),
                          pa.field("fingerprint", pa.string(), nullable=False),
                          pa.field("indexed_ns", pa.int64(), nullable=False),
                          pa.field("reason", pa.string(), nullable=False), pa.field(SHARD, pa.string(), nullable=False)])

    # -- opening ------------------------------------------------------------------------------

    def _connect(self) -> Any:
        if self._db is None:
            self._db = _import_lancedb().connect(self.location.database,
                                                 storage_options=self.location.storage_options() or None)
        return self._db

    @cached_property
    def images(self) -> Any:
        return self._open_or_create(self.location.name, self.schema)

    @cached_property
    def skipped(self) -> Any:
        return self._open_or_create(self.location.name + SKIPPED_SUFFIX, self.skipped_schema)

    def _open_or_create(self, name: str, schema: pa.Schema) -> Any:
        try:
            table = self._connect().create_table(name, schema=schema, exist_ok=True)
        except Exception as e:  # noqa: BLE001 - object-store and permission errors have no common base
            raise ClipgrepError(f"cannot open or create the table {self.location.database}/{name}: {first_line(e)}",
                                "check the --table URI and the credentials (AWS_* variables)") from None
        written_by = (table.schema.metadata or {}).get(b"clipgrep.bundle_id", b"").decode()
        if "vector" in schema.names and written_by != self.bundle_id:
            raise ClipgrepError(f"{self.location.uri} holds the vectors of another model",
                                "give another --table, or the model it was made with (--model)")
        return table

    def refresh(self) -> None:
        """See commits made by other processes since the tables were opened (Ray's sink commits)."""
        for name in ("images", "skipped"):
            if name in self.__dict__:
                self.__dict__[name].checkout_latest()

    def storage_version(self) -> str:
        """The data storage version of the image table, for Ray's sink to write the same."""
        return str(self.images.to_lance().data_storage_version)

    # -- reading ------------------------------------------------------------------------------

    def rows(self) -> list[RowState]:
        """The file state of every image row and skip record (no vectors read)."""
        found = []
        for table, skipped in ((self.images, False), (self.skipped, True)):
            data = table.search().select(_STATE_COLUMNS).limit(None).to_arrow().to_pydict()
            found += [RowState(os.fsdecode(p), s, m, f, i, sh, skipped)
                      for p, s, m, f, i, sh in zip(*(data[c] for c in _STATE_COLUMNS))]
        return found

    def committed_shards(self) -> set[str]:
        column = self.images.search().select([SHARD]).limit(None).to_arrow().column(SHARD)
        return set(column.unique().to_pylist())

    def count(self) -> int:
        return int(self.images.count_rows())

    def skip_reasons(self) -> list[tuple[str, str]]:
        data = self.skipped.search().select(["path", "reason"]).limit(None).to_arrow().to_pydict()
        return sorted((os.fsdecode(p), r) for p, r in zip(data["path"], data["reason"]))

    # -- writing ------------------------------------------------------------------------------

    def delete(self, rows: Sequence[RowState]) -> None:
        """Delete exactly these rows (by path and shard, so a file's current row in another shard stays)."""
        for skipped, table in ((False, self.images), (True, self.skipped)):
            by_shard: dict[str, list[int]] = {}
            for row in rows:
                if row.skipped == skipped:
                    by_shard.setdefault(row.shard, []).append(path_key(row.path))
            for shard, keys in sorted(by_shard.items()):
                for start in range(0, len(keys), _DELETE_CHUNK):
                    ids = ",".join(map(str, sorted(keys[start:start + _DELETE_CHUNK])))
                    table.delete(f"{SHARD} = '{_sql_text(shard)}' AND id IN ({ids})")

    def add_skipped(self, records: Iterable[dict[str, Any]]) -> None:
        """Append skip records (``path`` str, ``size``, ``mtime_ns``, ``fingerprint``, ``indexed_ns``,
        ``reason``, ``shard``) in one commit."""
        import pyarrow as pa

        records = list(records)
        if records:
            columns = {name: [r[name] for r in records] for name in self.skipped_schema.names if name != "id"}
            columns["path"] = [os.fsencode(p) for p in columns["path"]]
            columns["id"] = [path_key(p) for p in columns["path"]]
            self.skipped.add(pa.table(columns, schema=self.skipped_schema))

    # -- vector index -------------------------------------------------------------------------

    def has_vector_index(self) -> bool:
        return any(list(ix.columns) == ["vector"] for ix in self.images.list_indices())

    def ensure_vector_index(self, min_rows: int) -> bool:
        """An IVF_PQ (cosine) index once the table has ``min_rows`` rows, built in this process with
        LanceDB's ``create_index`` and retrained when the table has grown ~4x; returns whether one exists."""
        from lancedb.index import IvfPq

        rows = self.count()
        current = [ix.name for ix in self.images.list_indices() if list(ix.columns) == ["vector"]]
        if rows < max(min_rows, _MIN_PQ_ROWS):
            return bool(current)
        partitions = _ivf_partitions(rows)
        name = f"vector_ivfpq_p{partitions}"
        if current and partitions < 2 * int(current[0].rpartition("_p")[2] or 1):
            self.images.optimize()  # folds rows added since into the index
            return True
        config = IvfPq(distance_type="cosine", num_partitions=partitions, num_sub_vectors=_pq_sub_vectors(self.embed_dim))
        self.images.create_index("vector", config=config, replace=True, name=name)
        for old in current:
            if old != name:
                self.images.drop_index(old)
        return True


def _sql_text(text: str) -> str:
    return text.replace("'", "''")


def arrow_rows(schema: pa.Schema, columns: dict[str, Any], vectors: np.ndarray) -> pa.Table:
    """A table of ``schema`` from python/numpy ``columns`` (path as str) and [N, D] ``vectors``;
    nullable columns not given (added to the local table by later versions) are null."""
    import pyarrow as pa

    n = len(vectors)
    arrays = []
    for f in schema:
        if f.name == "vector":
            flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, f.type.list_size))
        elif f.name == "id":
            arrays.append(pa.array([path_key(p) for p in columns["path"]], pa.int64()))
        elif f.name == "path":
            arrays.append(pa.array([os.fsencode(p) for p in columns["path"]], pa.binary()))
        elif f.name in columns:
            arrays.append(pa.array(list(columns[f.name]), f.type))
        else:
            arrays.append(pa.nulls(n, f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _ivf_partitions(rows: int) -> int:
    # LanceDB's documented default: about sqrt(rows), i.e. ~316 rows per partition at 100k.
    return max(1, round(math.sqrt(rows)))


def _pq_sub_vectors(embed_dim: int) -> int:
    # 16 (else 8) dims per sub-vector keep Lance on its SIMD path (IvfPq docstring). 32
    # sub-vectors at 512 dims build in ~35 s per 100k rows vs ~58 s for 64, with equal
    # recall once refine_factor re-ranks (0.997 vs 0.999, stack.md section 7).
    for width in (16, 8):
        if embed_dim % width == 0:
            return embed_dim // width
    return 1
