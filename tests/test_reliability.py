"""Kills, signals, concurrent readers and damaged state, against real index and forget runs.

The invariant everywhere: once a run is killed at any write step and run again, search
returns exactly what the table holds (nothing lost, nothing duplicated); and even before
the rerun, search never silently shows a stale index (the DIRTY marker says so) nor, after
``forget``, an image the table no longer holds.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clipgrep.cli import app
from clipgrep.index.forget import forget_root
from clipgrep.index.roots import remembered_roots
from clipgrep.paths import dirty_marker, index_dir, snapshot_dir
from clipgrep.ranking import search
from clipgrep.snapshot import read_snapshot
from clipgrep.store import IndexStore

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
    if read_snapshot(snapshot_dir(bundle.index_id)) is None:
        return []
    paths = sorted(hit.path for hit in search(["red"], model="tiny", encoder=FakeQueryEncoder(), threshold=-1))
    assert len(paths) == len(set(paths)), "search returned a path twice"
    return paths


def searched(bundle) -> dict[str, np.ndarray]:
    """Every row search can return, with its vector; only while no writer runs."""
    snap = read_snapshot(snapshot_dir(bundle.index_id))
    if snap is None:
        return {}
    assert searched_paths(bundle) == snap.paths
    return {p: np.array(snap.vectors[i]) for i, p in enumerate(snap.paths)}


def assert_search_equals_table(bundle) -> None:
    table, shown = table_state(bundle), searched(bundle)
    assert sorted(shown) == sorted(table)
    for path, vector in table.items():
        np.testing.assert_array_equal(shown[path], vector)


def assert_never_silently_stale(bundle) -> None:
    if not dirty_marker(bundle.index_id).exists():
        assert_search_equals_table(bundle)


# --- kill -9 at each write step ----------------------------------------------------------------

# Runs a library call with every write step wrapped: after the KILL_AT-th write the process
# SIGKILLs itself, the way a crash or `kill -9` would end it between two steps.
KILL_AT_STEP = """
import os, pathlib, signal, sys
sys.path.insert(0, {repo!r})
import clipgrep.index.state as state, clipgrep.snapshot as snapshot, clipgrep.store as store
kill_at, writes = int(sys.argv[1]), [0]

