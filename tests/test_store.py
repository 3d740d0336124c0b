"""IndexStore against a real LanceDB table in a tmp dir (small tables, small vectors)."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from clipgrep.engines.sharded_table import _pq_sub_vectors
from clipgrep.errors import ClipgrepError
from clipgrep.store import (
    IndexStore,
    StoredFile,
    TableRows,
    list_bundle_ids,
    path_key,
)

DIM = 8
# Names that break naive SQL quoting, LIKE patterns, line-based formats and UTF-8 decoding.
AWKWARD = [
    os.fsdecode(b"/p/latin1-\xe9t\xe9.jpg"),  # not UTF-8: surrogate escapes
    "/p/new\nline.jpg",
    "/p/it's \"quoted\".jpg",
    "/p/100%_done.jpg",
    "/p/back\\slash.jpg",
    "/p/ünïcødé 🐱.jpg",
    "/p/a) OR 1=1 --.jpg",
]


def stored(path: str, n: int = 1, fingerprint: str = "ab") -> StoredFile:
    return StoredFile(path, size=n, mtime_ns=10 * n, fingerprint=fingerprint, indexed_ns=20 * n)


def unit_rows(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((count, DIM), dtype=np.float32)


@pytest.fixture
def store(tmp_path: Path) -> IndexStore:
    return IndexStore(tmp_path / "index", "b1", DIM)


def test_a_new_store_is_empty_and_creates_nothing(store: IndexStore) -> None:
    assert not store.exists()
    assert (store.files(), store.vectors(["/x"]), store.count(), store.version()) == ({}, {}, 0, 0)
    store.delete(["/x"])
    store.maintain()
    assert store.snapshot_rows().vectors.shape == (0, DIM)
    assert list_bundle_ids(store.directory) == []


def test_upsert_inserts_replaces_and_delete_removes(store: IndexStore) -> None:
    store.upsert([stored("/p/a.jpg"), stored("/p/b.jpg")], unit_rows(2))
    store.upsert([stored("/p/b.jpg", 5, "cd"), stored("/p/c.jpg")], unit_rows(2, seed=1))
    assert store.exists() and store.count() == 3
    assert store.files()["/p/b.jpg"] == stored("/p/b.jpg", 5, "cd")
    np.testing.assert_array_equal(store.vectors(["/p/b.jpg"])["/p/b.jpg"], unit_rows(2, seed=1)[0])
    store.delete(["/p/a.jpg", "/p/not-indexed.jpg"])
    assert sorted(store.files()) == ["/p/b.jpg", "/p/c.jpg"]
    assert list_bundle_ids(store.directory) == ["b1"]


def test_a_repeated_path_in_one_upsert_keeps_the_last(store: IndexStore) -> None:
    vectors = unit_rows(3)
    store.upsert([stored("/p/a.jpg", 1), stored("/p/b.jpg"), stored("/p/a.jpg", 2)], vectors)
    assert store.count() == 2
    assert store.files()["/p/a.jpg"].size == 2
    np.testing.assert_array_equal(store.vectors(["/p/a.jpg"])["/p/a.jpg"], vectors[2])


def test_upsert_rejects_vectors_of_the_wrong_shape(store: IndexStore) -> None:
    with pytest.raises(ValueError, match="shape"):
        store.upsert([stored("/p/a.jpg")], np.zeros((1, DIM + 1), np.float32))


def test_awkward_paths_round_trip(store: IndexStore) -> None:
    vectors = unit_rows(len(AWKWARD))
    store.upsert([stored(p, i) for i, p in enumerate(AWKWARD)], vectors)
    assert store.files() == {p: stored(p, i) for i, p in enumerate(AWKWARD)}
    found = store.vectors(AWKWARD[::-1])
    for i, p in enumerate(AWKWARD):
        np.testing.assert_array_equal(found[p], vectors[i])
    assert sorted(store.snapshot_rows().paths) == sorted(os.fsencode(p) for p in AWKWARD)
    store.delete(AWKWARD[:3])
    assert set(store.files()) == set(AWKWARD[3:])


def test_path_key_is_a_stable_non_negative_int64() -> None:
    keys = {path_key(p) for p in AWKWARD}
    assert len(keys) == len(AWKWARD) and all(0 <= k < 2**63 for k in keys)
    assert path_key(AWKWARD[0]) == path_key(os.fsencode(AWKWARD[0]))


def test_deleting_10k_paths_is_one_commit(tmp_path: Path) -> None:
    store = IndexStore(tmp_path, "b1", 2)
    paths = [f"/p/{i}.jpg" for i in range(10_500)]
    store.upsert([stored(p) for p in paths], np.ones((len(paths), 2), np.float32))
    version = store.version()
    store.delete(paths[:10_000])
    assert (store.count(), store.version()) == (500, version + 1)


def test_snapshot_rows_are_column_wise_and_aligned(store: IndexStore) -> None:
    vectors = unit_rows(3)
    store.upsert([stored(f"/p/{i}.jpg", i, f"f{i}") for i in range(3)], vectors)
    rows = store.snapshot_rows()
    for row, raw in enumerate(rows.paths):
        i = int(raw.decode()[3])
        np.testing.assert_array_equal(rows.vectors[row], vectors[i])
        assert (rows.sizes[row], rows.mtimes_ns[row], rows.indexed_ns[row], rows.fingerprints[row]) == (
            i, 10 * i, 20 * i, f"f{i}")


def test_maintain_prunes_versions_and_keeps_the_data(store: IndexStore) -> None:
    for i in range(6):
        store.upsert([stored(f"/p/{i}.jpg")], unit_rows(1, seed=i))
    store.delete(["/p/0.jpg"])
    assert len(store._open().list_versions()) >= 7
    store.maintain()
    assert len(store._open().list_versions()) == 1
    assert sorted(store.files()) == [f"/p/{i}.jpg" for i in range(1, 6)]
    np.testing.assert_array_equal(store.vectors(["/p/3.jpg"])["/p/3.jpg"], unit_rows(1, seed=3)[0])


def test_maintain_also_prunes_the_roots_and_runs_tables(store: IndexStore) -> None:
    import lancedb

    from clipgrep.index.freshness import table_version
    from clipgrep.store import (
        ROOTS_TABLE,
        RUNS_TABLE,
        Tracked,
        last_run,
        load_tracked,
        record_run,
        save_tracked,
    )

    store.upsert([stored("/p/a.jpg")], unit_rows(1))
    for i in range(5):  # five index runs, each recording itself, the roots changing twice
        record_run(store.directory, "b1", {"run": i})
        if i < 2:
            save_tracked(store.directory, {f"/r{i}": Tracked(f"/r{i}", (), None)}, {})
    db = lancedb.connect(str(store.directory))
    assert [len(db.open_table(t).list_versions()) > 1 for t in (ROOTS_TABLE, RUNS_TABLE)] == [True, True]
    roots_version = table_version(store.directory / f"{ROOTS_TABLE}.lance")
    store.maintain()
    assert [len(db.open_table(t).list_versions()) for t in (ROOTS_TABLE, RUNS_TABLE)] == [1, 1]
    # Overwritten whole on every save, the roots table has nothing to compact: its version, which
    # the roots cache is stamped with, stays.
    assert table_version(store.directory / f"{ROOTS_TABLE}.lance") == roots_version
    assert last_run(store.directory, "b1") == {"run": 4}
    assert load_tracked(store.directory)[0] == {"/r1": Tracked("/r1", (), None)}


def test_cleanup_orphans_removes_temp_files_of_killed_writers(store: IndexStore) -> None:
    store.upsert([stored("/p/a.jpg")], unit_rows(1))
    orphan = store.table_dir / "data" / ".tmpXYZ123"
    orphan.write_bytes(b"x" * 5000)
    assert store.cleanup_orphans() >= 5000
    assert not orphan.exists()
    assert store.count() == 1 and store.cleanup_orphans() == 0


def test_a_table_with_other_dimensions_is_refused(store: IndexStore) -> None:
    store.upsert([stored("/p/a.jpg")], unit_rows(1))
    other = IndexStore(store.directory, "b1", DIM * 2)
    with pytest.raises(ClipgrepError, match="16 dims") as info:
        other.count()
    assert "clipgrep index" in info.value.hint


def test_vector_index_parameters() -> None:  # of the Ray engine's table index
    assert [_pq_sub_vectors(d) for d in (512, 768, 8, 24, 7)] == [32, 48, 1, 3, 1]


WRITER = """
import sys, numpy as np
from pathlib import Path
from clipgrep.store import IndexStore, StoredFile
store = IndexStore(Path(sys.argv[1]), "b1", {dim})
for k in range(10_000):
    store.upsert([StoredFile(f"/batch{{k:05d}}/{{i}}.jpg", i, i, "ab", i) for i in range({batch})],
                 np.full(({batch}, {dim}), k, np.float32))
    print(k, flush=True)
