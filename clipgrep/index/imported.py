"""``clipgrep index --from-embeddings DIR``: rows from image vectors computed elsewhere.

Reads clip-retrieval's inference output as its writer (``clip_inference/writer.py``) lays it out::

    DIR/img_emb/img_emb_{N}.npy          float16 (its default) or float32 [n, D], one file per partition
    DIR/metadata/metadata_{N}.parquet    column image_path, same row order; caption, url, ... may follow
    DIR/text_emb/text_emb_{N}.npy        caption embeddings: not images, not read

N is zero-padded to the width of the partition count (``img_emb_0``, or ``img_emb_07`` of 12
partitions), so shards pair up by number, not by name. ``image_path`` is the path clip-retrieval
was given (relative when its input folder was), a webdataset key, or a URL.

Paths: a URL or object-store key (``scheme://...``) is stored as given; anything else is a file
path, made absolute against the current directory like every path clipgrep is given. A local
file that exists records its size and mtime, so a later walk of a root holding it keeps the
imported vector until the file changes. Every row carries ``origin`` ("clip-retrieval:DIR"),
which keeps it from ever being deleted by a walk that does not find its file.

Shards are read streaming (the .npy memory-mapped, the parquet one record batch at a time) and
each batch is one bounded commit, an upsert by path: memory stays flat whatever the size of the
set, and a killed import run again writes every row exactly once. Every shard's header is
checked before anything is written, so a wrong dimension stops the import with the table untouched.
"""
from __future__ import annotations

import functools
import os
import re
import stat
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ClipgrepError
from ..ranking import is_url
from .build import index_writer
from .interrupt import IndexInterrupted, StopRequest
from .plan import IMPORTED_FINGERPRINT
from .protocol import commit, finish

if TYPE_CHECKING:
    from ..bundle import Bundle
    from ..store import IndexStore, StoredFile

ORIGIN_PREFIX = "clip-retrieval:"
_SHARD = re.compile(r"^img_emb_(\d+)\.npy$")
_METADATA = re.compile(r"^metadata_(\d+)\.parquet$")
_PATH_COLUMN = "image_path"


@dataclass(frozen=True)
class ImportOptions:
    commit_rows: int = 20_000            # rows per LanceDB commit: bounds memory and what a crash redoes
    wait_for_lock: bool = True


@dataclass
class ImportProgress:
    phase: str = "checking"              # checking | importing | finishing
    total: int = 0                       # rows in every usable shard
    done: int = 0                        # rows read so far (imported or skipped)


@dataclass
class ImportReport:
    source: str
    origin: str
    shards: int = 0                      # usable shards
    added: int = 0                       # rows new to the index
    updated: int = 0                     # rows whose path was indexed already (replaced)
    skipped: dict[str, int] = field(default_factory=dict)     # reason -> rows not imported
    problems: list[tuple[str, str]] = field(default_factory=list)  # (file, why) of shards left out
    rows: int = 0                        # rows in the index afterwards
    seconds: float = 0.0


@dataclass(frozen=True)
class Shard:
    number: int
    vectors: Path
    metadata: Path
    rows: int


ImportProgressCallback = Callable[[ImportProgress], None]


def stored_path(raw: object, base: str) -> str | None:
    """How an ``image_path`` value is stored, or None if it names nothing.

    >>> stored_path("s3://bucket/a.jpg", "/x"), stored_path("b/c.jpg", "/x"), stored_path("", "/x")
    ('s3://bucket/a.jpg', '/x/b/c.jpg', None)
    """
    if isinstance(raw, bytes):
        raw = os.fsdecode(raw)
    if not isinstance(raw, str) or not raw or "\0" in raw:
        return None
    if is_url(raw):
        return raw
    return os.path.abspath(os.path.join(base, raw))


def find_shards(source: Path, embed_dim: int) -> tuple[list[Shard], list[tuple[str, str]]]:
    """The usable shards of ``source``, by number, and why any others are left out.

    Raises ClipgrepError if there are none, or if a shard's vectors are not ``embed_dim`` wide.
    """
    import pyarrow.parquet as pq

    emb_dir = source / "img_emb"
    if not source.is_dir():
        raise ClipgrepError(f"--from-embeddings {source} is not a directory",
                            "pass the output folder of clip-retrieval's inference (it holds img_emb/)")
    numbered = sorted((int(m.group(1)), p) for p in (emb_dir.iterdir() if emb_dir.is_dir() else ())
                      if (m := _SHARD.match(p.name)))
    if not numbered:
        text_only = (source / "text_emb").is_dir()
        raise ClipgrepError(f"{source} has no image embeddings (img_emb/img_emb_N.npy)",
                            "clip-retrieval wrote text embeddings only; rerun its inference with images enabled"
                            if text_only else "pass the output folder of clip-retrieval's inference")
    shards: list[Shard] = []
    problems: list[tuple[str, str]] = []
    metadata = {int(m.group(1)): p for p in (source / "metadata").glob("metadata_*.parquet")
                if (m := _METADATA.match(p.name))}
    for number, path in numbered:
        try:
            vectors = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            problems.append((str(path), f"cannot be read ({e}); its rows were not imported"))
            continue
        if vectors.ndim != 2 or vectors.dtype.kind != "f":
            problems.append((str(path), f"holds {vectors.dtype} {vectors.shape}, not a float matrix; skipped"))
            continue
        if vectors.shape[1] != embed_dim:
            raise ClipgrepError(f"{path} holds {vectors.shape[1]}-dim embeddings but the model makes {embed_dim}-dim ones",
                                "import them with the model that computed them: --model NAME")
        meta = metadata.get(number)
        if meta is None:
            problems.append((str(path), f"has no metadata/metadata_{number}.parquet (no paths); skipped"))
            continue
        try:
            parquet = pq.ParquetFile(meta)
            names, rows = parquet.schema_arrow.names, parquet.metadata.num_rows
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            problems.append((str(meta), f"cannot be read ({e}); shard {number} skipped"))
            continue
        if _PATH_COLUMN not in names:
            problems.append((str(meta), f"has no {_PATH_COLUMN} column; shard {number} skipped"))
        elif rows != len(vectors):
            problems.append((str(meta), f"has {rows} rows for {len(vectors)} embeddings; shard {number} skipped"))
        else:
            shards.append(Shard(number, path, meta, rows))
    return shards, problems