def counted(owner, name, only=lambda *a: True):
    original = getattr(owner, name)
    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        if only(*args):
            writes[0] += 1
            if writes[0] == kill_at:
                print(owner.__name__, name, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        return result
    setattr(owner, name, wrapper)

for name in ("upsert", "delete", "maintain", "cleanup_orphans"):
    counted(store.IndexStore, name)
counted(snapshot, "write_snapshot")
counted(state, "write_json_atomic")
is_marker = lambda path, *rest: path.name.endswith(".DIRTY")
counted(pathlib.Path, "touch", is_marker)
counted(pathlib.Path, "unlink", is_marker)
{call}
print("finished", writes[0], flush=True)
"""

INDEX_CALL = """
from clipgrep.index.build import IndexOptions, update_index
from clipgrep.models import load_model
from tests.fakes import FakeImageEncoder
update_index([sys.argv[2]], bundle=load_model("tiny"), encoder=FakeImageEncoder(),
             options=IndexOptions(workers=0, commit_rows=3))
"""

FORGET_CALL = """
from clipgrep.index.forget import forget_root
forget_root(sys.argv[2])
"""


def run_killed_at(step: int, call: str, argument: Path) -> str:
    script = KILL_AT_STEP.format(repo=str(REPO_ROOT), call=call)
    done = subprocess.run([sys.executable, "-c", script, str(step), str(argument)], check=False,
                          capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert done.returncode in (0, -signal.SIGKILL), done.stderr
    return done.stdout


def kill_at_every_step(call: str, argument: Path, check_after_kill, rerun, check_after_rerun) -> int:
    """Kill ``call`` after its 1st, 2nd, ... write, from the same starting state, until it completes."""
    saved = index_dir().parent / "saved-index"
    shutil.copytree(index_dir(), saved)
    step = 0
    while True:
        step += 1
        shutil.rmtree(index_dir())
        shutil.copytree(saved, index_dir())
        killed_in = run_killed_at(step, call, argument)
        if killed_in.startswith("finished"):
            assert int(killed_in.split()[1]) == step - 1
            return step - 1
        try:
            check_after_kill()
            rerun()
            check_after_rerun()
        except AssertionError as e:
            raise AssertionError(f"killed after write {step} ({killed_in.strip()}): {e}") from e


def test_index_killed_after_any_write_step_resumes_with_search_equal_to_the_table(bundle, tmp_path: Path) -> None:
    root = tmp_path / "p"
    age(write_image(root / "red.png", RED), write_image(root / "green.png", GREEN),
        write_image(root / "old.png", (40, 40, 40)))
    index(root, bundle)
    # One run with every kind of write: a move (reused vector), a delete, new files over several
    # commits, and an indexed file that went bad (its row is deleted, the skip recorded).
    os.rename(root / "green.png", root / "moved green.png")
    (root / "old.png").unlink()
    for i, colour in enumerate((BLUE, YELLOW, (0, 255, 255), (255, 0, 255), (9, 99, 199))):
        write_image(root / "new" / f"{i}.png", colour)
    (root / "red.png").write_bytes(b"no longer an image")
    expected = {str(root / "moved green.png")} | {str(root / "new" / f"{i}.png") for i in range(5)}

    def resumed() -> None:
        index(root, bundle)

    def complete() -> None:
        assert_search_equals_table(bundle)
        assert set(table_state(bundle)) == expected

    steps = kill_at_every_step(INDEX_CALL, root, lambda: assert_never_silently_stale(bundle), resumed, complete)
    assert steps >= 8  # orphans, reuse, delete, 3 commits, skip notes, marker, maintain, snapshot...


def test_forget_killed_after_any_write_step_never_shows_forgotten_rows_and_a_rerun_finishes(
        bundle, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    age(write_image(a / "red.png", RED), write_image(a / "green.png", GREEN), write_image(b / "blue.png", BLUE))
    index(a, bundle)
    index(b, bundle)
    (a / "bad.png").write_bytes(b"junk")
    index(a, bundle)  # a skip note under a, which forget drops too

    def after_kill() -> None:
        assert set(searched(bundle)) <= set(table_state(bundle)), "search shows rows the table no longer holds"
        assert_never_silently_stale(bundle)

    def rerun() -> None:
        if str(a) in remembered_roots(index_dir()):
            forget_root(str(a))

    def forgotten() -> None:
        assert_search_equals_table(bundle)
        assert set(table_state(bundle)) == {str(b / "blue.png")}
        assert remembered_roots(index_dir()) == [str(b)]

    steps = kill_at_every_step(FORGET_CALL, a, after_kill, rerun, forgotten)
    assert steps >= 6  # marker, snapshot, delete, maintain, snapshot, marker, skip notes, roots


def test_a_rerun_of_forget_repairs_the_snapshot_even_when_no_row_is_left_to_delete(bundle, tmp_path: Path) -> None:
    """The old bug: a kill between forget's delete and its snapshot left search showing forgotten
    rows, with no DIRTY marker, and a rerun of forget deleted nothing and so fixed nothing."""
    a, b = tmp_path / "a", tmp_path / "b"
    age(write_image(a / "red.png", RED), write_image(b / "blue.png", BLUE))
    index([a, b], bundle)
    store = IndexStore(index_dir(), bundle.index_id, bundle.embed_dim)
    dirty_marker(bundle.index_id).touch()  # what forget leaves when killed after its delete
    store.delete([str(a / "red.png")])
    forget_root(str(a))
    assert_search_equals_table(bundle)
    assert not dirty_marker(bundle.index_id).exists()


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
    assert not dirty_marker(bundle.index_id).exists()  # the snapshot was published
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
    process = subprocess.Popen(
        [sys.executable, "-c", KILL_AT_STEP.format(repo=str(REPO_ROOT), call=INDEX_CALL), "0", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
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