"""


def test_a_writer_killed_mid_upsert_leaves_an_exact_prefix_of_batches(tmp_path: Path) -> None:
    batch = 200
    writer = subprocess.Popen([sys.executable, "-c", WRITER.format(dim=DIM, batch=batch), str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):
            assert writer.stdout.readline(), "the writer died"
        time.sleep(random.uniform(0, 0.03))  # land anywhere inside the next upsert
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    store = IndexStore(tmp_path, "b1", DIM)
    store.cleanup_orphans()
    batches = store.count() // batch
    assert store.count() == batch * batches and batches >= 3
    assert sorted({p.split("/")[1] for p in store.files()}) == [f"batch{k:05d}" for k in range(batches)]
    assert not list(store.table_dir.rglob(".tmp*"))
    store.upsert([stored("/after/kill.jpg")], unit_rows(1))
    assert store.count() == batch * batches + 1


def test_importing_the_store_does_not_import_lancedb() -> None:
    code = "import sys, clipgrep.store; assert 'lancedb' not in sys.modules and 'pyarrow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- skip notes, schema upgrade, and the version read without lancedb -------------------------------


def test_a_skip_note_replaces_a_row_in_one_commit_and_is_never_a_searchable_row(store: IndexStore) -> None:
    from clipgrep.store import Skipped

    store.upsert([stored("/p/a.jpg", 1), stored("/p/b.jpg", 2)], unit_rows(2))
    before = store.version()
    store.upsert([stored("/p/c.jpg", 3)], unit_rows(1), [Skipped("/p/a.jpg", 5, 6, "truncated")])
    assert store.version() == before + 1
    assert sorted(store.files()) == ["/p/b.jpg", "/p/c.jpg"] and store.count() == 2
    assert store.skipped() == {"/p/a.jpg": Skipped("/p/a.jpg", 5, 6, "truncated")}
    assert store.vectors(["/p/a.jpg"]) == {}
    rows, skipped, version = store.export()
    assert sorted(rows.paths) == [b"/p/b.jpg", b"/p/c.jpg"] and list(skipped) == ["/p/a.jpg"]
    assert version == store.version()
    store.upsert([stored("/p/a.jpg", 7)], unit_rows(1))  # it decodes again: the note goes
    assert store.skipped() == {} and store.count() == 3


def test_a_table_of_schema_version_1_is_readable_and_upgraded_in_place(store: IndexStore) -> None:
    store.upsert([stored("/p/a.jpg")], unit_rows(1))
    store._open().drop_columns(["skip_reason", "origin"])  # what clipgrep wrote before
    old = IndexStore(store.directory, "b1", DIM)
    assert list(old.files()) == ["/p/a.jpg"] and old.skipped() == {} and old.count() == 1
    assert old.upgrade() and not old.upgrade()
    assert old._open().schema.names[-2:] == ["skip_reason", "origin"]
    assert old.export()[0].paths == [b"/p/a.jpg"]


def test_the_version_read_from_the_file_system_is_lancedbs(store: IndexStore) -> None:
    """``freshness.table_version`` reads Lance's private layout; this pins it to the public API."""
    from clipgrep.index.freshness import table_version

    assert table_version(store.table_dir) == 0
    for i in range(3):
        store.upsert([stored(f"/p/{i}.jpg", i + 1)], unit_rows(1, seed=i))
        assert table_version(store.table_dir) == store.version() == IndexStore.existing(store.directory, "b1").version()
    store.delete(["/p/0.jpg"])
    store.maintain()  # compaction and pruning of old versions
    assert table_version(store.table_dir) == IndexStore.existing(store.directory, "b1").version() > 3


