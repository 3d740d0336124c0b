"""Hard-negative mining against a brute-force loop over every (query, corpus item) pair."""
from __future__ import annotations

import numpy as np
import pytest

from clipgrep.compress.mining import mine_hard_negatives


def brute_force(queries: np.ndarray, corpus: np.ndarray, banned: list[set[int]], k: int) -> np.ndarray:
    """Sort every allowed item by (-similarity, id) one query at a time; pad with -1."""
    rows = []
    for i, query in enumerate(queries):
        scored = [(-float(np.dot(query, item)), j) for j, item in enumerate(corpus) if j not in banned[i]]
        ids = [j for _, j in sorted(scored)[:k]]
        rows.append(ids + [-1] * (k - len(ids)))
    return np.array(rows, dtype=np.int64)


def random_sets(rng: np.random.Generator, n: int, m: int, most: int) -> list[set[int]]:
    return [set(rng.choice(m, size=rng.integers(0, most + 1), replace=False).tolist()) for _ in range(n)]


@pytest.mark.parametrize("chunk", [4, 7, 4096])
def test_matches_brute_force_with_positives_and_exclusions(chunk: int) -> None:
    rng = np.random.default_rng(0)
    queries, corpus = rng.normal(size=(23, 8)), rng.normal(size=(37, 8))
    positives, exclude = random_sets(rng, 23, 37, 3), random_sets(rng, 23, 37, 4)
    got = mine_hard_negatives(queries, corpus, positives, k=5, exclude=exclude, chunk=chunk)
    banned = [p | e for p, e in zip(positives, exclude)]
    assert got.dtype == np.int64 and got.shape == (23, 5)
    np.testing.assert_array_equal(got, brute_force(queries, corpus, banned, 5))


def test_never_returns_a_positive_even_when_it_is_the_nearest() -> None:
    rng = np.random.default_rng(1)
    corpus = rng.normal(size=(20, 6))
    queries = corpus[:10] + 0.01 * rng.normal(size=(10, 6))  # query i's nearest item is its positive i
    got = mine_hard_negatives(queries, corpus, np.arange(10), k=3, chunk=6)
    assert not (got == np.arange(10)[:, None]).any()
    np.testing.assert_array_equal(got, brute_force(queries, corpus, [{i} for i in range(10)], 3))


@pytest.mark.parametrize("chunk", [2, 5, 4096])
def test_ties_go_to_the_lower_corpus_id(chunk: int) -> None:
    # Small integer vectors give exact, heavily tied dot products (duplicate rows included).
    rng = np.random.default_rng(2)
    base = rng.integers(-1, 2, size=(6, 3))
    corpus = np.concatenate([base, base, base[::-1]]).astype(np.float32)
    queries = rng.integers(-1, 2, size=(9, 3)).astype(np.float32)
    positives = random_sets(rng, 9, 18, 2)
    got = mine_hard_negatives(queries, corpus, positives, k=7, chunk=chunk)
    np.testing.assert_array_equal(got, brute_force(queries, corpus, positives, 7))


def test_pads_with_minus_one_when_too_few_candidates() -> None:
    rng = np.random.default_rng(3)
    queries, corpus = rng.normal(size=(3, 4)), rng.normal(size=(6, 4))
    positives = np.array([[0, 1], [2, -1], [-1, -1]])  # padded array form
    exclude = [{5}, set(), {0, 1, 2, 3}]
    got = mine_hard_negatives(queries, corpus, positives, k=5, exclude=exclude, chunk=4)
    np.testing.assert_array_equal((got == -1).sum(axis=1), [2, 0, 3])
    banned = [{0, 1, 5}, {2}, {0, 1, 2, 3}]
    np.testing.assert_array_equal(got, brute_force(queries, corpus, banned, 5))


def test_rejects_bad_inputs() -> None:
    q, c = np.zeros((2, 4)), np.zeros((3, 4))
    with pytest.raises(ValueError):
        mine_hard_negatives(q, np.zeros((3, 5)), [set(), set()], k=1)
    with pytest.raises(ValueError):
        mine_hard_negatives(q, c, [set()], k=1)
    with pytest.raises(ValueError):
        mine_hard_negatives(q, c, [{3}, set()], k=1)
    with pytest.raises(ValueError):
        mine_hard_negatives(q, c, [set(), set()], k=0)
