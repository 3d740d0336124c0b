"""How faithfully a student reproduces its teacher on the user's library, with no labels.

A photo library has no captions to compute recall against, but the teacher's
own rankings are the reference the student is trained to reproduce. For a fixed
set of generic text queries, and for image-to-image queries sampled from the
library, both models rank the same sample of the library:

- ``recall@10 vs teacher``: the share of the teacher's top 10 that the student's top 10 holds;
- ``Spearman``: the rank correlation of the two models' scores over the whole sample.

Averaged over queries. The teacher side costs no image encoding: its vectors are
the ones its index stored. Every figure goes through the runtime path (bundles,
onnxruntime), the code search runs.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import ClipgrepError
from .eval import SPEED_ITEMS, time_models
from .generic_texts import generic_texts
from .library import indexed_images

TOP_K = 10
# A query set no user text is in: generic queries from a seed that text stage 1's corpus does not use.
_QUERY_SEED = 1


@dataclass(frozen=True)
class FidelityReport:
    teacher: str
    student: str
    n_images: int                  # library sample both models rank
    n_text_queries: int
    n_image_queries: int
    text_recall_at_10: float       # mean share of the teacher's top 10 in the student's top 10
    text_spearman: float
    image_recall_at_10: float
    image_spearman: float
    teacher_bytes: int
    student_bytes: int
    teacher_image_ms_b16: float
    student_image_ms_b16: float
    teacher_text_ms_b1: float
    student_text_ms_b1: float

    def figures(self) -> dict[str, Any]:
        return {**asdict(self), "size_ratio": self.student_bytes / self.teacher_bytes,
                "image_speedup_b16": self.teacher_image_ms_b16 / self.student_image_ms_b16,
                "text_speedup_b1": self.teacher_text_ms_b1 / self.student_text_ms_b1}


def overlap_at_k(reference: np.ndarray, candidate: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """Per row (query): the share of ``reference``'s top ``k`` columns found in ``candidate``'s top ``k``."""
    k = min(k, reference.shape[1])
    top_ref = np.argpartition(-reference, k - 1, axis=1)[:, :k]
    top_cand = np.argpartition(-candidate, k - 1, axis=1)[:, :k]
    hits = (top_ref[:, :, None] == top_cand[:, None, :]).any(axis=2).sum(axis=1)
    return hits / k


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row: Spearman's rank correlation of ``a[i]`` and ``b[i]`` (scores are floats: ties are rare
    and broken by position)."""
    ranks_a = np.argsort(np.argsort(a, axis=1), axis=1).astype(np.float64)
    ranks_b = np.argsort(np.argsort(b, axis=1), axis=1).astype(np.float64)
    ranks_a -= ranks_a.mean(axis=1, keepdims=True)
    ranks_b -= ranks_b.mean(axis=1, keepdims=True)
    denominator = np.sqrt((ranks_a ** 2).sum(axis=1) * (ranks_b ** 2).sum(axis=1))
    return (ranks_a * ranks_b).sum(axis=1) / np.maximum(denominator, 1e-12)


