"""``clipgrep index --engine ray``: index local folders or object-store prefixes on a Ray cluster.

One run:

1. list the sources (``sources``) and read the table's rows without vectors (``sharded_table``);
2. plan (``shard_plan``): stale rows, then the files to encode in deterministic shards;
3. delete the stale rows (one commit per shard id);
4. per shard not yet committed: a Ray Data job reads the shard's list (``from_items``), fetches
   and decodes each file in a CPU task pool with the local path's ``decode_file``/``decode_bytes``
   (the same preprocessing and skip reasons), encodes in an actor pool holding one ONNX Runtime
   session per actor (CUDA when the actor has a GPU), records skipped files, then appends the
   image rows with Ray's Lance sink (``Dataset.write_lance``: workers write fragments, the driver
   commits once). That append is the shard's commit;
5. build or update the IVF_PQ index once the table is large.

Ray Data retries failed tasks and restarts dead actors, and the sink re-reads its input on a
retried fragment write. A driver killed mid-shard leaves at most unreferenced data files: the
re-run lists again, finds the committed shards' files current and redoes the rest.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ClipgrepError
from ..index.scan import ScanOptions
from ..table_uri import is_object_uri, parse_table_uri
from .shard_plan import Shard, make_shard_plan
from .sharded_table import SHARD, ShardedTable, arrow_rows
from .sources import list_sources, normalise_source, read_object

if TYPE_CHECKING:
    import pyarrow as pa

    from ..bundle import Bundle
    from ..embed.preprocess import PreprocessConfig

# Lance's default is 1M rows per file, ~2 GB of vectors buffered per write task (512 dims).
MIN_ROWS_PER_FILE = 65_536
DECODE_MEMORY = 300 * 2**20  # a decode worker's peak (index/decode.py: DecodeLimits)


@dataclass(frozen=True)
class RayIndexOptions:
    address: str | None = None  # None: start a local cluster (or use the one this process started)
    shard_size: int = 10_000  # files per commit: a killed run redoes at most one shard
    scan: ScanOptions = field(default_factory=ScanOptions)
    retry_skipped: bool = False
    vector_index_min_rows: int = 50_000
    decode_batch: int = 32
    encode_batch: int = 64
    encoders: int | None = None  # actors; default: one per GPU, else one per 2 CPUs of the cluster


@dataclass
class RayIndexReport:
    table: str
    listed: int = 0
    unchanged: int = 0
    encoded: int = 0
    skipped: int = 0  # this run
    skipped_before: int = 0
    removed: int = 0
    shards: int = 0  # planned by this run
    shards_committed_before: int = 0  # planned shards found already committed (and not redone)
    rows: int = 0
    vector_index: bool = False
    skipped_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), this run
    problems: list[tuple[str, str]] = field(default_factory=list)  # walk problems (path, reason)
    seconds: float = 0.0


def index_with_ray(sources: Sequence[str], table_uri: str, bundle: Bundle, options: RayIndexOptions = RayIndexOptions(),
                   on_shard: Callable[[int, int], None] | None = None) -> RayIndexReport:
    """Index ``sources`` into the table at ``table_uri``; ``on_shard(done, total)`` after each shard."""
    if not sources:
        raise ClipgrepError("--engine ray needs at least one SOURCE", "e.g. clipgrep index --engine ray s3://bucket/photos "
                            "--table s3://bucket/clipgrep/photos")
    started = time.monotonic()
    location = parse_table_uri(table_uri)
    normalised = [normalise_source(s) for s in sources]
    report = RayIndexReport(location.uri)
    listed, problems = list_sources(normalised, options.scan)
    report.listed = len(listed)
    report.problems = [(p.path, p.reason) for p in problems]
    table = ShardedTable(location, bundle.index_id, bundle.embed_dim)
    plan = make_shard_plan(listed, table.rows(), normalised, options.shard_size, retry_skipped=options.retry_skipped)
    report.unchanged, report.skipped_before, report.removed = plan.unchanged, plan.skipped_before, plan.removed
    report.shards = len(plan.shards)
    table.delete(plan.stale)
    committed = table.committed_shards()
    todo = [s for s in plan.shards if s.id not in committed]
    report.shards_committed_before = len(plan.shards) - len(todo)
    if todo:
        job = _RayJob(bundle, table, options, indexed_ns=time.time_ns())
        for done, shard in enumerate(todo, 1):
            encoded, skipped = job.run(shard)
            report.encoded += encoded
            report.skipped_files += skipped
            if on_shard:
                on_shard(done, len(todo))
    report.skipped = len(report.skipped_files)
    table.refresh()  # Ray's sink committed from elsewhere: see its versions
    report.vector_index = table.ensure_vector_index(options.vector_index_min_rows)
    report.rows = table.count()
    report.seconds = time.monotonic() - started
    return report


class _RayJob:
    """What every shard's Ray Data job shares: the cluster connection and the bundle's bytes."""

    def __init__(self, bundle: Bundle, table: ShardedTable, options: RayIndexOptions, indexed_ns: int) -> None:
        ray = connect(options.address)
        from ..embed.preprocess import PreprocessConfig

        self.ray = ray
        self.table = table
        self.options = options
        self.indexed_ns = indexed_ns
        self.config = PreprocessConfig.from_dict(bundle.preprocess_config)
        # Shipped through the object store, so workers need clipgrep installed but not the model.
        self.bundle_files = ray.put({p.name: p.read_bytes() for p in bundle.path.iterdir() if p.is_file()})
        self.storage_version = table.storage_version()
        resources = ray.cluster_resources()
        self.gpus = int(resources.get("GPU", 0))
        cpus = max(1, int(resources.get("CPU", 1)))
        self.encoders = options.encoders or self.gpus or max(1, cpus // 2)
        self.encoder_cpus = 1 if self.gpus else max(1, cpus // (2 * self.encoders))

    def run(self, shard: Shard) -> tuple[int, list[tuple[str, str]]]:
        """Encode and commit one shard; returns the rows added and the files skipped."""
        from ray.data import ActorPoolStrategy

        items = [{"path": f.path, "size": f.size, "mtime_ns": f.mtime_ns, "etag": f.etag,
                  "indexed_ns": self.indexed_ns, SHARD: shard.id} for f in shard.files]
        blocks = max(1, min(len(items) // self.options.decode_batch, 64))
        gpu_args: dict[str, Any] = {"num_gpus": 1} if self.gpus else {"num_cpus": self.encoder_cpus}
        encoded = (self.ray.data.from_items(items, override_num_blocks=blocks)
                   # A decode task whose worker dies is run again (Ray retries tasks 3 times). The memory a
                   # decode holds is reserved; as a resource the actors lack, it also keeps Ray from fusing
                   # decoding into the encoder actors, which would serialise the two.
                   .map_batches(decode_batch, fn_kwargs={"config": self.config}, batch_size=self.options.decode_batch,
                                num_cpus=1, memory=DECODE_MEMORY)
                   .map_batches(OrtEncoder, batch_size=self.options.encode_batch,
                                fn_constructor_kwargs={"bundle_files": self.bundle_files, "schema": self.table.schema,
                                                       "threads": self.encoder_cpus},
                                compute=ActorPoolStrategy(size=self.encoders), **gpu_args)
                   .materialize())
        skipped = encoded.map_batches(_skip_records, batch_format="pyarrow").take_all()
        self.table.add_skipped(skipped)  # before the commit: a skip is never lost, and is harmless if redone
        rows = encoded.count() - len(skipped)  # materialized: a count from block metadata, no job
        if rows:
            images = encoded.map_batches(_image_rows, fn_kwargs={"schema": self.table.schema}, batch_format="pyarrow")
            images.write_lance(self.table.location.uri, schema=self.table.schema, mode="append",
                               min_rows_per_file=MIN_ROWS_PER_FILE, data_storage_version=self.storage_version,
                               storage_options=self.table.location.storage_options() or None)
        return rows, [(r["path"], r["reason"]) for r in skipped]


def connect(address: str | None) -> Any:
    """``ray`` connected to the cluster at ``address`` (or to a new local one), once per process."""
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # Ray's uv hook misfires in sandboxes
    try:
        import ray
    except ImportError:
        raise ClipgrepError("--engine ray needs the ray extra", "pip install 'clipgrep[ray]'") from None
    if not ray.is_initialized():
        try:
            with warnings.catch_warnings():
                # ray.init forks; lancedb, imported already, warns about forks it cannot see the end of.
                warnings.filterwarnings("ignore", message="lancedb fork support", category=RuntimeWarning)
                ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise ClipgrepError(f"cannot reach the Ray cluster at {address or 'a new local cluster'}: {e}",
                                "start it with: ray start --head, and pass --address HOST:6379") from None
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-job INFO lines on stderr
    return ray


# -- the tasks and actors (they run on the workers) -------------------------------------------


def decode_batch(batch: dict[str, np.ndarray], config: PreprocessConfig) -> dict[str, Any]:
    """Fetch and decode a batch of files: pixels for each, zeros and a skip reason for the ones that fail."""
    from ..index.decode import classify_error, decode_bytes, decode_file
    from ..index.plan import fingerprint

    pixels = np.zeros((len(batch["path"]), 3, *config.size), np.float32)
    reasons, fingerprints = [], []
    for row, path in enumerate(batch["path"]):
        path = str(path)
        etag = str(batch["etag"][row])
        if is_object_uri(path):
            try:
                array, reason = decode_bytes(read_object(path), config)
            except Exception as e:  # noqa: BLE001 - a missing or unreadable object is a skip, not a failed job
                array, reason = None, "vanished during indexing" if "NoSuchKey" in repr(e) else classify_error(e)
            fp = etag
        else:
            array, reason = decode_file(path, config)
            try:
                fp = fingerprint(path, int(batch["size"][row]))
            except OSError:
                fp = ""
        if array is not None:
            pixels[row] = array
        reasons.append(reason or "")
        fingerprints.append(fp)
    return {**batch, "pixels": pixels, "reason": np.array(reasons, dtype=object),
            "fingerprint": np.array(fingerprints, dtype=object)}


class OrtEncoder:
    """One ONNX Runtime session per actor; CUDA when the actor was given a GPU (create_session decides)."""

    def __init__(self, bundle_files: dict[str, bytes], schema: pa.Schema, threads: int) -> None:
        import ray

        from ..bundle import load_bundle

        if isinstance(bundle_files, ray.ObjectRef):  # Ray passes constructor kwargs unresolved
            bundle_files = ray.get(bundle_files)
        self.directory = tempfile.mkdtemp(prefix="clipgrep-bundle-")
        for name, data in bundle_files.items():
            with open(os.path.join(self.directory, name), "wb") as f:
                f.write(data)
        self.encoder = load_bundle(self.directory, verify="full").image_encoder(threads=threads)
        self.schema = schema

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import pyarrow as pa

        ok = batch["reason"] == ""
        vectors = np.zeros((len(ok), self.encoder.embed_dim), np.float32)
        if ok.any():
            vectors[ok] = self.encoder.encode_pixels(batch["pixels"][ok])
        columns = {name: batch[name] for name in ("path", "size", "mtime_ns", "fingerprint", "indexed_ns", SHARD)}
        table = arrow_rows(self.schema, columns, vectors)
        return table.append_column("reason", pa.array(list(batch["reason"]), pa.string()))

    def __del__(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _image_rows(table: pa.Table, schema: pa.Schema) -> pa.Table:
    import pyarrow.compute as pc

    return table.filter(pc.equal(table.column("reason"), "")).select(schema.names).cast(schema)


def _skip_records(table: pa.Table) -> pa.Table:
    import pyarrow as pa
    import pyarrow.compute as pc

    skipped = table.filter(pc.not_equal(table.column("reason"), ""))
    paths = pa.array([os.fsdecode(p) for p in skipped.column("path").to_pylist()], pa.string())
    return skipped.select(["size", "mtime_ns", "fingerprint", "indexed_ns", "reason", SHARD]).append_column("path", paths)
