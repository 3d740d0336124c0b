"""What an ``index --engine ray`` run has to do: which rows are stale, which files go in which shard.

Pure functions over listings and table rows, so resume and change detection are tested without
Ray. The rules:

- A row is **current** when it describes the file as listed now: same size and ETag for an
  object, same size and mtime_ns for a local file, and that mtime not within the racy window of
  the moment it was indexed (``plan.is_racy``: a file rewritten in the same tick as it was read
  is encoded again, as on the local path).
- Every listed file with no current row (in the image table, or in the skipped table unless
  ``retry_skipped``) is encoded again; every other row of it is stale, and so is every row under
  a source whose file is no longer listed (deleted), and every duplicate of a current row.
- The files to encode are sorted by path bytes and cut into shards of ``shard_size``; a shard's
  id is a hash of its files and their stamps. A shard is committed in one append, so after a
  killed run the committed files are current and the rest fall into the same shards again.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..index.plan import RACY_WINDOW_NS


@dataclass(frozen=True)
class SourceFile:
    """One listed image: a local absolute path or an object URI (``s3://bucket/key``)."""

    path: str
    size: int
    mtime_ns: int
    etag: str = ""  # objects only; a local file is compared by size and mtime


@dataclass(frozen=True)
class RowState:
    """A row of the image table (or, with ``skipped``, of the skipped-files table), without its vector."""

    path: str
    size: int
    mtime_ns: int
    fingerprint: str  # an object's ETag, or a local file's content fingerprint
    indexed_ns: int
    shard: str
    skipped: bool = False


@dataclass(frozen=True)
class Shard:
    id: str
    files: tuple[SourceFile, ...]


@dataclass
class ShardPlan:
    shards: list[Shard] = field(default_factory=list)
    unchanged: int = 0  # listed files with a current row
    skipped_before: int = 0  # listed files skipped by an earlier run and unchanged since
    removed: int = 0  # files under the sources that are gone
    stale: list[RowState] = field(default_factory=list)  # rows to delete before any shard is written

    @property
    def to_encode(self) -> int:
        return sum(len(s.files) for s in self.shards)


def is_current(listed: SourceFile, row: RowState) -> bool:
    if row.size != listed.size:
        return False
    if listed.etag:
        return row.fingerprint == listed.etag
    return row.mtime_ns == listed.mtime_ns and (row.skipped or row.mtime_ns + RACY_WINDOW_NS < row.indexed_ns)


def under_sources(path: str, sources: Sequence[str]) -> bool:
    """Whether ``path`` is one of ``sources`` or inside one (``a/b`` never matches ``a/bc``)."""
    return any(path == s or path.startswith(s.rstrip("/" + os.sep) + ("/" if "://" in s else os.sep))
               for s in sources)


def shard_id(files: Sequence[SourceFile]) -> str:
    digest = hashlib.blake2b(digest_size=8)
    for f in files:
        digest.update(os.fsencode(f.path) + b"\0" + f"{f.size}\0{f.mtime_ns}\0{f.etag}\n".encode())
    return digest.hexdigest()


def make_shard_plan(listed: Iterable[SourceFile], rows: Iterable[RowState], sources: Sequence[str],
                    shard_size: int, *, retry_skipped: bool = False) -> ShardPlan:
    """Compare a listing with the table's rows; see the module docstring for the rules."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    by_path: dict[str, list[RowState]] = {}
    for row in rows:
        by_path.setdefault(row.path, []).append(row)
    plan = ShardPlan()
    to_encode: list[SourceFile] = []
    for f in sorted(listed, key=lambda f: os.fsencode(f.path)):
        found = by_path.pop(f.path, [])
        current = [r for r in found if is_current(f, r) and not (r.skipped and retry_skipped)]
        # One row survives: an image row before a skip record, then (any fixed rule) the greatest shard id.
        keep = max(current, key=lambda r: (not r.skipped, r.shard), default=None)
        plan.stale += [r for r in found if r is not keep]
        if keep is None:
            to_encode.append(f)
        elif keep.skipped:
            plan.skipped_before += 1
        else:
            plan.unchanged += 1
    for path, found in by_path.items():
        if under_sources(path, sources):
            plan.stale += found
            plan.removed += any(not r.skipped for r in found)
    for start in range(0, len(to_encode), shard_size):
        files = tuple(to_encode[start:start + shard_size])
        plan.shards.append(Shard(shard_id(files), files))
    return plan
