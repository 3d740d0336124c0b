"""Approximate search above the exact threshold (clipgrep.ann): recall, --under and --threshold
meaning, a build killed half-way, and what status says."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clipgrep import ann
from clipgrep.ann import EXACT_MAX_ROWS_ENV, approximate_index, build_ivf, ensure_ivf, load_ivf, search_mode
from clipgrep.paths import snapshot_dir
from clipgrep.ranking import rank
from clipgrep.snapshot import Snapshot, read_snapshot, write_snapshot

from . import test_index
from .test_index import REPO_ROOT, cli, index

bundle_source, bundle, photos = test_index.bundle_source, test_index.bundle, test_index.photos

ROWS, DIM = 20_000, 128
EXACT_MAX = 2_000  # CLIPGREP_EXACT_MAX_ROWS in these tests
ROWS_PER_PARTITION = 50  # 400 partitions, 32 probed: a real approximation at this size


def clustered(n: int, dim: int) -> np.ndarray:
    """Unit vectors in overlapping clusters of ~20 rows around a shared direction (like CLIP's)."""
    rng = np.random.default_rng(0)
    common = rng.standard_normal(dim)
    centres = rng.standard_normal((n // 20, dim)) + common
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rows = centres[rng.integers(len(centres), size=n)] + rng.standard_normal((n, dim)) * (0.5 / np.sqrt(dim))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def path_of(i: int) -> str:
    # /lib/a holds a third of the rows, spread over every cluster; /lib/ab/ is its neighbour by name;
    # /lib/b/<digit>/ are small subtrees.
    folder = ("a", "ab", f"b/{i % 10}")[i % 3]
    return f"/lib/{folder}/{i:06d}.jpg"


def built_snapshot(directory: Path) -> tuple[Snapshot, np.ndarray]:
    """ROWS clustered rows written as a snapshot in ``directory`` with its inverted file, and their vectors."""
    vectors = clustered(ROWS, DIM)
    zeros = np.zeros(ROWS, np.int64)
    generation = write_snapshot(directory, [path_of(i) for i in range(ROWS)], vectors, zeros, zeros, zeros,
                                ["00"] * ROWS, {"bundle_id": "test"})
    assert build_ivf(generation, rows_per_partition=ROWS_PER_PARTITION)
    snap = read_snapshot(directory)
    assert snap is not None and snap.generation is not None
    return snap, vectors


@pytest.fixture
def big(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Snapshot, np.ndarray]:
    monkeypatch.setenv(EXACT_MAX_ROWS_ENV, str(EXACT_MAX))
    snap, vectors = built_snapshot(tmp_path / "snap")
    rng = np.random.default_rng(1)  # queries near stored rows, as an image query or a good caption is
    queries = vectors[rng.choice(ROWS, 60)] + rng.standard_normal((60, DIM)).astype(np.float32) * (0.3 / np.sqrt(DIM))
    return snap, queries / np.linalg.norm(queries, axis=1, keepdims=True)


def exact(snap: Snapshot, query: np.ndarray, k: int | None, rows: np.ndarray | None = None,
          threshold: float | None = None) -> list[str]:
    """Brute force in numpy, independent of rank()."""
    rows = np.arange(len(snap)) if rows is None else rows
    scores = np.asarray(snap.vectors[rows]) @ query
    keep = scores >= threshold if threshold is not None else np.ones(len(rows), bool)
    order = np.argsort(-scores[keep], kind="stable")
    return [snap.path(int(i)) for i in rows[keep][order][:k]]


def recall(found: list[list[str]], truth: list[list[str]]) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def test_above_the_threshold_search_is_approximate_with_high_recall(big) -> None:
    snap, queries = big
    ivf = approximate_index(snap, len(snap), 10)
    assert ivf is not None and ivf.nprobe < ivf.partitions  # it does not read every row
    found = [[h.path for h in rank(snap, q, k=10)] for q in queries]
    assert recall(found, [exact(snap, q, 10) for q in queries]) >= 0.95
    hits = rank(snap, queries[0], k=10)
    stored = {h.path: float(snap.vectors[snap.find(h.path)] @ queries[0]) for h in hits}
    assert all(abs(h.score - stored[h.path]) < 1e-5 for h in hits)  # scores are exact, not int8 estimates
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_under_keeps_its_exact_subtree_and_its_recall(big) -> None:
    snap, queries = big
    subtree = snap.subtree("/lib/a")
    assert subtree.stop - subtree.start > EXACT_MAX  # large: searched through the inverted file
    rows = np.arange(subtree.start, subtree.stop)
    found = [[h.path for h in rank(snap, q, k=10, under="/lib/a")] for q in queries]
    assert all(p.startswith("/lib/a/") for f in found for p in f)  # never /lib/ab/
    assert recall(found, [exact(snap, q, 10, rows) for q in queries]) >= 0.95


def test_a_small_subtree_is_searched_exactly(big) -> None:
    snap, queries = big
    # Subtrees of at most EXACT_MAX rows inside a big snapshot: brute force, recall 1.
    small = np.flatnonzero([snap.path(i).startswith("/lib/b/3/") for i in range(len(snap))])
    assert 0 < len(small) <= EXACT_MAX and approximate_index(snap, len(small), 10) is None
    for q in queries[:10]:
        assert [h.path for h in rank(snap, q, k=10, under="/lib/b/3")] == exact(snap, q, 10, small)


def test_threshold_still_means_every_row_at_or_above_it(big) -> None:
    snap, queries = big
    for q in queries[:5]:
        cut = float(np.sort(np.asarray(snap.vectors) @ q)[-300])  # 300 rows score at least this
        everything = rank(snap, q, k=None, threshold=cut)
        assert [h.path for h in everything] == exact(snap, q, None, threshold=cut)
        top = rank(snap, q, k=5, threshold=cut)
        assert [h.path for h in top] == exact(snap, q, 5, threshold=cut)
        assert top.left_out == len(everything) - 5


def test_a_k_beyond_what_the_probed_partitions_hold_is_searched_exactly(big) -> None:
    snap, queries = big
    hits = rank(snap, queries[0], k=3000)  # more than the ~1,600 rows that 32 of 400 partitions hold
    assert len(hits) == 3000 and {h.path for h in hits} == set(exact(snap, queries[0], 3000))


def test_status_says_which_search_is_used(big, tmp_path: Path) -> None:
    snap, _ = big
    assert search_mode(snap).startswith("approximate")
    assert search_mode(read_snapshot(tmp_path / "none")) == "exact"


def republish(snap: Snapshot, vectors: np.ndarray, directory: Path) -> Snapshot:
    """The next generation: ``snap``'s first rows (with ``vectors``), then rows under /lib/new for
    the vectors beyond them, written like publish does."""
    paths = (snap.paths + [f"/lib/new/{i:06d}.jpg" for i in range(len(vectors) - len(snap))])[:len(vectors)]
    zeros = np.zeros(len(paths), np.int64)
    previous = ann.live_training(directory)
    generation = write_snapshot(directory, paths, vectors, zeros, zeros, zeros, ["00"] * len(paths), snap.meta)
    assert build_ivf(generation, previous, rows_per_partition=ROWS_PER_PARTITION)
    grown = read_snapshot(directory)
    assert grown is not None
    return grown


def near(vectors: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = vectors[rng.choice(len(vectors), n)] + rng.standard_normal((n, vectors.shape[1])) * (0.5 / np.sqrt(DIM))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_a_rebuild_after_adding_rows_reuses_the_centroids_and_keeps_its_recall(big, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    snap, queries = big
    assert snap.generation is not None
    trained = {name: (snap.generation / "ivf" / f"{name}.npy").read_bytes() for name in ("centroids", "scales")}

    def no_kmeans(*args: object) -> None:
        raise AssertionError("k-means ran")
    monkeypatch.setattr(ann, "_kmeans", no_kmeans)
    scored: list[int] = []  # rows scored against the centroids
    partition_of = ann.Training.partition_of
    monkeypatch.setattr(ann.Training, "partition_of",
                        lambda self, rows: scored.append(len(rows)) or partition_of(self, rows))
    vectors = np.array(snap.vectors)
    vectors[:50] = near(vectors, 50, seed=4)  # 50 files changed
    extra = near(vectors, ROWS // 100, seed=2)  # and 1% more rows, in the same clusters
    grown = republish(snap, np.concatenate([vectors, extra]), tmp_path / "snap")
    assert sum(scored) == 50 + len(extra)  # the unchanged rows kept their partitions
    assert grown.generation is not None and grown.generation != snap.generation
    assert {name: (grown.generation / "ivf" / f"{name}.npy").read_bytes() for name in trained} == trained
    ivf = approximate_index(grown, len(grown), 10)
    assert ivf is not None and ivf.trained_rows == ROWS and len(ivf.rows) == len(grown)
    queries = np.concatenate([queries, near(extra, 20, seed=3)])  # some near the new rows
    found = [[h.path for h in rank(grown, q, k=10)] for q in queries]
    assert recall(found, [exact(grown, q, 10) for q in queries]) >= 0.95


@pytest.mark.parametrize("rows", [int(ROWS * ann.REUSE_GROWTH) + 1, int(ROWS / ann.REUSE_GROWTH) - 1])
def test_a_library_grown_or_shrunk_past_the_bound_is_trained_afresh(big, tmp_path: Path, rows: int,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    snap, _ = big
    kmeans_runs: list[int] = []
    train = ann._train
    monkeypatch.setattr(ann, "_train", lambda *args: kmeans_runs.append(len(args[0])) or train(*args))
    vectors = np.asarray(snap.vectors)
    vectors = np.concatenate([vectors, near(vectors, rows - ROWS, seed=2)]) if rows > ROWS else vectors[:rows]
    grown = republish(snap, vectors, tmp_path / "snap")
    ivf = approximate_index(grown, len(grown), 10)
    assert kmeans_runs == [len(grown)] and ivf is not None and ivf.trained_rows == len(grown)
    assert ivf.partitions == len(grown) // ROWS_PER_PARTITION


def test_past_flat_max_partitions_the_build_is_two_level_and_never_scores_every_centroid(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EXACT_MAX_ROWS_ENV, str(EXACT_MAX))
    monkeypatch.setattr(ann, "FLAT_MAX_PARTITIONS", 16)  # 400 partitions: 20 coarse cells of ~20
    widest: list[int] = []  # centroids scored per call, build and rebuild
    for name in ("_nearest", "_top"):
        scorer = getattr(ann, name)
        monkeypatch.setattr(ann, name, lambda rows, centroids, *k, f=scorer: widest.append(len(centroids))
                            or f(rows, centroids, *k))
    snap, vectors = built_snapshot(tmp_path / "snap")
    assert snap.generation is not None
    coarse, cells = (np.load(snap.generation / "ivf" / f"{name}.npy") for name in ("coarse", "cells"))
    # Each cell gets its share of the 400 partitions, rounded: one more or less per cell at most.
    assert len(coarse) == 20 and cells[0] == 0 and abs(cells[-1] - ROWS // ROWS_PER_PARTITION) <= 20
    assert 0 < max(widest) < ROWS // ROWS_PER_PARTITION  # never a flat assignment over all 400
    queries = near(vectors, 60, seed=1)
    found = [[h.path for h in rank(snap, q, k=10)] for q in queries]
    assert recall(found, [exact(snap, q, 10) for q in queries]) >= 0.95
    # The next generation reuses both levels: its new rows are assigned through the coarse cells too.
    previous = ann.live_training(tmp_path / "snap")
    assert previous is not None and np.array_equal(previous.coarse, coarse)
    extra = near(vectors, ROWS // 100, seed=2)
    grown = republish(snap, np.concatenate([vectors, extra]), tmp_path / "snap")
    assert grown.generation is not None
    assert np.array_equal(np.load(grown.generation / "ivf" / "cells.npy"), cells)
    queries = np.concatenate([queries, near(extra, 20, seed=3)])
    found = [[h.path for h in rank(grown, q, k=10)] for q in queries]
    assert recall(found, [exact(grown, q, 10) for q in queries]) >= 0.95


def test_each_index_run_that_writes_reuses_the_previous_inverted_file(bundle, photos: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EXACT_MAX_ROWS_ENV, "1")
    index(photos, bundle)
    first = read_snapshot(snapshot_dir(bundle.index_id))
    assert first is not None and first.generation is not None
    centroids = (first.generation / "ivf" / "centroids.npy").read_bytes()
    monkeypatch.setattr(ann, "_kmeans", lambda *args: pytest.fail("k-means ran"))
    test_index.write_image(photos / "yellow.png", test_index.YELLOW)
    assert index(photos, bundle).rows == 4  # a new generation, built from the first one's centroids
    second = read_snapshot(snapshot_dir(bundle.index_id))
    assert second is not None and second.generation not in (None, first.generation)
    assert (second.generation / "ivf" / "centroids.npy").read_bytes() == centroids
    assert search_mode(second).startswith("approximate")


KILLED_BUILD = """
import sys, time
from pathlib import Path
import clipgrep.ann as ann
def stall(path):  # everything is written, nothing renamed yet: hang here until killed
    print("stalled", flush=True)
    time.sleep(600)
ann.fsync_path = stall
ann.build_ivf(Path(sys.argv[1]), rows_per_partition=50)
"""


def test_a_build_killed_half_way_leaves_search_exact_and_the_next_run_completes_it(big, tmp_path: Path) -> None:
    snap, queries = big
    assert snap.generation is not None
    generation = snap.generation
    ivf_dir = generation / "ivf"
    os.rename(ivf_dir, tmp_path / "old-ivf")  # as if this generation had just been published
    child = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(generation)], stdout=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert child.stdout is not None and child.stdout.readline() == b"stalled\n"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert [p.name for p in generation.glob(".ivf-*")]  # the half-built inverted file is there, unused
    snap = read_snapshot(generation.parent)
    assert snap is not None and load_ivf(snap.generation, len(snap), DIM) is None
    assert search_mode(snap) == "exact"
    for q in queries[:5]:
        assert [h.path for h in rank(snap, q, k=10)] == exact(snap, q, 10)
    assert ensure_ivf(generation.parent)  # what the next index run does
    assert not list(generation.glob(".ivf-*")) and search_mode(read_snapshot(generation.parent)).startswith("approx")


def test_index_runs_build_the_inverted_file_and_status_shows_the_mode(bundle, photos: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    index(photos, bundle)
    info = json.loads(cli("status", "--model", "tiny", "--json").stdout)
    assert info["search"] == "exact"  # 3 rows: below the default threshold
    monkeypatch.setenv(EXACT_MAX_ROWS_ENV, "1")
    index(photos, bundle)  # a no-op run still adds the inverted file the snapshot lacks
    info = json.loads(cli("status", "--model", "tiny", "--json").stdout)
    assert info["search"].startswith("approximate")
    status = cli("status", "--model", "tiny")
    assert any(line.startswith("search") and "approximate" in line for line in status.stdout.splitlines())
    found = cli("search", "a photo", "--model", "tiny", "--paths")
    assert found.exit_code == 0 and len(found.stdout.splitlines()) == 3