def import_embeddings(source: str | os.PathLike[str], *, bundle: Bundle | None = None,
                      options: ImportOptions = ImportOptions(), on_progress: ImportProgressCallback | None = None,
                      on_wait: Callable[[], None] | None = None) -> ImportReport:
    """Import clip-retrieval's embeddings under ``source`` into the index of ``bundle``, then publish
    the snapshot so that search finds them.

    Rows that cannot be imported (no path, a zero or non-finite vector) are counted in
    ``report.skipped``; unreadable or mismatched shards are listed in ``report.problems``.
    On SIGINT/SIGTERM (main thread only) it stops after the current commit, publishes what it
    wrote and raises ``IndexInterrupted``; running it again finishes the job.

    >>> import_embeddings("clip-out/", bundle=load_model("vit-b-32")).added  # doctest: +SKIP
    """
    from ..models import load_model
    from ..store import IndexStore

    bundle = bundle or load_model()
    on_progress = on_progress or (lambda _: None)
    started = time.time()
    folder = Path(os.path.abspath(os.path.expanduser(os.fspath(source))))
    with index_writer(bundle, options.wait_for_lock, on_wait) as (directory, stop):
        progress = ImportProgress()
        on_progress(progress)
        shards, problems = find_shards(folder, bundle.embed_dim)
        report = ImportReport(str(folder), ORIGIN_PREFIX + str(folder), len(shards), problems=problems)
        store = IndexStore(directory, bundle.index_id, bundle.embed_dim)
        commit("orphans", store.cleanup_orphans)
        progress.phase, progress.total = "importing", sum(s.rows for s in shards)
        skipped: Counter[str] = Counter()
        indexed_ns = time.time_ns()
        for shard in shards:
            _import_shard(shard, store, report, skipped, indexed_ns, options.commit_rows, stop,
                          lambda n: _advance(progress, n, on_progress))
        report.skipped = {reason: n for reason, n in skipped.items() if n}
        progress.phase = "finishing"
        on_progress(progress)
        report.rows, _ = finish(store, upkeep=stop.signum is None)
        report.seconds = round(time.time() - started, 3)
        if stop.signum is not None:
            raise IndexInterrupted(stop.signum, report, report.added + report.updated)
        from ..store import record_run

        commit("run", lambda: record_run(directory, bundle.index_id, {
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": report.seconds, "rows": report.rows,
            "imported_from": report.source, "added": report.added, "updated": report.updated,
            "skipped": sum(skipped.values())}))
    return report


def _advance(progress: ImportProgress, rows: int, on_progress: ImportProgressCallback) -> None:
    progress.done += rows
    on_progress(progress)


def _import_shard(shard: Shard, store: IndexStore, report: ImportReport, skipped: Counter[str], indexed_ns: int,
                  commit_rows: int, stop: StopRequest, advance: Callable[[int], None]) -> None:
    """Upsert one shard's rows, a record batch (at most ``commit_rows`` rows) per commit."""
    import pyarrow.parquet as pq

    vectors = np.load(shard.vectors, mmap_mode="r", allow_pickle=False)
    base = os.getcwd()
    start = 0
    for batch in pq.ParquetFile(shard.metadata).iter_batches(batch_size=commit_rows, columns=[_PATH_COLUMN]):
        if stop.signum is not None:
            return
        paths = [stored_path(raw, base) for raw in batch.column(0).to_pylist()]
        chunk = np.asarray(vectors[start:start + len(paths)], dtype=np.float32)
        start += len(paths)
        files, unit = _rows(paths, chunk, report.origin, indexed_ns, skipped)
        if files:
            added = commit("rows", functools.partial(store.upsert, files, unit))
            report.added += added
            report.updated += len({f.path for f in files}) - added
        advance(len(paths))


def _rows(paths: list[str | None], vectors: np.ndarray, origin: str, indexed_ns: int,
          skipped: Counter[str]) -> tuple[list[StoredFile], np.ndarray]:
    """The storable rows of one batch, with unit vectors; counts what cannot be stored."""
    from ..store import StoredFile

    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.linalg.norm(vectors, axis=1)
    usable = np.isfinite(norms) & (norms > 0)
    named = np.array([p is not None for p in paths], dtype=bool)
    skipped["no image_path"] += int(np.count_nonzero(~named))
    skipped["zero or non-finite vector"] += int(np.count_nonzero(named & ~usable))
    keep = np.flatnonzero(named & usable)
    files = []
    for i in keep.tolist():
        path = paths[i]
        assert path is not None  # named
        size, mtime_ns = _local_file_state(path)
        files.append(StoredFile(path, size, mtime_ns, IMPORTED_FINGERPRINT, indexed_ns, origin))
    return files, vectors[keep] / norms[keep, None]


def _local_file_state(path: str) -> tuple[int, int]:
    """(size, mtime_ns) of a local regular file at ``path``; (0, 0) for URLs and absent files."""
    if is_url(path):
        return 0, 0
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return 0, 0
    return (st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else (0, 0)
