"""What the web page shows, without any web code: browse, search, rows by id, folders.

Row ids in URLs are ``store.path_key(path)`` (a 63-bit hash of the path bytes), not snapshot
row numbers: they stay valid when ``clipgrep index`` rewrites the snapshot, and a URL can
name only files the index holds. Before a file is served its (size, mtime_ns) is checked
against the index row (thumbnails.StaleFile), so nothing else can ever be read.
"""
from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ClipgrepError
from ..query import QueryTerm, parse_term
from ..ranking import query_vector, rank, resolve_under
from ..snapshot import POINTER, Snapshot
from ..store import path_key

if TYPE_CHECKING:
    from ..ranking import QueryEncoder

PAGE = 60
# A term starts at the beginning or after whitespace with "+" or "-": "red car -rain +2:night".
_TERM_START = re.compile(r"(?:^|\s)([+-])(?=\S)")


@dataclass(frozen=True)
class Tile:
    """One picture on the page."""

    id: int
    path: str  # may hold surrogate escapes (non-UTF-8 names)
    size: int
    mtime_ns: int
    score: float | None = None

    @property
    def shown_path(self) -> str:
        """The path as text a page can carry: undecodable bytes shown as \\xNN."""
        return os.fsencode(self.path).decode("utf-8", "backslashreplace")

    @property
    def name(self) -> str:
        return os.path.basename(self.shown_path)


@dataclass(frozen=True)
class Request:
    """A page of results: text query and/or a "more like this" row; folder; threshold; offset."""

    q: str = ""
    like: int | None = None
    upload: str | None = None
    under: str = ""
    threshold: float | None = None
    offset: int = 0

    @property
    def is_search(self) -> bool:
        return bool(self.q.strip()) or self.like is not None or self.upload is not None


def parse_web_query(q: str) -> list[QueryTerm]:
    """The search box's syntax: ``+term`` / ``-term`` / ``2:term`` as on the command line."""
    cuts = [(m.start(1), m.group(1)) for m in _TERM_START.finditer(q)]
    segments, start, sign = [], 0, 1.0
    for position, symbol in cuts:
        segments.append((q[start:position], sign))
        start, sign = position + 1, (-1.0 if symbol == "-" else 1.0)
    segments.append((q[start:], sign))
    return [parse_term(text.strip(), s) for text, s in segments if text.strip()]


class IndexedImagesOnly:
    """The page's query encoder: text is encoded, but no file named in a query is ever decoded.

    Indexed images reuse their stored vector before this is asked (search.query_vector).
    """

    def __init__(self, encoder: QueryEncoder) -> None:
        self.encoder = encoder

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.encoder.encode_texts(texts)

    def encode_images(self, paths: Sequence[Path]) -> np.ndarray:
        raise ClipgrepError("the page searches by indexed images only",
                            "drop or paste the picture on the page, or use 'more like this'")


