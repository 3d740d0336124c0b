"""Search an index snapshot with text and image queries. Never walks the filesystem.

Query terms combine by weighted sum of their unit embeddings (then
renormalised), so ``"2:golden retriever" --add pool.jpg --sub fruit`` means
2*text + image - text.
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .errors import ClipgrepError

if TYPE_CHECKING:
    from .bundle import Bundle
    from .snapshot import Snapshot

# "2:dog", "-0.5:cat", "+1.5:sea"; a backslash before the number keeps it literal ("\12:30 train").
_WEIGHT = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+)):(.*)$", re.DOTALL)
TEXT_PREFIX = "text:"


@dataclass(frozen=True)
class QueryTerm:
    weight: float
    text: str | None = None
    image: Path | None = None

    def describe(self) -> str:
        return f"{self.weight:g} x {'image ' + str(self.image) if self.image else repr(self.text)}"


@dataclass(frozen=True)
class Hit:
    score: float
    path: str


class QueryEncoder(Protocol):
    """What search needs from a model; tests pass a fake."""

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...
    def encode_images(self, paths: Sequence[Path]) -> np.ndarray: ...


class BundleQueryEncoder:
    """Encodes queries with a bundle, creating only the sessions a query needs."""

    def __init__(self, bundle: Bundle, language: str | None = None) -> None:
        self.bundle = bundle
        self.language = language

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        encoder = self.bundle.text_encoder(batch_size=len(texts) or 1, language=self.language)
        return encoder.encode(list(texts))

    def encode_images(self, paths: Sequence[Path]) -> np.ndarray:
        return self.bundle.image_encoder().encode_files(list(paths))


def parse_term(raw: str, sign: float = 1.0) -> QueryTerm:
    """One query term: optional ``WEIGHT:`` prefix, then an image path or text.

    An existing file is an image query; prefix ``text:`` to search for text that
    happens to name a file.
    """
    weight = 1.0
    match = _WEIGHT.match(raw)
    if match:
        weight, raw = float(match.group(1)), match.group(2)
    elif raw.startswith("\\"):
        raw = raw[1:]
    weight *= sign
    if raw.startswith(TEXT_PREFIX):
        return QueryTerm(weight, text=raw[len(TEXT_PREFIX):])
    candidate = Path(raw).expanduser()
    if raw and candidate.is_file():
        return QueryTerm(weight, image=Path(os.path.abspath(candidate)))  # abspath, as the scanner stores paths
    return QueryTerm(weight, text=raw)


def parse_query(queries: Sequence[str], add: Sequence[str] = (), sub: Sequence[str] = ()) -> list[QueryTerm]:
    terms = [parse_term(q) for q in queries] + [parse_term(q) for q in add] + [parse_term(q, -1.0) for q in sub]
    if not terms:
        raise ClipgrepError("no query given", 'pass some text, e.g. clipgrep search "a red bicycle"')
    if not any(t.weight for t in terms):
        raise ClipgrepError("all query weights are zero", "give at least one term a non-zero weight")
    return terms


def query_vector(terms: Sequence[QueryTerm], encoder: QueryEncoder, snapshot: Snapshot | None = None) -> np.ndarray:
    """The normalised weighted sum of the terms' embeddings.

    Image queries that are already indexed reuse their stored vector: no decode, no model.
    """
    vectors: list[np.ndarray | None] = [None] * len(terms)
    texts = [i for i, t in enumerate(terms) if t.text is not None]
    images = [i for i, t in enumerate(terms) if t.image is not None]
    if snapshot is not None:
        for i in images:
            vectors[i] = snapshot.vector_for(str(terms[i].image))
    if texts:
        for i, v in zip(texts, encoder.encode_texts([terms[i].text or "" for i in texts])):
            vectors[i] = v
    pending = [i for i in images if vectors[i] is None]
    if pending:
        for i, v in zip(pending, _encode_image_queries(encoder, [terms[i].image for i in pending])):
            vectors[i] = v
    combined = sum(t.weight * v for t, v in zip(terms, vectors))  # type: ignore[operator]
    norm = float(np.linalg.norm(combined))
    if norm < 1e-9:
        raise ClipgrepError("the query terms cancel out", "change the weights or the --sub terms")
    return (combined / norm).astype(np.float32)


def _encode_image_queries(encoder: QueryEncoder, paths: list[Path | None]) -> np.ndarray:
    try:
        return encoder.encode_images([p for p in paths if p is not None])
    except (OSError, ValueError) as e:
        raise ClipgrepError(f"cannot read the query image: {e}", "pass an image file (JPEG, PNG, WebP, ...)") from None


def rank(snapshot: Snapshot, query: np.ndarray, *, k: int | None = 10, threshold: float | None = None,
         under: str | None = None) -> list[Hit]:
    """Top ``k`` rows by cosine (all when k is None), optionally within a subtree and above a threshold."""
    rows = snapshot.subtree(under) if under else slice(0, len(snapshot))
    vectors = snapshot.vectors[rows]
    if len(vectors) == 0:
        return []
    scores = vectors @ query
    if threshold is not None:
        candidates = np.flatnonzero(scores >= threshold)
    else:
        candidates = np.arange(len(scores))
    if k is not None and len(candidates) > k:
        top = np.argpartition(-scores[candidates], k - 1)[:k]
        candidates = candidates[top]
    order = candidates[np.lexsort((candidates, -scores[candidates]))]  # score desc, then path order
    start = rows.start or 0
    return [Hit(float(scores[i]), snapshot.path(start + int(i))) for i in order]


def resolve_under(directory: str) -> str:
    """A --under directory in the form the scanner stores paths (absolute, symlinks kept)."""
    return os.path.abspath(os.path.expanduser(directory))


def search(queries: Sequence[str], *, add: Sequence[str] = (), sub: Sequence[str] = (), model: str | None = None,
           k: int | None = 10, threshold: float | None = None, under: str | None = None,
           encoder: QueryEncoder | None = None, language: str | None = None) -> list[Hit]:
    """Rank indexed images against a query; best first.

    ``language`` (``fr``, ``ja``...) is the text queries' language, for models
    whose tokenizer takes one (NLLB); others ignore it.

    >>> for hit in search(["a red bicycle at night"], k=5):  # doctest: +SKIP
    ...     print(f"{hit.score:.3f}\\t{hit.path}")
    """
    from .snapshot import read_snapshot

    bundle = _indexed_bundle(model)
    snapshot = read_snapshot(_snapshot_path(bundle))
    if snapshot is None:
        raise ClipgrepError(f"nothing is indexed with model {bundle.name} yet",
                            f"build the index first: clipgrep index DIR --model {bundle.name}")
    if snapshot.vectors.shape[1] != bundle.embed_dim:
        raise ClipgrepError("the index does not match the model", f"rebuild it: clipgrep index --model {bundle.name}")
    terms = parse_query(queries, add, sub)
    vector = query_vector(terms, encoder or BundleQueryEncoder(bundle, language), snapshot)
    return rank(snapshot, vector, k=k, threshold=threshold, under=resolve_under(under) if under else None)


def _indexed_bundle(model: str | None) -> Bundle:
    from .errors import ModelNotFound
    from .models import default_model_name, load_model

    name = model or default_model_name()
    try:
        return load_model(name, auto_install=False)
    except ModelNotFound:
        raise ClipgrepError(f"nothing is indexed with model {name} yet",
                            f"build the index first: clipgrep index DIR{'' if model is None else ' --model ' + name}"
                            ) from None


def _snapshot_path(bundle: Bundle) -> Path:
    from .paths import snapshot_dir

    return snapshot_dir(bundle.index_id)
