"""Corpus-level hard-negative mining for stage 2 (the paper's "pre-computed index").

This is the project's own index machinery: an exact numpy scan over a
pre-computed embedding matrix. The caller embeds the training corpus, calls
``mine_hard_negatives`` and refreshes the result every epoch (or once, for
the static index docs/paper.md §4 reads into "pre-computed"). An exact scan
needs no ANN library and, at 100k x 100k, costs one large matmul per epoch.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from .data import PairSet

IdSets = Sequence[Iterable[int]] | np.ndarray


def mine_hard_negatives(queries: np.ndarray, corpus: np.ndarray, positives: IdSets, k: int,
                        exclude: Sequence[Iterable[int]] | None = None, chunk: int = 4096) -> np.ndarray:
    """Return [N, k] int64 ids of the k corpus rows most similar to each query, minus its positives.

    Similarity is the dot product (cosine for L2-normalised rows). ``positives[i]``
    (a set of corpus ids; or an int array [N] / [N, P] padded with -1) and
    ``exclude[i]`` (e.g. images whose caption is identical to query i's) are never
    returned for query i. Rows are ordered by descending similarity; ties go to the
    lower corpus id, so the result is deterministic. Rows with fewer than k
    candidates are padded with -1.

    Works in ``chunk`` x ``chunk`` tiles, keeping a running top-k per query, so
    memory is O(chunk^2 + N k), never N x M.

    Example: ``neg = mine_hard_negatives(text_emb, image_emb, caption_image_ids, k=16)``
    """
    n, m = _check_shapes(queries, corpus, k, chunk)
    # At least float32, so -inf can mark banned entries (integer inputs become float64).
    dtype = np.result_type(queries.dtype, corpus.dtype, np.float32)
    queries, corpus = np.asarray(queries, dtype=dtype), np.asarray(corpus, dtype=dtype)
    banned_rows, banned_cols = _banned_pairs(positives, exclude, n, m)
    result = np.empty((n, k), dtype=np.int64)
    for q0 in range(0, n, chunk):
        q1 = min(q0 + chunk, n)
        lo, hi = np.searchsorted(banned_rows, [q0, q1])
        block_rows, block_cols = banned_rows[lo:hi] - q0, banned_cols[lo:hi]
        result[q0:q1] = _mine_block(queries[q0:q1], corpus, block_rows, block_cols, k, chunk)
    return result


def _mine_block(queries: np.ndarray, corpus: np.ndarray, banned_rows: np.ndarray, banned_cols: np.ndarray,
                k: int, chunk: int) -> np.ndarray:
    """Top-k for one block of queries, scanning the corpus in tiles and merging as it goes."""
    best_sims = np.full((len(queries), k), -np.inf, dtype=queries.dtype)
    best_ids = np.full((len(queries), k), -1, dtype=np.int64)
    for c0 in range(0, len(corpus), chunk):
        c1 = min(c0 + chunk, len(corpus))
        sims = queries @ corpus[c0:c1].T
        in_tile = (banned_cols >= c0) & (banned_cols < c1)
        sims[banned_rows[in_tile], banned_cols[in_tile] - c0] = -np.inf
        tile_ids = _top_k_columns(sims, k)
        tile_sims = np.take_along_axis(sims, tile_ids, axis=1)
        best_sims, best_ids = _merge(best_sims, best_ids, tile_sims, tile_ids + c0, k)
    return np.where(np.isneginf(best_sims), -1, best_ids)


def _top_k_columns(sims: np.ndarray, k: int) -> np.ndarray:
    """Column ids of the k largest entries per row, ties to the lower column.

    argpartition alone picks an arbitrary member of a tie at the k-th place;
    rows with such a tie (rare on real embeddings) are redone with a stable sort.
    """
    if sims.shape[1] <= k:
        return np.argsort(-sims, axis=1, kind="stable")
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(sims, top, axis=1).min(axis=1, keepdims=True)
    tied = (sims >= kth).sum(axis=1) > k
    if tied.any():
        top[tied] = np.argsort(-sims[tied], axis=1, kind="stable")[:, :k]
    return top


def _merge(sims_a: np.ndarray, ids_a: np.ndarray, sims_b: np.ndarray, ids_b: np.ndarray,
           k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the k best of two candidate lists, by descending similarity then ascending id."""
    sims = np.concatenate([sims_a, sims_b], axis=1)
    ids = np.concatenate([ids_a, ids_b], axis=1)
    order = np.lexsort((ids, -sims), axis=1)[:, :k]
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(ids, order, axis=1)


def _banned_pairs(positives: IdSets, exclude: Sequence[Iterable[int]] | None, n: int,
                  m: int) -> tuple[np.ndarray, np.ndarray]:
    """(query row, corpus id) pairs never to return, sorted by row for slicing per block."""
    if len(positives) != n or (exclude is not None and len(exclude) != n):
        raise ValueError(f"positives and exclude need one entry per query ({n})")
    rows: list[int] = []
    cols: list[int] = []
    for i in range(n):
        ids = set(_id_list(positives[i]))
        if exclude is not None:
            ids.update(int(j) for j in exclude[i])
        rows.extend([i] * len(ids))
        cols.extend(sorted(ids))
    cols_arr = np.asarray(cols, dtype=np.int64)
    if len(cols_arr) and (cols_arr.min() < 0 or cols_arr.max() >= m):
        raise ValueError(f"positive/excluded ids must lie in [0, {m})")
    return np.asarray(rows, dtype=np.int64), cols_arr


def _id_list(entry: Iterable[int] | int | np.integer | np.ndarray) -> list[int]:
    """One query's ids; in array form -1 means "no id" (padding)."""
    if isinstance(entry, (int, np.integer)) or (isinstance(entry, np.ndarray) and entry.ndim == 0):
        return [int(entry)] if int(entry) >= 0 else []
    if isinstance(entry, np.ndarray):
        return [int(j) for j in entry if j >= 0]
    return [int(j) for j in entry]


def _check_shapes(queries: np.ndarray, corpus: np.ndarray, k: int, chunk: int) -> tuple[int, int]:
    if queries.ndim != 2 or corpus.ndim != 2 or queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"need queries [N, D] and corpus [M, D], got {queries.shape} and {corpus.shape}")
    if k < 1 or chunk < 1:
        raise ValueError(f"k and chunk must be >= 1, got k={k}, chunk={chunk}")
    return queries.shape[0], corpus.shape[0]


def mine_caption_negatives(caption_embeddings: np.ndarray, image_embeddings: np.ndarray, pairs: PairSet,
                           caption_ids: np.ndarray, k: int) -> np.ndarray:
    """[len(caption_ids), k] ids of the images of ``pairs`` nearest each caption (-1 pads).

    ``caption_embeddings[i]`` embeds caption ``caption_ids[i]``; ``image_embeddings``
    has one row per image of ``pairs``. Never returned for a caption: its own image,
    and any image that has a caption with exactly the same text (a true match too).

    Example: ``mine_caption_negatives(text_emb[ids], image_bank, train, ids, k=8)``
    """
    caption_ids = np.asarray(caption_ids, dtype=np.int64)
    images_of_text: dict[str, set[int]] = {}
    for text, image in zip(pairs.captions, pairs.caption_image.tolist()):
        images_of_text.setdefault(text, set()).add(image)
    exclude = [images_of_text[pairs.captions[c]] for c in caption_ids.tolist()]
    return mine_hard_negatives(caption_embeddings, image_embeddings, pairs.caption_image[caption_ids], k, exclude)