def test_publish_streams_the_table_into_the_snapshot_an_in_memory_export_gives(monkeypatch) -> None:
    """Batches of 3 rows from the table and 2 vectors per step into path order: the published
    snapshot equals the old whole-table export, non-UTF-8 paths included, skip rows left out."""
    from clipgrep import ann
    from clipgrep.index import protocol
    from clipgrep.index.freshness import snapshot_meta
    from clipgrep.index.roots import RootSet
    from clipgrep.paths import index_dir, snapshot_dir
    from clipgrep.snapshot import read_snapshot, snapshot_in_memory
    from clipgrep.store import Skipped

    store = IndexStore(index_dir(), "b1", DIM)
    paths = [*AWKWARD, *(f"/p/{i:02d}.jpg" for i in range(20))]
    order = np.random.default_rng(1).permutation(len(paths))  # rows reach the table unsorted
    store.upsert([stored(paths[i], int(i) + 1, fingerprint=f"{i:04x}") for i in order], unit_rows(len(paths)),
                 [Skipped(os.fsdecode(b"/p/broken-\xff.jpg"), 1, 2, "truncated"), Skipped("/p/zz.jpg", 3, 4, "empty")])
    batches: list[int] = []
    export_batches = store.export_batches

    def spy(batch_rows: int | None = None) -> Iterator[TableRows]:
        for batch in export_batches(3):
            batches.append(len(batch.paths))
            yield batch

    monkeypatch.setattr(store, "export_batches", spy)
    monkeypatch.setattr(ann, "PERMUTE_ROWS", 2)
    assert protocol.publish(store)[0] == len(paths)
    assert max(batches) == 3 and sum(batches) == len(paths)

    rows, skipped, version = store.export()
    expected = snapshot_in_memory(*rows, meta=snapshot_meta("b1", version, RootSet.load(index_dir()), skipped))
    published = read_snapshot(snapshot_dir("b1"))
    assert published is not None and published.meta["skipped"] == expected.meta["skipped"]
    assert [n for n in os.listdir(published.generation) if n.startswith(".")] == []  # no scratch file left
    for name in ("path_bytes", "path_offsets", "vectors", "sizes", "mtimes_ns", "indexed_ns", "fingerprint_bytes"):
        assert np.array_equal(getattr(published, name), getattr(expected, name)), name
    assert published.paths == sorted(paths, key=os.fsencode) and published.find(AWKWARD[0]) is not None
    assert not store._open().list_indices()  # nothing built a LanceDB vector index either


def test_an_index_run_builds_no_lancedb_vector_index(monkeypatch) -> None:
    """Search reads the snapshot, so finish() spends nothing on an IVF_PQ index for the table
    (727 s at 10^6 rows): compaction and the snapshot only."""
    from clipgrep.index import protocol
    from clipgrep.paths import index_dir

    store = IndexStore(index_dir(), "b1", DIM)
    store.upsert([stored(f"/p/{i}.jpg", i + 1) for i in range(300)], unit_rows(300))
    steps: list[str] = []
    real_commit = protocol.commit
    monkeypatch.setattr(protocol, "commit", lambda step, write: (steps.append(step), real_commit(step, write))[1])
    assert protocol.finish(store, upkeep=True)[0] == 300
    assert steps == ["maintain", "publish"] and not store._open().list_indices()