class Generation:
    """One snapshot generation with the lookups the page needs, built on first use."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    @cached_property
    def rows_by_id(self) -> dict[int, int]:
        return {path_key(self.snapshot.raw_path(i)): i for i in range(len(self.snapshot))}

    @cached_property
    def newest_first(self) -> np.ndarray:
        return np.argsort(-np.asarray(self.snapshot.mtimes_ns), kind="stable")

    @cached_property
    def folders(self) -> list[str]:
        return sorted({os.path.dirname(p) for p in self.snapshot.paths})

    def tile(self, row: int, score: float | None = None) -> Tile:
        s = self.snapshot
        raw = s.raw_path(row)
        return Tile(path_key(raw), os.fsdecode(raw), int(s.sizes[row]), int(s.mtimes_ns[row]), score)


class Library:
    """The index as the page sees it: follows new snapshots written by ``clipgrep index``."""

    def __init__(self, snapshot_dir: Path, encoder: QueryEncoder) -> None:
        self.snapshot_dir = snapshot_dir
        self.encoder = IndexedImagesOnly(encoder)
        self._lock = threading.Lock()
        self._pointer: tuple[str | None, int] | None = None  # the snapshot pointer and table version shown
        self._generation: Generation | None = None
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()  # recent text queries
        self.uploads: dict[str, np.ndarray] = {}  # dropped pictures' vectors, by random id

    def current(self) -> Generation:
        from ..index.freshness import current_snapshot, image_table_dir, table_version

        try:
            pointer = (self.snapshot_dir / POINTER).read_text(encoding="utf-8")
        except FileNotFoundError:
            pointer = None
        # A table ahead of the snapshot (a killed index run) is shown as the table holds it.
        seen = (pointer, table_version(image_table_dir(self.snapshot_dir.name)))
        with self._lock:
            if self._generation is None or seen != self._pointer:
                snapshot = current_snapshot(self.snapshot_dir)
                if snapshot is None:
                    raise ClipgrepError("nothing is indexed with this model yet", "run: clipgrep index DIR")
                self._generation, self._pointer = Generation(snapshot), seen
            return self._generation

    def tile(self, row_id: int) -> Tile | None:
        generation = self.current()
        row = generation.rows_by_id.get(row_id)
        return None if row is None else generation.tile(row)

    def folders(self, prefix: str, limit: int = 20) -> list[str]:
        """Indexed folders starting with ``prefix``, for the folder filter's suggestions."""
        import bisect

        folders = self.current().folders
        start = bisect.bisect_left(folders, prefix)
        return [f for f in folders[start:start + limit] if f.startswith(prefix)]

    def page(self, request: Request, size: int = PAGE) -> list[Tile]:
        generation = self.current()
        snapshot = generation.snapshot
        end = request.offset + size
        under = resolve_under(request.under) if request.under.strip() else None
        if not request.is_search:
            rows = snapshot.subtree(under) if under else slice(0, len(snapshot))
            order = generation.newest_first
            if under:
                order = order[(order >= rows.start) & (order < rows.stop)]
            return [generation.tile(int(r)) for r in order[request.offset:end]]
        vector = self._query_vector(request, generation)
        hits = rank(snapshot, vector, k=end, threshold=request.threshold, under=under)[request.offset:]
        # rank returns paths; the rows are found again by binary search (only a page of them).
        return [generation.tile(row, hit.score) for hit in hits if (row := snapshot.find(hit.path)) is not None]

    def _query_vector(self, request: Request, generation: Generation) -> np.ndarray:
        parts = []
        if request.q.strip():
            parts.append(self._text_vector(request.q, generation.snapshot))
        if request.like is not None:
            row = generation.rows_by_id.get(request.like)
            if row is None:
                raise ClipgrepError("that picture is no longer in the index", "search again")
            parts.append(np.asarray(generation.snapshot.vectors[row]))
        if request.upload is not None:
            if request.upload not in self.uploads:
                raise ClipgrepError("that dropped picture is gone (the server restarted)", "drop it again")
            parts.append(self.uploads[request.upload])
        combined = np.sum(parts, axis=0)
        return (combined / max(float(np.linalg.norm(combined)), 1e-9)).astype(np.float32)

    def _text_vector(self, q: str, snapshot: Snapshot) -> np.ndarray:
        # Scrolling asks for the same query again and again: keep the last few vectors.
        if q not in self._vectors:
            terms = parse_web_query(q)
            if not terms:
                raise ClipgrepError("no query given", "type some words")
            self._vectors[q] = query_vector(terms, self.encoder, snapshot)
            while len(self._vectors) > 64:
                self._vectors.popitem(last=False)
        self._vectors.move_to_end(q)
        return self._vectors[q]

    def add_upload(self, data: bytes, suffix: str = "") -> str:
        """Encode a dropped or pasted picture; returns the id its vector is kept under (this run only)."""
        import secrets
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=suffix) as f:
            f.write(data)
            f.flush()
            try:
                vector = self.encoder.encoder.encode_images([Path(f.name)])[0]
            except (OSError, ValueError) as e:
                raise ClipgrepError(f"cannot read the dropped picture: {e}", "drop a JPEG, PNG or WebP") from None
        upload_id = secrets.token_urlsafe(9)
        self.uploads[upload_id] = np.asarray(vector, dtype=np.float32)
        return upload_id
