"""Distilling on the user's own library: the index already holds the teacher's image embeddings.

``clipgrep index --model TEACHER`` stored the teacher's embedding of every
indexed photo; stage 1's image targets are exactly those embeddings, so
``--images-from-index`` reads them from the search snapshot instead of running
the teacher over the library again (on a CPU that forward pass is most of the
cost of stage 1). Rows whose file changed or vanished since it was indexed are
left out: their stored vector no longer describes the file.

The index must have been made by the teacher itself. A bundle is an ONNX export
of a model, the teacher a torch model, and neither has a name the other
carries; so identity is checked by behaviour, without an image forward pass: the
bundle's text encoder and the teacher's must agree on probe texts (a different
model disagrees completely; the same one differs by int8 rounding only).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ClipgrepError

if TYPE_CHECKING:
    from ..bundle import Bundle
    from .teacher import Teacher

# int8 bundles pass their conversion gate at min cosine 0.995 against open_clip;
# unrelated models land near 0. The margin covers int8 bundles of larger models.
SAME_MODEL_MIN_COSINE = 0.98
_PROBES = 16


@dataclass(frozen=True)
class IndexedImages:
    """The images of one model's index that still match their files, and their stored vectors."""

    model: str
    bundle: Bundle
    paths: list[Path]
    vectors: np.ndarray  # float32 [N, D], unit length, row i is paths[i]
    stale: int           # indexed rows left out: file changed or gone since indexing


def indexed_images(model: str) -> IndexedImages:
    """Read the snapshot of ``model``'s index; refuse an empty one with one line."""
    from ..index.freshness import current_snapshot
    from ..models import load_model
    from ..paths import snapshot_dir

    bundle = load_model(model, auto_install=False)
    snapshot = current_snapshot(snapshot_dir(bundle.index_id))
    if snapshot is None or len(snapshot) == 0:
        raise ClipgrepError(f"nothing is indexed with model {model}",
                            f"index your photos with the teacher first: clipgrep index DIR --model {model}")
    keep = [row for row in range(len(snapshot))
            if _unchanged(snapshot.path(row), int(snapshot.sizes[row]), int(snapshot.mtimes_ns[row]))]
    if len(keep) < 2:
        raise ClipgrepError(f"only {len(keep)} of the {len(snapshot)} images indexed with {model} still match "
                            "their files; stage 1 needs at least 2",
                            f"bring the index up to date: clipgrep index --model {model}")
    vectors = np.asarray(snapshot.vectors[keep], dtype=np.float32)
    return IndexedImages(model, bundle, [Path(snapshot.path(row)) for row in keep], vectors,
                         stale=len(snapshot) - len(keep))


def _unchanged(path: str, size: int, mtime_ns: int) -> bool:
    try:
        stat = os.stat(path)
    except OSError:
        return False
    return (stat.st_size, stat.st_mtime_ns) == (size, mtime_ns)


def check_made_by_teacher(indexed: IndexedImages, teacher: Teacher, teacher_spec: str,
                          probe_texts: Sequence[str]) -> float:
    """The min cosine of bundle vs teacher text embeddings on probe texts; refuses a mismatch."""
    if indexed.bundle.embed_dim != teacher.embed_dim:
        raise _not_the_teacher(indexed, teacher_spec, f"it embeds in {indexed.bundle.embed_dim} dimensions, "
                                                      f"the teacher in {teacher.embed_dim}")
    probes = list(probe_texts[:_PROBES])
    ours = indexed.bundle.text_encoder().encode(probes)
    theirs = teacher.encode_texts(teacher.tokenize(probes)).cpu().numpy()
    cosine = float(np.min(np.sum(ours * theirs, axis=1)))
    if cosine < SAME_MODEL_MIN_COSINE:
        raise _not_the_teacher(indexed, teacher_spec, f"their text embeddings agree only to cosine {cosine:.3f}")
    return cosine


def _not_the_teacher(indexed: IndexedImages, teacher_spec: str, why: str) -> ClipgrepError:
    return ClipgrepError(f"the index of model {indexed.model} was not made by teacher {teacher_spec} ({why})",
                         f"pass the teacher that model {indexed.model} was converted from, or index your "
                         "photos with a bundle of this teacher first")
