"""Batching for index runs: encoder-sized batches of pixels, bounded LanceDB commits of rows and skip notes."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from .protocol import commit

if TYPE_CHECKING:
    from ..store import IndexStore, Skipped, StoredFile
    from .build import PixelEncoder
    from .scan import FileEntry


class BatchWriter:
    """Groups decoded images into encoder batches and encoded rows into bounded commits.

    A commit happens every ``commit_rows`` rows or ``commit_seconds``, whichever comes first,
    so that a slow run (a big model, a slow disk) keeps its work when it is killed.
    """

    def __init__(self, encoder: PixelEncoder, store: IndexStore, commit_rows: int, commit_seconds: float,
                 indexed_ns: int) -> None:
        self.encoder = encoder
        self.store = store
        self.commit_rows = commit_rows
        self.commit_seconds = commit_seconds
        self.commit_due = time.monotonic() + commit_seconds
        self.indexed_ns = indexed_ns  # a time before the files were read, not after they were encoded
        self.batch: list[tuple[FileEntry, str, np.ndarray]] = []
        self.files: list[StoredFile] = []
        self.vectors: list[np.ndarray] = []
        self.skips: list[Skipped] = []
        self.encoded = 0

    def add(self, entry: FileEntry, fp: str, pixels: np.ndarray) -> list[str]:
        """Queue one image; returns the paths committed by this call (usually none)."""
        self.batch.append((entry, fp, pixels))
        due = time.monotonic() >= self.commit_due
        if len(self.batch) >= self.encoder.batch_size or due:
            self._encode_batch()
        return self._commit() if len(self.files) + len(self.skips) >= self.commit_rows or due else []

    def skip(self, note: Skipped) -> list[str]:
        """Queue a skip note, committed with the next rows; returns the paths committed by this call."""
        self.skips.append(note)
        due = time.monotonic() >= self.commit_due
        return self._commit() if len(self.files) + len(self.skips) >= self.commit_rows or due else []

    def close(self) -> list[str]:
        if self.batch:
            self._encode_batch()
        return self._commit() if self.files or self.skips else []

    def _encode_batch(self) -> None:
        from ..store import StoredFile

        vectors = self.encoder.encode_pixels(np.stack([pixels for _, _, pixels in self.batch]))
        for (entry, fp, _), vector in zip(self.batch, vectors):
            self.files.append(StoredFile(entry.path, entry.size, entry.mtime_ns, fp, self.indexed_ns))
            self.vectors.append(vector)
        self.encoded += len(self.batch)
        self.batch.clear()

    def _commit(self) -> list[str]:
        vectors = np.stack(self.vectors) if self.vectors else np.zeros((0, self.store.embed_dim), np.float32)
        commit("rows", lambda: self.store.upsert(self.files, vectors, self.skips))
        committed = [f.path for f in self.files]
        self.files.clear()
        self.vectors.clear()
        self.skips.clear()
        self.commit_due = time.monotonic() + self.commit_seconds
        return committed
