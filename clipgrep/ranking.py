"""Search an index snapshot with text and image queries. Never walks the filesystem.

Query terms (syntax in ``query``) combine by weighted sum of their unit
embeddings (then renormalised), so ``"2:golden retriever" --add pool.jpg --sub
fruit`` means 2*text + image - text.

(Not named ``search``: a submodule of that name would replace the public
function ``clipgrep.search`` on the package as soon as it is imported.)
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .errors import ClipgrepError
from .query import QueryTerm, parse_query

if TYPE_CHECKING:
    from .bundle import Bundle
    from .snapshot import Snapshot

DEFAULT_TOP = 10


@dataclass(frozen=True)
class Hit:
    score: float
    path: str


class Hits(list[Hit]):
    """Results, best first; ``left_out`` counts the matches that ``k`` cut off."""

    def __init__(self, hits: Iterable[Hit] = (), left_out: int = 0) -> None:
        super().__init__(hits)
        self.left_out = left_out


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
        from .index.decode import decode_file

        encoder = self.bundle.image_encoder()
        pixels = []
        for path in paths:  # the indexer's decode: regular files, supported formats, size limits
            array, reason = decode_file(str(path), encoder.config)
            if array is None:
                raise ClipgrepError(f"cannot use {path} as a query image: {reason}",
                                    "use another image, e.g. a JPEG or PNG copy of this one")
            pixels.append(array)
        return encoder.encode_pixels(np.stack(pixels))


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
    weights = np.array([t.weight for t in terms])
    weights /= np.abs(weights).max() or 1.0  # only ratios matter; at most 1, float32 sums stay finite
    combined = weights.astype(np.float32) @ np.stack(vectors)  # type: ignore[arg-type]  # every slot is filled
    norm = float(np.linalg.norm(combined))
    if norm < 1e-9:
        raise ClipgrepError("the query terms cancel out", "change the weights or the --sub terms")
    return (combined / norm).astype(np.float32)


def _encode_image_queries(encoder: QueryEncoder, paths: list[Path | None]) -> np.ndarray:
    try:
        return encoder.encode_images([p for p in paths if p is not None])
    except (OSError, ValueError) as e:
        raise ClipgrepError(f"cannot read the query image: {e}", "pass an image file (JPEG, PNG, WebP, ...)") from None


def rank(snapshot: Snapshot, query: np.ndarray, *, k: int | None = DEFAULT_TOP, threshold: float | None = None,
         under: str | None = None) -> Hits:
    """Top ``k`` rows by cosine (all when k is None), optionally within a subtree and above a threshold.

    Exact, except a top-k without threshold over more rows than the snapshot's inverted file
    leaves to brute force (``clipgrep.ann``); its scores are still exact. A threshold means
    every row at or above it, so it always reads every row in range.
    """
    from .ann import approximate_index

    rows = snapshot.subtree(under) if under else slice(0, len(snapshot))
    start, stop = rows.start or 0, rows.stop if rows.stop is not None else len(snapshot)
    if stop <= start:
        return Hits()
    ivf = approximate_index(snapshot, stop - start, k) if k is not None and threshold is None else None
    if ivf is not None and k is not None:
        found, scores = ivf.top(snapshot.vectors, query, k, within=rows if under else None)
        matches = stop - start
    else:
        scores = snapshot.vectors[rows] @ query
        found = np.arange(start, stop)
        if threshold is not None:
            keep = np.flatnonzero(scores >= threshold)
            found, scores = found[keep], scores[keep]
        matches = len(found)
    left_out = 0
    if k is not None and len(found) > k:
        left_out = matches - k
        top = np.argpartition(-scores, k - 1)[:k]
        found, scores = found[top], scores[top]
    order = np.lexsort((found, -scores))  # score desc, then path order
    return Hits((Hit(float(scores[i]), snapshot.path(int(found[i]))) for i in order), left_out)


# A URL or object-store key (s3://bucket/key): imported rows keep such paths as given.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: str) -> bool:
    """Whether ``path`` is a URL or object-store key rather than a local file path.

    >>> is_url("s3://bucket/a.jpg"), is_url("/photos/a.jpg"), is_url("c:/a.jpg")
    (True, False, False)
    """
    return _URL.match(path) is not None


def resolve_under(directory: str) -> str:
    """A --under directory in the form stored paths take: absolute with symlinks kept, as the
    scanner stores them, or a URL prefix as given (imported rows, ``index --from-embeddings``)."""
    return directory if is_url(directory) else os.path.abspath(os.path.expanduser(directory))


def search(queries: Sequence[str], *, add: Sequence[str] = (), sub: Sequence[str] = (), model: str | None = None,
           k: int | None = None, threshold: float | None = None, under: str | None = None,
           encoder: QueryEncoder | None = None, language: str | None = None) -> Hits:
    """Rank indexed images against a query; best first.

    ``k`` caps the results; by default 10, or every result scoring at least
    ``threshold`` when one is given (``threshold=-1`` returns every image).
    ``under`` keeps an existing directory inside (or above) an indexed root.
    ``language`` (``fr``, ``ja``...) is the text queries' language, for models
    whose tokenizer takes one (NLLB); others ignore it.

    >>> for hit in search(["a red bicycle at night"], k=5):  # doctest: +SKIP
    ...     print(f"{hit.score:.3f}\\t{hit.path}")
    """
    from .index.freshness import current_snapshot

    _check_limits(k, threshold)
    bundle = _indexed_bundle(model)
    snapshot = current_snapshot(_snapshot_path(bundle))
    directory = None
    if under is not None:
        directory = resolve_under(under)
        _check_under(under, directory, snapshot)
    if snapshot is None:
        raise ClipgrepError(f"nothing is indexed with model {bundle.name} yet",
                            f"build the index first: clipgrep index DIR --model {bundle.name}")
    if snapshot.vectors.shape[1] != bundle.embed_dim:
        raise ClipgrepError("the index does not match the model", f"rebuild it: clipgrep index --model {bundle.name}")
    terms = parse_query(queries, add, sub)
    vector = query_vector(terms, encoder or BundleQueryEncoder(bundle, language), snapshot)
    limit = result_limit(k, threshold)
    return rank(snapshot, vector, k=limit, threshold=threshold, under=directory)


def result_limit(k: int | None, threshold: float | None) -> int | None:
    """How many results a search returns: ``k``; else every match of a threshold; else 10."""
    return k if k is not None else None if threshold is not None else DEFAULT_TOP


def _check_limits(k: int | None, threshold: float | None) -> None:
    if k is not None and k < 1:
        raise ClipgrepError(f"the number of results must be at least 1, not {k}", "e.g. -k 20")
    if threshold is not None and not -1.0 <= threshold <= 1.0:  # also refuses nan, which matches nothing
        raise ClipgrepError(f"the threshold must be a cosine between -1 and 1, not {threshold}",
                            "e.g. --threshold 0.25")


def _check_under(under: str, directory: str, snapshot: Snapshot | None) -> None:
    """``directory`` (``under`` resolved) must be a directory inside or above some indexed root,
    or a prefix of indexed rows: imported paths need not exist here, nor lie under a root."""
    if snapshot is not None:
        rows = snapshot.subtree(directory)
        if rows.stop > rows.start:
            return
    if not os.path.isdir(directory):
        problem = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise ClipgrepError(f"--under {under} {problem}", "pass a directory that was indexed")
    roots = snapshot.meta.get("roots") if snapshot is not None else None
    if roots and not any(_inside(directory, root) or _inside(root, directory) for root in roots):
        raise ClipgrepError(f"--under {under} is outside every indexed root",
                            f"index it first: clipgrep index {under} (clipgrep status lists the roots)")


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _indexed_bundle(model: str | None) -> Bundle:
    from .errors import ModelNotFound
    from .models import DEFAULT_MODEL, default_model_name, load_model

    name = model or default_model_name()
    try:
        return load_model(name, auto_install=False)
    except ModelNotFound:
        if name != DEFAULT_MODEL:  # only the default model is added by `clipgrep index`; others need `models add`
            raise
        raise ClipgrepError(f"nothing is indexed with model {name} yet",
                            f"build the index first: clipgrep index DIR{'' if model is None else ' --model ' + name}"
                            ) from None


def _snapshot_path(bundle: Bundle) -> Path:
    from .paths import snapshot_dir

    return snapshot_dir(bundle.index_id)
