"""Kills, signals, concurrent readers and damaged state, against real index, forget and purge runs.

The invariant everywhere: once a run is killed between any two of its write steps (the steps
``protocol.py`` names), search returns exactly what the table holds, before the rerun (a reader
that finds the snapshot stamp behind the table, with no writer alive, reads the table) and
after it (nothing lost, nothing duplicated, the snapshot republished).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clipgrep import models
from clipgrep.cli import app
from clipgrep.errors import ClipgrepError
from clipgrep.index import protocol
from clipgrep.index.forget import forget_root
from clipgrep.index.freshness import current_snapshot, is_current
from clipgrep.index.roots import remembered_roots
from clipgrep.paths import index_dir, index_lock_file, snapshot_dir
from clipgrep.ranking import search
from clipgrep.snapshot import read_snapshot
from clipgrep.store import IndexStore, Skipped, last_run, list_bundle_ids, path_key

from . import test_index
from .fakes import FakeQueryEncoder
from .test_index import BLUE, GREEN, RED, REPO_ROOT, YELLOW, age, index, many_images, wait_for, write_image

bundle_source, bundle = test_index.bundle_source, test_index.bundle  # the fixtures

# --- what search shows against what the table holds ------------------------------------------


def table_state(bundle) -> dict[str, np.ndarray]:
    store = IndexStore(index_dir(), bundle.index_id, bundle.embed_dim)
    rows = store.snapshot_rows()
    paths = [os.fsdecode(p) for p in rows.paths]
    assert len(paths) == len(set(paths)), "duplicate rows in the table"
    return dict(zip(paths, rows.vectors))


def searched_paths(bundle) -> list[str]:
    """Every path search returns (none when nothing was published yet)."""
    if current_snapshot(snapshot_dir(bundle.index_id)) is None:
        return []
    paths = sorted(hit.path for hit in search(["red"], model="tiny", encoder=FakeQueryEncoder(), threshold=-1))
    assert len(paths) == len(set(paths)), "search returned a path twice"
    return paths


def searched(bundle) -> dict[str, np.ndarray]:
    """Every row search can return, with its vector; only while no writer runs."""
    snap = current_snapshot(snapshot_dir(bundle.index_id))
    if snap is None:
        return {}
    assert searched_paths(bundle) == snap.paths
    return {p: np.array(snap.vectors[i]) for i, p in enumerate(snap.paths)}


def assert_search_equals_table(bundle) -> None:
    table, shown = table_state(bundle), searched(bundle)
    assert sorted(shown) == sorted(table)
    for path, vector in table.items():
        np.testing.assert_array_equal(shown[path], vector)


def assert_published(bundle) -> None:
    """The snapshot on disk (not a reader's fallback) shows the table as it is now."""
    assert is_current(read_snapshot(snapshot_dir(bundle.index_id)), bundle.index_id)
    assert_search_equals_table(bundle)


# --- kill -9 between every two write steps ---------------------------------------------------------

INDEX_CALL = """
import sys
from clipgrep.index.build import IndexOptions, update_index
from clipgrep.models import load_model
from tests.fakes import FakeImageEncoder
update_index([sys.argv[1]], bundle=load_model("tiny"), encoder=FakeImageEncoder(),
             options=IndexOptions(workers=0, commit_rows=3))
"""

FORGET_CALL = """
import sys
from clipgrep.index.forget import forget_root
forget_root(sys.argv[1])
"""

PURGE_CALL = """
from clipgrep.models import remove_model
remove_model("tiny", purge=True)
"""


def run_crashing_at(step: str | None, call: str, argument: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``call`` in a fresh interpreter that exits like kill -9 right after the write step ``step``."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop(protocol.CRASH_ENV, None)
    if step is not None:
        env[protocol.CRASH_ENV] = step
    return subprocess.run([sys.executable, "-c", call, *([str(argument)] if argument else [])], check=False,
                          capture_output=True, text=True, timeout=300, env=env)


def crash_at(step: str, call: str, argument: Path | None = None) -> None:
    done = run_crashing_at(step, call, argument)
    assert done.returncode == protocol.CRASH_EXIT, f"step {step!r} was never reached: {done.stderr[-2000:]}"


@pytest.fixture
def changed_library(bundle, tmp_path: Path) -> Path:
    """An index of ``p/keep``, then changes that make an index run of ``p`` take every write step:
    a new root (p replaces p/keep), a racy file that is unchanged, a move (reused vector), a
    delete, new files over several commits, and an indexed file that went bad (its row becomes
    a skip note in the same commit)."""
    root = tmp_path / "p"
    keep = root / "keep"
    age(write_image(keep / "red.png", RED), write_image(keep / "green.png", GREEN),
        write_image(keep / "old.png", (40, 40, 40)))
    write_image(keep / "racy.png", YELLOW)  # mtime = now: stored as racy
    written = time.time()
    index(keep, bundle)
    os.rename(keep / "green.png", keep / "moved green.png")
    (keep / "old.png").unlink()
    for i, colour in enumerate((BLUE, (0, 255, 255), (255, 0, 255), (9, 99, 199), (99, 9, 9))):
        write_image(root / "new" / f"{i}.png", colour)
    (keep / "red.png").write_bytes(b"no longer an image")
    time.sleep(max(0.0, written + 2.2 - time.time()))  # out of the racy window: confirmed unchanged, one upsert
    return root


@pytest.mark.parametrize("step", protocol.INDEX_STEPS)
def test_index_killed_after_any_write_step_shows_the_table_and_a_rerun_finishes(
        bundle, changed_library: Path, step: str) -> None:
    root = changed_library
    crash_at(step, INDEX_CALL, root)
    assert_search_equals_table(bundle)  # before the rerun: a dead writer's commits are shown

    report = index(root, bundle)
    assert_published(bundle)
    keep = root / "keep"
    assert set(table_state(bundle)) == {str(keep / "moved green.png"), str(keep / "racy.png"),
                                        *(str(root / "new" / f"{i}.png") for i in range(5))}
    assert [s.path for s in report.skipped_files] == [str(keep / "red.png")]
    assert remembered_roots(index_dir()) == [str(root)]


@pytest.fixture
def two_roots(bundle, tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    age(write_image(a / "red.png", RED), write_image(a / "green.png", GREEN), write_image(b / "blue.png", BLUE))
    index(a, bundle)
    index(b, bundle)
    (a / "bad.png").write_bytes(b"junk")
    index(a, bundle)  # a skip note under a, which forget drops too
    return a, b


@pytest.mark.parametrize("step", protocol.FORGET_STEPS)
def test_forget_killed_after_any_write_step_shows_the_table_and_a_rerun_finishes(
        bundle, two_roots: tuple[Path, Path], step: str) -> None:
    a, b = two_roots
    crash_at(step, FORGET_CALL, a)
    assert_search_equals_table(bundle)  # never a forgotten image the table no longer holds

    if str(a) in remembered_roots(index_dir()):
        forget_root(str(a))
    else:  # killed after the roots were saved: a rerun says so, and republishes on its way
        with pytest.raises(ClipgrepError, match="is not an indexed root"):
            forget_root(str(a))
    assert_published(bundle)
    assert set(table_state(bundle)) == {str(b / "blue.png")}
    assert IndexStore(index_dir(), bundle.index_id, bundle.embed_dim).skipped() == {}
    assert remembered_roots(index_dir()) == [str(b)]


@pytest.mark.parametrize("step", protocol.PURGE_STEPS)
def test_models_remove_purge_killed_after_any_write_step_shows_the_table_and_a_rerun_finishes(
        bundle, tmp_path: Path, step: str) -> None:
    age(write_image(tmp_path / "a" / "red.png", RED), write_image(tmp_path / "a" / "blue.png", BLUE))
    index(tmp_path / "a", bundle)
    crash_at(step, PURGE_CALL)
    shown = current_snapshot(snapshot_dir(bundle.index_id))
    assert sorted(shown.paths if shown is not None else []) == sorted(table_state(bundle))

    models.remove_model("tiny", purge=True)
    assert list_bundle_ids(index_dir()) == [] and not snapshot_dir(bundle.index_id).exists()
    assert last_run(index_dir(), bundle.index_id) is None
    assert not list(index_dir().glob(f"{protocol.TRASH_PREFIX}*"))


# --- readers facing a snapshot behind its table -------------------------------------------------------


def test_a_reader_shows_the_table_when_a_dead_writer_left_the_snapshot_behind(bundle, tmp_path: Path) -> None:
    age(write_image(tmp_path / "a" / "red.png", RED), write_image(tmp_path / "a" / "blue.png", BLUE))
    index(tmp_path / "a", bundle)
    store = IndexStore(index_dir(), bundle.index_id, bundle.embed_dim)
    store.delete([str(tmp_path / "a" / "red.png")])  # a commit whose writer died before publishing
    index_lock_file().write_text("999999999\n")  # the pid a killed holder leaves: no such process
    assert searched_paths(bundle) == [str(tmp_path / "a" / "blue.png")]

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a live writer: its commits are not published yet, readers keep the last whole snapshot
        index_lock_file().write_text(f"{holder.pid}\n")
        assert len(searched_paths(bundle)) == 2
    finally:
        holder.kill()
        holder.wait()
    assert searched_paths(bundle) == [str(tmp_path / "a" / "blue.png")]


def test_past_the_exact_bound_a_reader_refuses_instead_of_loading_the_whole_table(
        bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clipgrep.ann import EXACT_MAX_ROWS_ENV

    age(write_image(tmp_path / "a" / "red.png", RED), write_image(tmp_path / "a" / "blue.png", BLUE),
        write_image(tmp_path / "a" / "green.png", GREEN))
    index(tmp_path / "a", bundle)
    (tmp_path / "a" / "red.png").unlink()  # a run saw it gone, deleted its row and died before publishing
    IndexStore(index_dir(), bundle.index_id, bundle.embed_dim).delete([str(tmp_path / "a" / "red.png")])
    index_lock_file().write_text("999999999\n")
    monkeypatch.setenv(EXACT_MAX_ROWS_ENV, "1")  # 2 rows left: "too many" to read into memory
    with pytest.raises(ClipgrepError, match="interrupted `clipgrep index`.*run `clipgrep index`"):
        searched_paths(bundle)
    index([], bundle)  # any writer republishes first
    assert sorted(searched_paths(bundle)) == sorted([str(tmp_path / "a" / "blue.png"),
                                                     str(tmp_path / "a" / "green.png")])


SEARCH_CALL = """
import json, sys
from clipgrep.ranking import search
from tests.fakes import FakeQueryEncoder
hits = search(["red"], model="tiny", encoder=FakeQueryEncoder(), threshold=-1)
print(json.dumps({"paths": sorted(h.path for h in hits), "lancedb": "lancedb" in sys.modules}))
"""


def test_search_reads_lancedb_only_when_the_snapshot_is_behind(bundle, tmp_path: Path) -> None:
    import json

    age(write_image(tmp_path / "a" / "red.png", RED), write_image(tmp_path / "a" / "blue.png", BLUE))
    index(tmp_path / "a", bundle)
    done = run_crashing_at(None, SEARCH_CALL)
    assert json.loads(done.stdout) == {"paths": sorted(table_state(bundle)), "lancedb": False}, done.stderr
    IndexStore(index_dir(), bundle.index_id, bundle.embed_dim).delete([str(tmp_path / "a" / "red.png")])
    done = run_crashing_at(None, SEARCH_CALL)  # the lock file names no live process: a dead writer's commit
    assert json.loads(done.stdout) == {"paths": [str(tmp_path / "a" / "blue.png")], "lancedb": True}, done.stderr


def test_a_rerun_of_forget_repairs_the_snapshot_even_when_no_row_is_left_to_delete(bundle, tmp_path: Path) -> None:
    """The old bug: a kill between forget's delete and its snapshot left search showing forgotten
    rows, and a rerun of forget deleted nothing and so fixed nothing."""
    a, b = tmp_path / "a", tmp_path / "b"
    age(write_image(a / "red.png", RED), write_image(b / "blue.png", BLUE))
    index([a, b], bundle)
    store = IndexStore(index_dir(), bundle.index_id, bundle.embed_dim)
    store.delete([str(a / "red.png")])  # what forget leaves when killed after its delete
    assert searched_paths(bundle) == [str(b / "blue.png")]
    forget_root(str(a))
    assert_published(bundle)


# --- old installs: state.json, skipped-<id>.json and DIRTY markers ------------------------------------


@pytest.fixture
def old_install(bundle, tmp_path: Path) -> tuple[Path, Skipped]:
    """An index as clipgrep wrote it before: a table of schema version 1, with state.json,
    skipped-<id>.json and a DIRTY marker beside it. Returns the root and its skip note."""
    import json

    import lancedb

    root = tmp_path / "p"
    age(write_image(root / "red.png", RED), write_image(root / "blue.png", BLUE))
    (root / "bad.png").write_bytes(b"junk")
    age(root / "bad.png")
    index(root, bundle, scan=test_index.ScanOptions(excludes=("raw/",)))
    bad = os.stat(root / "bad.png")
    db = lancedb.connect(str(index_dir()))
    table = db.open_table(f"images_{bundle.index_id}")
    table.delete(f"id = {path_key(str(root / 'bad.png'))}")
    table.drop_columns(["skip_reason", "origin"])
    for name in ("roots", "runs"):
        db.drop_table(name)
    (index_dir() / "roots.json").unlink()
    (index_dir() / "state.json").write_text(json.dumps({
        "roots": {str(root): {"excludes": ["raw/"], "device": os.stat(root).st_dev}}, "files": {},
        "runs": {bundle.index_id: {"finished": "2026-01-01T00:00:00+0000", "rows": 2}}}))
    skipped = {str(root / "bad.png"): [bad.st_size, bad.st_mtime_ns, "not an image"]}
    (index_dir() / f"skipped-{bundle.index_id}.json").write_text(json.dumps(skipped))
    (snapshot_dir(bundle.index_id).parent / f"{bundle.index_id}.DIRTY").touch()
    return root, Skipped(str(root / "bad.png"), bad.st_size, bad.st_mtime_ns, "not an image")


def assert_imported(bundle, root: Path, note: Skipped) -> None:
    report = index([], bundle)
    assert report.encoded == 0  # the skip note was honoured: bad.png was not decoded again
    assert [s.path for s in report.skipped_files] == [note.path]
    assert IndexStore(index_dir(), bundle.index_id, bundle.embed_dim).skipped() == {note.path: note}
    assert remembered_roots(index_dir()) == [str(root)]
    assert excludes_of(root) == ("raw/",)
    assert last_run(index_dir(), bundle.index_id)["rows"] == 2  # imported; a no-op run records nothing new
    assert not (index_dir() / "state.json").exists()
    assert not list(index_dir().glob("skipped-*.json")) and not list(index_dir().rglob("*.DIRTY"))
    assert_published(bundle)


def test_state_files_of_an_old_install_are_imported_once_and_removed(bundle, old_install) -> None:
    assert_imported(bundle, *old_install)


@pytest.mark.parametrize("step", protocol.MIGRATE_STEPS)
def test_an_import_killed_after_any_write_step_is_finished_by_the_next_run(bundle, old_install, step: str) -> None:
    root, note = old_install
    crash_at(step, INDEX_CALL, root)
    assert_search_equals_table(bundle)
    assert_imported(bundle, root, note)


def excludes_of(root: Path) -> tuple[str, ...]:
    from clipgrep.index.roots import RootSet

    return RootSet.load(index_dir()).roots[str(root)].excludes


# --- SIGINT / SIGTERM and kill -9 of the command --------------------------------------------------

# The real `clipgrep index` command with decode worker processes, and a slow fake encoder so a
# signal lands mid-run.
SLOW_CLI = """
import functools, sys, time
sys.path.insert(0, {repo!r})
import clipgrep.bundle, clipgrep.index.build as build
from clipgrep import cli
from tests.fakes import FakeImageEncoder

class SlowEncoder(FakeImageEncoder):
    def encode_pixels(self, pixels):
        time.sleep({delay} * len(pixels))
        return super().encode_pixels(pixels)

clipgrep.bundle.Bundle.image_encoder = lambda self, **_: SlowEncoder()
build.IndexOptions = functools.partial(build.IndexOptions, {options})
sys.argv = ["clipgrep", *sys.argv[1:]]
cli.main()
"""


def slow_cli(root: Path, delay: float, options: str = "") -> subprocess.Popen:
    script = SLOW_CLI.format(repo=str(REPO_ROOT), delay=delay, options=options)
    return subprocess.Popen([sys.executable, "-c", script, "index", str(root), "--model", "tiny", "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
                            start_new_session=True)


def committed_versions(bundle) -> int:
    versions = index_dir() / f"images_{bundle.index_id}.lance" / "_versions"
    return len(list(versions.glob("*.manifest"))) if versions.is_dir() else 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_first_index_keeps_its_work_and_says_so(bundle, tmp_path: Path, signum: int) -> None:
    root = tmp_path / "many"
    paths = many_images(root, 60)  # fewer than one commit_rows batch: only the time-based commit keeps them
    process = slow_cli(root, delay=0.05, options="commit_seconds=0.2")
    try:
        wait_for(lambda: committed_versions(bundle) >= 3, process, "two commits")
        if signum == signal.SIGINT:
            os.killpg(process.pid, signum)  # Ctrl-C: the terminal signals the whole process group
        else:
            process.send_signal(signum)  # `kill PID`
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 128 + signum
    assert out == ""
    kept = int(err.removeprefix("clipgrep: interrupted: ").split()[0])
    assert err == f"clipgrep: interrupted: {kept} images kept; rerun to resume\n"  # and no warnings
    assert 0 < kept < 60
    assert is_current(read_snapshot(snapshot_dir(bundle.index_id)), bundle.index_id)  # the snapshot was published
    assert len(searched(bundle)) == kept
    assert_search_equals_table(bundle)

    report = index([], bundle)  # the root was remembered
    assert (report.encoded, report.unchanged, report.rows) == (60 - kept, kept, 60)
    assert sorted(searched(bundle)) == sorted(map(str, paths))


def descendants(pid: int) -> set[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), set()).add(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent has yet to reap it


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to list child processes")
def test_decode_workers_and_helpers_die_with_a_killed_index_run(bundle, tmp_path: Path) -> None:
    root = tmp_path / "many"
    many_images(root, 60)
    process = slow_cli(root, delay=0.1)
    try:
        # the fork server, the resource tracker and two decode workers
        wait_for(lambda: len(descendants(process.pid)) >= 4, process, "the decode workers to start")
        children = descendants(process.pid)
        process.kill()
        process.wait()
        deadline = time.monotonic() + 10
        while any(running(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children if running(pid)]
        assert not left, f"still running 10 s after kill -9 of their parent: {left}"
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
        process.stderr.close()


# --- concurrent index and search ----------------------------------------------------------------


def test_search_during_an_index_run_shows_the_old_or_the_new_index_never_a_half_one(bundle, tmp_path: Path) -> None:
    root = tmp_path / "many"
    many_images(root, 20)
    index(root, bundle)
    before = frozenset(searched_paths(bundle))
    added = many_images(tmp_path / "more", 40)
    process = subprocess.Popen([sys.executable, "-c", INDEX_CALL, str(tmp_path)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    seen = []
    try:
        while process.poll() is None:
            seen.append(frozenset(searched_paths(bundle)))  # never raises, never a mix
        assert process.returncode == 0, process.stderr.read()
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
        process.stderr.close()
    seen.append(frozenset(searched_paths(bundle)))
    after = before | {str(p) for p in added}
    assert set(seen) <= {before, after}  # the whole old index or the whole new one
    assert seen[-1] == after and len(seen) > 1


# --- damaged snapshots --------------------------------------------------------------------------


def truncate_vectors(bundle) -> None:
    directory = snapshot_dir(bundle.index_id)
    vectors = directory / (directory / "CURRENT").read_text() / "vectors.npy"
    vectors.write_bytes(vectors.read_bytes()[:-20])


def point_at_missing_generation(bundle) -> None:
    (snapshot_dir(bundle.index_id) / "CURRENT").write_text("g1-1")


@pytest.mark.parametrize("damage", [truncate_vectors, point_at_missing_generation], ids=["truncated", "missing"])
def test_a_damaged_snapshot_is_one_line_for_search_and_rebuilt_by_index(bundle, tmp_path: Path, damage) -> None:
    root = tmp_path / "p"
    age(write_image(root / "red.png", RED), write_image(root / "blue.png", BLUE))
    index(root, bundle)
    damage(bundle)
    runner = CliRunner()
    result = runner.invoke(app, ["search", "red", "--model", "tiny"], env=test_index.PLAIN)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "damaged" in result.stderr and "clipgrep index" in result.stderr

    result = runner.invoke(app, ["index", "--model", "tiny"], env=test_index.PLAIN)  # what the message says to run
    assert result.exit_code == 0, result.stderr
    assert_search_equals_table(bundle)
    assert len(searched(bundle)) == 2
    generations = [p for p in snapshot_dir(bundle.index_id).iterdir() if p.is_dir()]
    assert len(generations) == 1  # the damaged one is gone
