"""``clipgrep search --table URI``: rank the rows of a table ``index --engine ray`` wrote, through LanceDB.

Queries are parsed and encoded exactly as for the local snapshot (``ranking``), and results
come back as ``ranking.Hits``, so the CLI renders them the same way. Below the table's vector
index (built by the index run past ``RayIndexOptions.vector_index_min_rows``) the search is exact (a flat scan);
with one it is IVF_PQ re-ranked on the exact vectors (``refine_factor``), which measured
recall@10 0.997 on clustered vectors (stack.md section 7).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from .errors import ClipgrepError
from .query import parse_query
from .ranking import (
    BundleQueryEncoder,
    Hit,
    Hits,
    QueryEncoder,
    _check_limits,
    _indexed_bundle,
    query_vector,
    result_limit,
)
from .table_uri import parse_table_uri

NPROBES = 20
REFINE_FACTOR = 10


def search_table(table_uri: str, queries: Sequence[str], *, add: Sequence[str] = (), sub: Sequence[str] = (),
                 model: str | None = None, k: int | None = None, threshold: float | None = None,
                 encoder: QueryEncoder | None = None, language: str | None = None) -> Hits:
    """Rank the table's images against a query, best first (``ranking.search``'s meaning of k and threshold)."""
    from .engines.sharded_table import ShardedTable

    _check_limits(k, threshold)
    table = ShardedTable.existing(parse_table_uri(table_uri))
    bundle = _indexed_bundle(model)
    if table.bundle_id != bundle.index_id or table.embed_dim != bundle.embed_dim:
        raise ClipgrepError(f"{table_uri} was indexed with another model than {bundle.name}",
                            "pass the model it was indexed with: --model NAME")
    vector = query_vector(parse_query(queries, add, sub), encoder or BundleQueryEncoder(bundle, language))
    return rank_table(table.images, vector, k=result_limit(k, threshold), threshold=threshold,
                      indexed=table.has_vector_index())


def rank_table(images: object, query: np.ndarray, *, k: int | None, threshold: float | None, indexed: bool) -> Hits:
    """Top ``k`` rows of a LanceDB table by cosine (all with k None), at or above ``threshold``."""
    search = images.search(query.astype(np.float32), vector_column_name="vector")  # type: ignore[attr-defined]
    search = search.distance_type("cosine").select(["path", "_distance"])
    search = search.nprobes(NPROBES).refine_factor(REFINE_FACTOR) if indexed else search.bypass_vector_index()
    if threshold is not None:  # cosine distance = 1 - score; the margin covers float32 rounding
        search = search.distance_range(upper_bound=1.0 - threshold + 1e-6)
    # Vector queries need a limit: with a threshold, every row may qualify (and left_out counts them).
    limit = images.count_rows() if threshold is not None or k is None else k  # type: ignore[attr-defined]
    rows = search.limit(max(1, limit)).to_arrow().to_pydict()
    found = sorted(((1.0 - float(d), os.fsdecode(p)) for p, d in zip(rows["path"], rows["_distance"])),
                   key=lambda hit: (-hit[0], os.fsencode(hit[1])))
    if threshold is not None:
        found = [hit for hit in found if hit[0] >= threshold]
    left_out = max(0, len(found) - k) if k is not None else 0
    return Hits((Hit(score, path) for score, path in found[:k]), left_out)
