"""Retrieval recall@K under the standard caption-image protocol (Flickr30K / MSCOCO).

Ranks are exact and deterministic: items are ordered by descending similarity
and a tie goes to the lower index, as a stable sort would order them. Values
are fractions in [0, 1] (papers print them x100).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def recall_at_k(text_emb: np.ndarray, image_emb: np.ndarray, text_to_image: np.ndarray,
                ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict[str, float]:
    """Text->image and image->text recall@K for captions ``text_emb`` [T, D] and images ``image_emb`` [I, D].

    ``text_to_image[t]`` is the index of caption t's image. Text->image: a caption
    scores a hit when its image is among its top-k images. Image->text: an image
    scores a hit when ANY of its captions is among its top-k captions; images with
    no caption (distractors) are left out of the image->text average.
    Keys: ``"t2i_R@k"`` and ``"i2t_R@k"`` for each k. Similarity matrices are built
    ``chunk`` rows at a time, so memory is O(chunk * max(T, I)).

    Example: ``recall_at_k(text_emb, image_emb, np.repeat(np.arange(1000), 5))["t2i_R@1"]``
    """
    text_to_image = _check_inputs(text_emb, image_emb, text_to_image, ks, chunk)
    t2i_ranks = np.concatenate([
        _ranks_of(text_emb[s:s + chunk] @ image_emb.T, text_to_image[s:s + chunk])
        for s in range(0, len(text_emb), chunk)])
    captioned = np.unique(text_to_image)
    i2t_ranks = np.concatenate([
        _best_caption_ranks(image_emb[captioned[s:s + chunk]] @ text_emb.T, captioned[s:s + chunk], text_to_image)
        for s in range(0, len(captioned), chunk)])
    metrics = {f"t2i_R@{k}": float(np.mean(t2i_ranks < k)) for k in ks}
    metrics.update({f"i2t_R@{k}": float(np.mean(i2t_ranks < k)) for k in ks})
    return metrics


def _ranks_of(sims: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank of column ``targets[r]`` in row r: higher scores first, ties to the lower column."""
    target_sims = np.take_along_axis(sims, targets[:, None], axis=1)
    columns = np.arange(sims.shape[1])
    ahead = (sims > target_sims) | ((sims == target_sims) & (columns < targets[:, None]))
    return ahead.sum(axis=1)


def _best_caption_ranks(sims: np.ndarray, images: np.ndarray, text_to_image: np.ndarray) -> np.ndarray:
    """Rank of each image's best-placed own caption among all captions.

    The best-placed caption is the highest-scoring one, the lowest index on a
    tie (argmax returns the first maximum), which is exactly the caption a
    stable ranking puts first; so the image is a hit at k iff its rank < k.
    """
    own = text_to_image[None, :] == images[:, None]
    best = np.where(own, sims, -np.inf).argmax(axis=1)
    return _ranks_of(sims, best)


def _check_inputs(text_emb: np.ndarray, image_emb: np.ndarray, text_to_image: np.ndarray,
                  ks: Sequence[int], chunk: int) -> np.ndarray:
    text_to_image = np.asarray(text_to_image, dtype=np.int64)
    if text_emb.ndim != 2 or image_emb.ndim != 2 or text_emb.shape[1] != image_emb.shape[1]:
        raise ValueError(f"need text [T, D] and image [I, D] embeddings, got {text_emb.shape}, {image_emb.shape}")
    if text_to_image.shape != (len(text_emb),):
        raise ValueError(f"text_to_image must have shape ({len(text_emb)},), got {text_to_image.shape}")
    if len(text_emb) == 0 or text_to_image.min() < 0 or text_to_image.max() >= len(image_emb):
        raise ValueError(f"need at least one caption, each mapped to an image in [0, {len(image_emb)})")
    if min(ks, default=0) < 1 or chunk < 1:
        raise ValueError(f"ks and chunk must be >= 1, got ks={tuple(ks)}, chunk={chunk}")
    return text_to_image
