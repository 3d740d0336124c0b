"""The numpy search snapshot: round trip, subtree ranges, atomic replacement, damage."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from clipgrep.errors import ClipgrepError
from clipgrep.snapshot import POINTER, Snapshot, read_snapshot, write_snapshot

DIM = 4


def write(directory: Path, paths: list[str], marker: float = 0.0, **meta: object) -> np.ndarray:
    """Write rows whose vector i is [marker, i, i, i], so a reader can tell which row it got."""
    n = len(paths)
    vectors = np.stack([np.full(n, marker), *[np.arange(n)] * (DIM - 1)], axis=1).astype(np.float32)
    write_snapshot(directory, paths, vectors, sizes=range(n), mtimes_ns=[10 * i for i in range(n)],
                   indexed_ns=[20 * i for i in range(n)], fingerprints=[f"{i:04x}" for i in range(n)],
                   meta={"bundle_id": "b1", "table_version": 7, **meta})
    return vectors


def row_of(snap: Snapshot, path: str) -> int:
    i = snap.find(path)
    assert i is not None, path
    return i


def test_no_snapshot_yet_reads_as_none(tmp_path: Path) -> None:
    assert read_snapshot(tmp_path / "missing") is None


def test_round_trip_sorts_rows_by_path_bytes_and_keeps_them_aligned(tmp_path: Path) -> None:
    paths = ["/p/c.jpg", "/p/a.jpg", os.fsdecode(b"/p/\xff.jpg"), "/p/b\n.jpg"]
    vectors = write(tmp_path, paths)
    snap = read_snapshot(tmp_path)
    assert snap is not None and len(snap) == 4
    assert snap.paths == sorted(paths, key=os.fsencode)
    assert [snap.path(i) for i in range(4)] == snap.paths
    for original, path in enumerate(paths):
        i = row_of(snap, path)
        np.testing.assert_array_equal(snap.vectors[i], vectors[original])
        assert (snap.sizes[i], snap.mtimes_ns[i], snap.indexed_ns[i]) == (original, 10 * original, 20 * original)
        assert snap.fingerprint(i) == snap.fingerprints[i] == f"{original:04x}"
    assert snap.find("/p/nope.jpg") is None and snap.vector_for("/p/nope.jpg") is None
    np.testing.assert_array_equal(snap.vector_for(paths[2]), vectors[2])
    assert {k: snap.meta[k] for k in ("bundle_id", "table_version", "rows", "embed_dim")} == {
        "bundle_id": "b1", "table_version": 7, "rows": 4, "embed_dim": DIM}
    assert isinstance(snap.vectors, np.memmap)


def test_an_empty_snapshot_round_trips(tmp_path: Path) -> None:
    write_snapshot(tmp_path, [], np.zeros((0, DIM), np.float32), [], [], [], [], {"bundle_id": "b1"})
    snap = read_snapshot(tmp_path)
    assert snap is not None and len(snap) == 0 and snap.paths == [] and snap.vectors.shape == (0, DIM)
    assert snap.subtree("/p") == slice(0, 0) and snap.find("/p") is None


def test_duplicate_paths_are_refused(tmp_path: Path) -> None:
    write(tmp_path, ["/p/a.jpg"])
    live = read_snapshot(tmp_path)
    with pytest.raises(ValueError, match="distinct"):
        write(tmp_path, ["/p/a.jpg", "/p/a.jpg"])
    # The refused generation (and its scratch file of unsorted vectors) is gone; the live one stays.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([POINTER, live.generation.name])


def test_subtree_respects_directory_boundaries(tmp_path: Path) -> None:
    odd = os.fsdecode(b"/a/\xff")
    paths = ["/a/b/x.jpg", "/a/b/y/z.jpg", "/a/bc.jpg", "/a/b.jpg", "/a/ba/q.jpg", "/a/b0.jpg",
             os.fsdecode(b"/a/b/\xfe.jpg"), odd + "/x.jpg", "/z.jpg"]
    write(tmp_path, paths)
    snap = read_snapshot(tmp_path)
    assert snap is not None

    def under(directory: str) -> set[str]:
        return {snap.path(i) for i in range(len(snap))[snap.subtree(directory)]}

    inside_b = {"/a/b/x.jpg", "/a/b/y/z.jpg", os.fsdecode(b"/a/b/\xfe.jpg")}
    assert under("/a/b") == under("/a/b/") == inside_b
    assert under("/a/b/y") == {"/a/b/y/z.jpg"}
    assert under(odd) == {odd + "/x.jpg"}
    assert under("/") == set(paths)
    assert under("/a/b/x.jpg") == under("/nope") == set()


def test_a_reader_keeps_its_generation_while_a_new_one_replaces_it(tmp_path: Path) -> None:
    write(tmp_path, ["/old/a.jpg", "/old/b.jpg"], marker=1.0)
    old = read_snapshot(tmp_path)
    write(tmp_path, ["/new/a.jpg", "/new/b.jpg", "/new/c.jpg"], marker=2.0)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 1  # the old generation is gone
    assert old is not None and old.paths == ["/old/a.jpg", "/old/b.jpg"]
    assert old.vectors[:, 0].tolist() == [1.0, 1.0]  # still mapped after the unlink
    new = read_snapshot(tmp_path)
    assert new is not None and len(new) == 3 and set(new.vectors[:, 0].tolist()) == {2.0}


def test_concurrent_readers_never_mix_generations(tmp_path: Path) -> None:
    write(tmp_path, ["/g0/a.jpg"], marker=0.0)
    done = threading.Event()
    errors: list[str] = []

    def reader() -> None:
        while not done.is_set():
            snap = read_snapshot(tmp_path)
            assert snap is not None
            generation = float(snap.vectors[0, 0])
            if snap.path(0) != f"/g{generation:g}/a.jpg" or len(snap) != generation + 1:
                errors.append(f"{snap.path(0)} with marker {generation}")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for g in range(1, 15):
            write(tmp_path, [f"/g{g}/{c}.jpg" for c in "abcdefghijklmnopq"[: g + 1]], marker=float(g))
            time.sleep(0.002)
    finally:
        done.set()
        thread.join()
    assert errors == []


def test_a_half_written_generation_is_cleaned_up_by_the_next_write(tmp_path: Path) -> None:
    (tmp_path / "g1-999").mkdir(parents=True)  # a writer killed before switching the pointer
    (tmp_path / f".{POINTER}.999.tmp").write_text("g1-999")
    write(tmp_path, ["/p/a.jpg"])
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("g")) == [POINTER]
    assert len(list(tmp_path.iterdir())) == 2


def damage_truncated_vectors(generation: Path) -> None:
    data = (generation / "vectors.npy").read_bytes()
    (generation / "vectors.npy").write_bytes(data[:-5])


def damage_row_count(generation: Path) -> None:
    meta = (generation / "meta.json").read_text().replace('"rows": 3', '"rows": 2')
    (generation / "meta.json").write_text(meta)


def damage_offsets(generation: Path) -> None:
    np.save(generation / "path_offsets.npy", np.array([0, 5, 3, 999], np.int64))


def damage_missing_file(generation: Path) -> None:
    (generation / "sizes.npy").unlink()


def damage_meta_json(generation: Path) -> None:
    (generation / "meta.json").write_text("{not json")


@pytest.mark.parametrize("damage", [damage_truncated_vectors, damage_row_count, damage_offsets,
                                    damage_missing_file, damage_meta_json])
def test_a_damaged_snapshot_says_to_reindex(tmp_path: Path, damage) -> None:
    write(tmp_path, ["/p/a.jpg", "/p/b.jpg", "/p/c.jpg"])
    damage(tmp_path / (tmp_path / POINTER).read_text())
    with pytest.raises(ClipgrepError, match="damaged") as info:
        read_snapshot(tmp_path)
    assert info.value.hint == "run: clipgrep index"


def test_a_pointer_to_nowhere_says_to_reindex(tmp_path: Path) -> None:
    write(tmp_path, ["/p/a.jpg"])
    (tmp_path / POINTER).write_text("g-gone")
    with pytest.raises(ClipgrepError, match="missing"):
        read_snapshot(tmp_path)
    (tmp_path / POINTER).write_text("../../etc")
    with pytest.raises(ClipgrepError, match="damaged"):
        read_snapshot(tmp_path)


def test_reading_a_snapshot_imports_neither_lancedb_nor_pyarrow(tmp_path: Path) -> None:
    write(tmp_path, ["/p/a.jpg"])
    code = ("import sys; from pathlib import Path; from clipgrep.snapshot import read_snapshot; "
            f"assert read_snapshot(Path({str(tmp_path)!r})).path(0) == '/p/a.jpg'; "
            "assert not {'lancedb', 'pyarrow'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(not os.environ.get("CLIPGREP_BENCH"), reason="measurement; set CLIPGREP_BENCH=1")
def test_load_time_for_100k_rows_of_512_dims(tmp_path: Path) -> None:
    n, dim = 100_000, 512
    rng = np.random.default_rng(0)
    paths = [f"/home/u/Pictures/{i % 97:03d}/IMG_{i:07d}.jpg" for i in rng.permutation(n)]
    started = time.perf_counter()
    write_snapshot(tmp_path, paths, rng.random((n, dim), dtype=np.float32), range(n), range(n), range(n),
                   [f"{i:032x}" for i in range(n)], {"bundle_id": "b1"})
    written = time.perf_counter()
    snap = read_snapshot(tmp_path)
    loaded = time.perf_counter()
    assert snap is not None and snap.vectors.shape == (n, dim)
    print(f"\nsnapshot 100k x 512: write {written - started:.2f} s, load {(loaded - written) * 1e3:.1f} ms")