def fidelity(teacher_model: str, student_model: str, *, sample: int = 2000, text_queries: int = 200,
             image_queries: int = 100, seed: int = 0, speed_repeats: int = 3,
             on_progress: Callable[[str], None] | None = None) -> FidelityReport:
    """Compare ``student_model`` with ``teacher_model`` on (a sample of) the teacher's index.

    >>> fidelity("vit-b-32", "my-student").text_recall_at_10  # doctest: +SKIP
    0.83
    """
    from ..models import load_model

    step = on_progress or (lambda _: None)
    indexed = indexed_images(teacher_model)
    student = load_model(student_model, auto_install=False)
    if sample < 2 or text_queries < 1 or image_queries < 1:
        raise ClipgrepError("the fidelity sample needs at least 2 images and 1 query of each kind",
                            "raise the sample and query counts")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(indexed.paths), min(sample, len(indexed.paths)), replace=False))
    paths = [str(indexed.paths[r]) for r in rows]
    image_encoder = student.image_encoder()
    step(f"encoding {len(paths)} library images with {student_model}")
    kept, student_images, pixels = _encode_library(paths, image_encoder)
    teacher_images = indexed.vectors[rows[kept]]

    queries = generic_texts(text_queries, seed=_QUERY_SEED)
    teacher_text, student_text = indexed.bundle.text_encoder(), student.text_encoder()
    step(f"ranking with {len(queries)} text queries")
    text_t = teacher_text.encode(queries) @ teacher_images.T
    text_s = student_text.encode(queries) @ student_images.T

    picks = rng.choice(len(kept), min(image_queries, len(kept)), replace=False)
    step(f"ranking with {len(picks)} image queries")
    image_t = _without_self(teacher_images[picks] @ teacher_images.T, picks)
    image_s = _without_self(student_images[picks] @ student_images.T, picks)

    speed_texts = [queries[i % len(queries)] for i in range(SPEED_ITEMS)]
    teacher_timing, student_timing = time_models(
        [indexed.bundle.image_encoder(), image_encoder], [teacher_text, student_text], [pixels, pixels],
        speed_texts, speed_repeats, step)
    return FidelityReport(
        teacher=teacher_model, student=student_model, n_images=len(kept), n_text_queries=len(queries),
        n_image_queries=len(picks),
        text_recall_at_10=float(overlap_at_k(text_t, text_s).mean()), text_spearman=float(spearman(text_t, text_s).mean()),
        image_recall_at_10=float(overlap_at_k(image_t, image_s).mean()),
        image_spearman=float(spearman(image_t, image_s).mean()),
        teacher_bytes=indexed.bundle.size_bytes(), student_bytes=student.size_bytes(),
        teacher_image_ms_b16=teacher_timing["image_ms_b16"], student_image_ms_b16=student_timing["image_ms_b16"],
        teacher_text_ms_b1=teacher_timing["text_ms_b1"], student_text_ms_b1=student_timing["text_ms_b1"])


def _without_self(scores: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """Each query row without the query image's own column: an image is its own best match under
    both models, and ranking it would flatter every student."""
    keep = np.ones(scores.shape, dtype=bool)
    keep[np.arange(len(picks)), picks] = False
    return scores[keep].reshape(len(picks), scores.shape[1] - 1)


def _encode_library(paths: Sequence[str], encoder: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kept row numbers, student embeddings of those rows, SPEED_ITEMS pixels for timing)."""
    kept: list[int] = []
    parts: list[np.ndarray] = []
    timing: list[np.ndarray] = []
    for ids, batch in _decoded_batches(paths, encoder):
        kept.extend(ids)
        parts.append(encoder.encode_pixels(batch))
        timing.extend(batch[:SPEED_ITEMS - len(timing)])
    if len(kept) < 2:
        raise ClipgrepError("fewer than 2 library images could be decoded", "bring the index up to date: "
                                                                           "clipgrep index")
    pixels = np.stack([timing[i % len(timing)] for i in range(SPEED_ITEMS)])
    return np.array(kept), np.concatenate(parts), pixels


def _decoded_batches(paths: Sequence[str], encoder: Any) -> Iterator[tuple[list[int], np.ndarray]]:
    """Batches of (row numbers, pixels); a file that no longer decodes is left out of both models' sample."""
    from ..index.decode import decode_images

    decoded = decode_images(paths, encoder.config)
    ids: list[int] = []
    batch: list[np.ndarray] = []
    with contextlib.closing(decoded):
        for result in decoded:
            if result.pixels is None:
                continue
            ids.append(result.index)
            batch.append(result.pixels)
            if len(batch) == encoder.batch_size:
                yield ids, np.stack(batch)
                ids, batch = [], []
    if batch:
        yield ids, np.stack(batch)
