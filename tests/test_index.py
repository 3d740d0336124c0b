"""update_index end to end: change detection, reuse of moved and copied vectors, bad files,
crashes, the lock, the real ONNX path and the CLI commands.

Most tests run in-process with ``FakeImageEncoder`` (an image's vector is its mean colour) and
``workers=0``; a few run the real ONNX path of the tiny contract bundle, and a few run index
runs in subprocesses (to kill one, to hold the lock, to see what a no-op run imports).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipgrep import models
from clipgrep.cli import app
from clipgrep.errors import ClipgrepError
from clipgrep.index.build import IndexOptions, IndexProgress, IndexReport, update_index
from clipgrep.index.forget import forget_root
from clipgrep.index.roots import remembered_roots
from clipgrep.index.scan import ScanOptions
from clipgrep.paths import index_dir, snapshot_dir
from clipgrep.ranking import search
from clipgrep.snapshot import Snapshot, read_snapshot

from .factories import make_contract_bundle
from .fakes import FakeImageEncoder, FakeQueryEncoder

REPO_ROOT = Path(__file__).resolve().parents[1]
FAST = IndexOptions(workers=0)
HOUR_AGO_NS = time.time_ns() - 3600 * 10**9
RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)


# --- files ---------------------------------------------------------------------------------------


def write_image(path: Path, colour: tuple[int, int, int], fmt: str | None = None, size: int = 16) -> Path:
    """A solid-colour image; BMP files of one size always have the same byte count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, format=fmt)
    return path


def age(*paths: Path) -> None:
    """Move mtimes an hour back: out of the racy window, so a re-run can take the no-op fast path."""
    for path in paths:
        os.utime(path, ns=(HOUR_AGO_NS, HOUR_AGO_NS))


def noise_jpeg(size: int = 64) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# --- the index -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def bundle_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_contract_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture
def bundle(bundle_source: Path):
    return models.add_model("tiny", checkpoint=bundle_source)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """red, green and blue PNGs with old mtimes."""
    root = tmp_path / "photos"
    age(*(write_image(root / f"{name}.png", colour)
          for name, colour in (("red", RED), ("green", GREEN), ("blue", BLUE))))
    return root


def index(roots, bundle, encoder: FakeImageEncoder | None = None, **options) -> IndexReport:
    roots = [roots] if isinstance(roots, (str, Path)) else roots
    return update_index(roots, bundle=bundle, options=IndexOptions(**{"workers": 0, **options}),
                        encoder=encoder if encoder is not None else FakeImageEncoder())


def snapshot(bundle) -> Snapshot:
    snap = read_snapshot(snapshot_dir(bundle.index_id))
    assert snap is not None
    return snap


def indexed(bundle) -> list[str]:
    paths = snapshot(bundle).paths
    assert len(paths) == len(set(paths)), "duplicate rows"
    return paths


def names(bundle) -> set[str]:
    return {Path(p).name for p in indexed(bundle)}


def best(query: str, k: int = 1) -> list[str]:
    return [Path(hit.path).name for hit in search([query], model="tiny", encoder=FakeQueryEncoder(), k=k)]


def table_rows(bundle) -> int:
    from clipgrep.store import IndexStore

    return IndexStore(index_dir(), bundle.index_id, bundle.embed_dim).count()


@pytest.fixture
def forbid_store(monkeypatch: pytest.MonkeyPatch):
    """Call it to make any use of the LanceDB store fail: only the no-op fast path may run."""
    import clipgrep.store

    def forbid() -> None:
        class Refused:
            def __init__(self, *args, **kwargs) -> None:
                raise AssertionError("the run opened the LanceDB store instead of taking the no-op fast path")

        monkeypatch.setattr(clipgrep.store, "IndexStore", Refused)

    return forbid


def to_encode(progress: list[IndexProgress]) -> int:
    return max([p.to_encode for p in progress if p.phase == "encoding"], default=0)


# --- first run and no-op re-runs ---------------------------------------------------------------


def test_first_run_indexes_everything_and_a_rerun_encodes_nothing(bundle, photos: Path, forbid_store) -> None:
    encoder = FakeImageEncoder()
    report = index(photos, bundle, encoder)
    assert (report.scanned, report.added, report.encoded, report.rows) == (3, 3, 3, 3)
    assert (report.updated, report.reused, report.removed, report.unchanged) == (0, 0, 0, 0)
    assert report.roots == [str(photos)] and report.skipped == [] and report.skipped_total == 0
    assert encoder.encoded == 3
    assert indexed(bundle) == sorted(str(photos / f"{n}.png") for n in ("blue", "green", "red"))
    assert remembered_roots(index_dir()) == [str(photos)]
    assert best("red") == ["red.png"] and best("blue") == ["blue.png"]

    forbid_store()
    again = index(photos, bundle, encoder)
    assert encoder.encoded == 3 and encoder.calls == 1
    assert (again.unchanged, again.added, again.encoded, again.rows, again.removed) == (3, 0, 0, 3, 0)


NOOP_RUN = """
import json, sys
from clipgrep.index.build import IndexOptions, update_index
from clipgrep.models import load_model
report = update_index([sys.argv[1]], bundle=load_model("tiny"), options=IndexOptions(workers=0))
print(json.dumps({"unchanged": report.unchanged, "encoded": report.encoded,
                  "heavy": sorted(m for m in ("lancedb", "pyarrow", "onnxruntime") if m in sys.modules)}))
"""


def test_a_noop_rerun_imports_neither_lancedb_nor_the_model(bundle, photos: Path) -> None:
    index(photos, bundle)
    done = subprocess.run([sys.executable, "-c", NOOP_RUN, str(photos)], check=False, capture_output=True, text=True,
                          timeout=120, env=os.environ.copy())
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"unchanged": 3, "encoded": 0, "heavy": []}


def test_racy_files_are_rechecked_until_their_mtime_is_safely_old(bundle, tmp_path: Path, monkeypatch,
                                                                  forbid_store) -> None:
    from clipgrep.index import plan

    monkeypatch.setattr(plan, "RACY_WINDOW_NS", 300_000_000)
    write_image(tmp_path / "p" / "new.png", RED)
    encoder = FakeImageEncoder()
    index(tmp_path / "p", bundle, encoder)
    assert index(tmp_path / "p", bundle, encoder).unchanged == 1  # still racy: fingerprinted again
    time.sleep(0.35)
    assert index(tmp_path / "p", bundle, encoder).unchanged == 1  # confirmed: no longer racy
    forbid_store()
    assert index(tmp_path / "p", bundle, encoder).unchanged == 1  # so this one is a no-op
    assert encoder.encoded == 1


# --- changes -------------------------------------------------------------------------------------


def test_an_added_file_is_the_only_one_encoded(bundle, photos: Path) -> None:
    encoder = FakeImageEncoder()
    index(photos, bundle, encoder)
    write_image(photos / "sub" / "yellow.png", YELLOW)
    report = index(photos, bundle, encoder)
    assert (report.added, report.encoded, report.unchanged, report.rows) == (1, 1, 3, 4)
    assert encoder.encoded == 4
    assert "yellow.png" in names(bundle)


def test_a_same_size_rewrite_with_a_newer_mtime_is_reencoded(bundle, tmp_path: Path) -> None:
    photo = write_image(tmp_path / "p" / "photo.bmp", RED)
    age(photo)
    size = photo.stat().st_size
    encoder = FakeImageEncoder()
    index(tmp_path / "p", bundle, encoder)
    assert best("red") == ["photo.bmp"]
    write_image(photo, BLUE)
    assert photo.stat().st_size == size
    os.utime(photo, ns=(HOUR_AGO_NS, HOUR_AGO_NS + 10**9))
    report = index(tmp_path / "p", bundle, encoder)
    assert (report.updated, report.added, report.encoded, report.reused, report.rows) == (1, 0, 1, 0, 1)
    assert search(["blue"], model="tiny", encoder=FakeQueryEncoder())[0].score > 0.99


def test_a_touched_file_keeps_one_row_and_is_not_counted_as_moved(bundle, photos: Path, forbid_store) -> None:
    encoder = FakeImageEncoder()
    index(photos, bundle, encoder)
    before = snapshot(bundle).vector_for(str(photos / "red.png"))
    os.utime(photos / "red.png", ns=(HOUR_AGO_NS, HOUR_AGO_NS + 5 * 10**9))  # content unchanged
    report = index(photos, bundle, encoder)
    assert report.rows == 3 and len(indexed(bundle)) == 3
    assert report.encoded <= 1 and report.unchanged + report.updated == 3  # re-encoded or not, it is
    assert report.reused == 0 and report.removed == 0                        # neither moved nor copied
    snap = snapshot(bundle)
    row = snap.find(str(photos / "red.png"))
    assert snap.mtimes_ns[row] == HOUR_AGO_NS + 5 * 10**9
    np.testing.assert_allclose(snap.vectors[row], before, atol=1e-6)
    forbid_store()
    assert index(photos, bundle, encoder).unchanged == 3


def test_a_deleted_file_loses_its_row(bundle, photos: Path) -> None:
    index(photos, bundle)
    (photos / "green.png").unlink()
    report = index(photos, bundle)
    assert (report.removed, report.rows, report.encoded) == (1, 2, 0)
    assert names(bundle) == {"red.png", "blue.png"}
    assert "green.png" not in best("green", k=10)
    assert table_rows(bundle) == 2


@pytest.mark.parametrize("destination", ["crimson.png", "album/2024/red.png"], ids=["rename", "other-dir"])
def test_a_moved_file_reuses_its_vector(bundle, photos: Path, destination: str) -> None:
    encoder = FakeImageEncoder()
    index(photos, bundle, encoder)
    vector = snapshot(bundle).vector_for(str(photos / "red.png"))
    (photos / destination).parent.mkdir(parents=True, exist_ok=True)
    os.rename(photos / "red.png", photos / destination)
    report = index(photos, bundle, encoder)
    assert encoder.encoded == 3 and report.encoded == 0
    assert (report.reused, report.removed, report.added, report.unchanged, report.rows) == (1, 1, 0, 2, 3)
    snap = snapshot(bundle)
    assert snap.find(str(photos / "red.png")) is None
    np.testing.assert_array_equal(snap.vector_for(str(photos / destination)), vector)
    assert best("red") == [Path(destination).name]


def test_a_copy_reuses_the_vector_and_both_paths_stay(bundle, photos: Path) -> None:
    encoder = FakeImageEncoder()
    index(photos, bundle, encoder)
    (photos / "backup").mkdir()
    shutil.copyfile(photos / "blue.png", photos / "backup" / "blue copy.png")
    report = index(photos, bundle, encoder)
    assert encoder.encoded == 3
    assert (report.reused, report.removed, report.rows) == (1, 0, 4)
    snap = snapshot(bundle)
    np.testing.assert_array_equal(snap.vector_for(str(photos / "backup" / "blue copy.png")),
                                  snap.vector_for(str(photos / "blue.png")))
    assert sorted(best("blue", k=2)) == ["blue copy.png", "blue.png"]


def test_a_restored_file_is_indexed_again(bundle, photos: Path) -> None:
    encoder = FakeImageEncoder()
    index(photos, bundle, encoder)
    saved = (photos / "green.png").read_bytes()
    (photos / "green.png").unlink()
    assert index(photos, bundle, encoder).removed == 1
    (photos / "green.png").write_bytes(saved)
    report = index(photos, bundle, encoder)
    assert (report.added, report.encoded, report.rows) == (1, 1, 3)
    assert best("green") == ["green.png"]


def test_rewritten_in_the_racy_window_with_same_size_and_mtime_is_caught(bundle, tmp_path: Path) -> None:
    """A rewrite within the mtime granularity leaves (size, mtime) as they were: only the
    fingerprint of a file indexed within the racy window can tell."""
    photo = write_image(tmp_path / "p" / "photo.bmp", RED)
    stamp = time.time_ns()  # as if written just now
    os.utime(photo, ns=(stamp, stamp))
    encoder = FakeImageEncoder()
    index(tmp_path / "p", bundle, encoder)
    write_image(photo, BLUE)
    os.utime(photo, ns=(stamp, stamp))
    report = index(tmp_path / "p", bundle, encoder)
    assert (report.updated, report.encoded, report.rows) == (1, 1, 1)
    assert best("blue") == ["photo.bmp"]
    assert search(["blue"], model="tiny", encoder=FakeQueryEncoder())[0].score > 0.99


def test_a_rewrite_after_the_decoder_read_the_file_is_caught_next_run(bundle, tmp_path: Path,
                                                                      monkeypatch) -> None:
    """However long encoding takes, the racy check compares the mtime with a time before the read."""
    from clipgrep.index import plan

    monkeypatch.setattr(plan, "RACY_WINDOW_NS", 500_000_000)
    photo = write_image(tmp_path / "p" / "photo.bmp", RED)
    stamp = time.time_ns()
    os.utime(photo, ns=(stamp, stamp))

    class RewritingEncoder(FakeImageEncoder):
        def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
            write_image(photo, BLUE)  # rewritten in the same mtime tick, after the decoder read it
            os.utime(photo, ns=(stamp, stamp))
            time.sleep(0.6)  # a slow model: encoding ends after the racy window
            return super().encode_pixels(pixels)

    index(tmp_path / "p", bundle, RewritingEncoder())
    assert best("red") == ["photo.bmp"]
    report = index(tmp_path / "p", bundle)
    assert (report.updated, report.encoded) == (1, 1)
    assert search(["blue"], model="tiny", encoder=FakeQueryEncoder())[0].score > 0.99


# --- roots ---------------------------------------------------------------------------------------


def test_roots_are_remembered_refreshed_together_and_forgotten(bundle, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    age(write_image(a / "red.png", RED), write_image(a / "green.png", GREEN),
        write_image(b / "blue.png", BLUE))
    encoder = FakeImageEncoder()
    index(a, bundle, encoder)
    report = index(b, bundle, encoder)
    assert report.roots == [str(b)] and report.rows == 3
    assert len(indexed(bundle)) == 3  # a's rows stay
    assert remembered_roots(index_dir()) == [str(a), str(b)]

    write_image(a / "yellow.png", YELLOW)
    (b / "blue.png").unlink()
    write_image(b / "blue2.png", (0, 0, 200))
    report = index([], bundle, encoder)  # no roots: every remembered one
    assert report.roots == [str(a), str(b)]
    assert (report.added, report.removed, report.unchanged, report.rows) == (2, 1, 2, 4)
    assert names(bundle) == {"red.png", "green.png", "yellow.png", "blue2.png"}

    assert forget_root(str(a)).removed == 3
    assert indexed(bundle) == [str(b / "blue2.png")]
    assert remembered_roots(index_dir()) == [str(b)]
    assert best("red", k=10) == ["blue2.png"]
    with pytest.raises(ClipgrepError, match="is not an indexed root"):
        forget_root(str(a))
    # Re-indexing b does not bring a back.
    assert index([], bundle, encoder).rows == 1


def test_excluded_files_are_not_indexed_and_a_later_exclude_removes_rows(bundle, photos: Path) -> None:
    write_image(photos / "raw" / "yellow.png", YELLOW)
    write_image(photos / "tmp.png", YELLOW)
    index(photos, bundle, scan=ScanOptions(excludes=("raw/",)))
    assert names(bundle) == {"red.png", "green.png", "blue.png", "tmp.png"}

    (photos / ".clipgrepignore").write_text("tmp.png\n")
    report = index(photos, bundle, prune=True)  # raw/ stays excluded: remembered with the root
    assert report.removed == 1
    assert names(bundle) == {"red.png", "green.png", "blue.png"}

    report = index(photos, bundle, remove_excludes=("raw/",))  # without the exclude, raw/ comes in
    assert report.added == 1 and "yellow.png" in names(bundle)
    report = index(photos, bundle, scan=ScanOptions(excludes=("raw/", "red.png")), prune=True)
    assert (report.removed, report.rows) == (2, 2)
    assert names(bundle) == {"green.png", "blue.png"}
    assert table_rows(bundle) == 2


# --- bad files -----------------------------------------------------------------------------------


@pytest.fixture
def bad_files(photos: Path) -> Path:
    (photos / "empty.jpg").write_bytes(b"")
    (photos / "notes.png").write_text("not an image at all\n")
    jpeg = noise_jpeg()
    (photos / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    shutil.copyfile(write_image(photos / "tmp" / "yellow.png", YELLOW), photos / "png-named.jpg")
    shutil.rmtree(photos / "tmp")
    age(*photos.iterdir())
    return photos


def test_bad_files_are_skipped_with_reasons_and_not_retried_until_asked(bundle, bad_files: Path,
                                                                       forbid_store) -> None:
    photos, encoder = bad_files, FakeImageEncoder()
    report = index(photos, bundle, encoder)
    reasons = {Path(s.path).name: s.reason for s in report.skipped}
    assert reasons == {"empty.jpg": "empty file", "notes.png": "not an image",
                       "truncated.jpg": "truncated or corrupt image"}
    assert report.skipped_total == 3
    assert (report.added, report.encoded, report.rows) == (4, 4, 4)
    assert best("red green") == ["png-named.jpg"]  # a PNG named .jpg is indexed as what it is

    progress: list[IndexProgress] = []
    again = update_index([photos], bundle=bundle, options=FAST, encoder=encoder,
                         on_progress=lambda p: progress.append(IndexProgress(**vars(p))))
    assert again.skipped == [] and again.skipped_total == 3 and again.encoded == 0
    assert to_encode(progress) == 0

    progress.clear()
    retry = update_index([photos], bundle=bundle, options=IndexOptions(workers=0, retry_skipped=True),
                         encoder=encoder, on_progress=lambda p: progress.append(IndexProgress(**vars(p))))
    assert to_encode(progress) == 3
    assert {Path(s.path).name for s in retry.skipped} == {"empty.jpg", "notes.png", "truncated.jpg"}
    assert retry.skipped_total == 3 and retry.rows == 4 and encoder.encoded == 4

    forbid_store()  # skipped files that did not change do not defeat the fast path
    assert index(photos, bundle, encoder).skipped_total == 3


def test_a_fixed_file_is_indexed_and_a_deleted_bad_file_is_forgotten(bundle, bad_files: Path) -> None:
    photos, encoder = bad_files, FakeImageEncoder()
    index(photos, bundle, encoder)
    write_image(photos / "notes.png", (10, 200, 30), fmt="PNG")
    report = index(photos, bundle, encoder)
    assert (report.added, report.encoded, report.skipped_total, report.rows) == (1, 1, 2, 5)
    assert "notes.png" in names(bundle)

    shutil.copyfile(photos / "red.png", photos / "empty.jpg")  # fixed by a copy of an indexed image
    report = index(photos, bundle, encoder)
    assert (report.reused, report.encoded, report.skipped_total, report.rows) == (1, 0, 1, 6)

    (photos / "truncated.jpg").unlink()
    report = index(photos, bundle, encoder)
    assert (report.skipped_total, report.rows) == (0, 6)
    assert index(photos, bundle, encoder, retry_skipped=True).skipped == []


def test_an_excluded_bad_file_is_no_longer_counted_as_skipped(bundle, bad_files: Path) -> None:
    index(bad_files, bundle)
    report = index(bad_files, bundle, scan=ScanOptions(excludes=("*.jpg",)))
    assert report.skipped_total == 1  # notes.png


def test_an_indexed_file_that_goes_bad_loses_its_row(bundle, photos: Path, forbid_store) -> None:
    encoder = FakeImageEncoder()
    index(photos, bundle, encoder)
    (photos / "red.png").write_bytes(b"overwritten with junk")
    age(photos / "red.png")
    report = index(photos, bundle, encoder)
    assert [(Path(s.path).name, s.reason) for s in report.skipped] == [("red.png", "not an image")]
    assert report.rows == 2 and names(bundle) == {"green.png", "blue.png"}
    assert table_rows(bundle) == 2
    assert "red.png" not in best("red", k=10)
    forbid_store()
    report = index(photos, bundle, encoder)
    assert (report.unchanged, report.skipped_total, report.rows) == (2, 1, 2)


# --- crashes and concurrency ---------------------------------------------------------------------

SLOW_RUN = """
import sys, time
sys.path.insert(0, {repo!r})
from clipgrep.index.build import IndexOptions, update_index
from clipgrep.models import load_model
from tests.fakes import FakeImageEncoder

class SlowEncoder(FakeImageEncoder):
    def encode_pixels(self, pixels):
        time.sleep({delay} * len(pixels))
        return super().encode_pixels(pixels)

report = update_index([sys.argv[1]], bundle=load_model("tiny"), encoder=SlowEncoder(),
                      options=IndexOptions(workers=0, commit_rows=20))
print("finished", report.rows, flush=True)
"""


def slow_run(root: Path, delay: float) -> subprocess.Popen:
    script = SLOW_RUN.format(repo=str(REPO_ROOT), delay=delay)
    return subprocess.Popen([sys.executable, "-c", script, str(root)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ.copy())


def many_images(root: Path, count: int) -> list[Path]:
    # distinct colours: no two files share a fingerprint, so nothing is reused
    return [write_image(root / f"{i // 100:02d}" / f"{i:04d}.png", (i % 256, (i // 256) * 40, 128), size=8)
            for i in range(count)]


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run exited (rc {process.returncode}) before {what}: {process.stderr.read()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_a_run_killed_mid_way_resumes_without_duplicates_or_gaps(bundle, tmp_path: Path) -> None:
    root = tmp_path / "many"
    paths = many_images(root, 300)
    # Version 1 is the empty table, version 2 the first commit of rows.
    versions = index_dir() / f"images_{bundle.index_id}.lance" / "_versions"
    process = slow_run(root, delay=0.005)
    try:
        wait_for(lambda: versions.is_dir() and len(list(versions.glob("*.manifest"))) >= 2,
                 process, "the first commit")
        assert process.poll() is None, "the run finished before it could be killed"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL

    encoder = FakeImageEncoder()
    report = index(root, bundle, encoder, commit_rows=20)
    assert 0 < report.encoded < 300, "the second run should redo only what the first did not commit"
    assert report.encoded + report.unchanged == 300 and report.rows == 300
    assert indexed(bundle) == sorted(map(str, paths))
    assert table_rows(bundle) == 300
    hits = search(["blue"], model="tiny", encoder=FakeQueryEncoder(), k=5)
    assert len(hits) == 5 and hits[0].score >= hits[-1].score


# A real index run that holds the lock a while: a no-op over an indexed tree, paused after its scan.
HOLDING_RUN = """
import sys, time
from clipgrep.index.build import IndexOptions, update_index
from clipgrep.models import load_model

def pause(progress):
    if progress.phase == "planning":
        print("scanned", flush=True)
        time.sleep(float(sys.argv[2]))

report = update_index([sys.argv[1]], bundle=load_model("tiny"), options=IndexOptions(workers=0),
                      on_progress=pause)
print("finished", report.unchanged, report.rows, flush=True)
"""


def test_a_second_run_is_refused_or_waits_for_the_first(bundle, photos: Path) -> None:
    index(photos, bundle)
    process = subprocess.Popen([sys.executable, "-c", HOLDING_RUN, str(photos), "1.0"], text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
    try:
        assert process.stdout.readline() == "scanned\n", process.stderr.read()
        running = f"another clipgrep index is running \\(pid {process.pid}\\)"
        with pytest.raises(ClipgrepError, match=running):
            index(photos, bundle, wait_for_lock=False)

        waited = []

        def on_wait() -> None:
            waited.append(process.poll())
            write_image(photos / "yellow.png", YELLOW)  # the first run has scanned already: ours adds it

        report = update_index([photos], bundle=bundle, options=FAST, encoder=FakeImageEncoder(),
                              on_wait=on_wait)
        assert waited == [None]  # told once, while the first run was still going
        assert process.wait(timeout=60) == 0, process.stderr.read()
        assert process.stdout.read() == "finished 3 3\n"
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
        process.stderr.close()
    assert (report.added, report.unchanged, report.rows) == (1, 3, 4)
    assert names(bundle) == {"red.png", "green.png", "blue.png", "yellow.png"}


# --- the real model ------------------------------------------------------------------------------


def test_the_onnx_bundle_indexes_with_worker_processes_and_searches(bundle, tmp_path: Path) -> None:
    root = tmp_path / "p"
    colours = [RED, GREEN, BLUE, YELLOW, (0, 255, 255), (255, 0, 255)]
    for i, colour in enumerate(colours):
        write_image(root / f"{i}.jpg", colour, size=40)
    report = update_index([root], bundle=bundle, options=IndexOptions(workers=2))
    assert (report.added, report.encoded, report.rows, report.skipped) == (6, 6, 6, [])
    snap = snapshot(bundle)
    np.testing.assert_allclose(np.linalg.norm(snap.vectors, axis=1), 1.0, atol=1e-5)
    hits = search(["x"], model="tiny", k=4)
    scores = [hit.score for hit in hits]
    assert len(hits) == 4
    assert all(-1.0001 <= s <= 1.0001 for s in scores) and scores == sorted(scores, reverse=True)
    assert {hit.path for hit in hits} <= {str(root / f"{i}.jpg") for i in range(6)}


# --- the command line ----------------------------------------------------------------------------

PLAIN = {"COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb"}


def cli(*args: str):
    return CliRunner().invoke(app, list(args), env=PLAIN)


def test_cli_index_status_search_and_forget(bundle, photos: Path) -> None:
    result = cli("index", str(photos), "--model", "tiny")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith("clipgrep: 3 images indexed (3 added, 0 updated")

    (photos / "green.png").unlink()
    result = cli("index", "--model", "tiny", "--json")
    assert result.exit_code == 0, result.stderr
    (line,) = result.stdout.splitlines()
    report = json.loads(line)
    assert report["roots"] == [str(photos)]
    assert (report["removed"], report["unchanged"], report["rows"], report["skipped"]) == (1, 2, 2, [])
    assert "2 images indexed" in result.stderr

    status = cli("status", "--model", "tiny")
    assert status.exit_code == 0, status.stderr
    fields = dict(line.split(None, 1) if "  " not in line else [part.strip() for part in line.split("  ", 1)]
                  for line in status.stdout.splitlines())
    assert fields["roots"] == str(photos) and fields["rows"] == "2" and fields["model"] == "tiny"
    info = json.loads(cli("status", "--model", "tiny", "--json").stdout)
    assert info["roots"] == [str(photos)] and info["rows"] == 2

    found = cli("search", "a photo", "--model", "tiny", "--paths")
    assert found.exit_code == 0 and sorted(found.stdout.splitlines()) == [str(photos / "blue.png"),
                                                                          str(photos / "red.png")]

    forgot = cli("forget", str(photos))
    assert forgot.exit_code == 0 and forgot.stdout == ""
    assert f"forgot {photos} (2 rows removed)" in forgot.stderr
    info = json.loads(cli("status", "--model", "tiny", "--json").stdout)
    assert info["roots"] == [] and info["rows"] == 0
    assert cli("search", "a photo", "--model", "tiny").exit_code == 1  # an empty index: no results


@pytest.mark.parametrize("model, advice", [("tiny", "clipgrep index DIR --model tiny"),
                                            ("not-installed", "no model named 'not-installed' is installed"),
                                            ("not-installed", "clipgrep models list")])
def test_cli_search_without_an_index_says_how_to_build_one(bundle, model: str, advice: str) -> None:
    result = cli("search", "a red bicycle", "--model", model)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("clipgrep: error: ")
    assert advice in result.stderr


def test_cli_index_errors_are_one_line(bundle, tmp_path: Path) -> None:
    result = cli("index", str(tmp_path / "missing"), "--model", "tiny")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "does not exist" in result.stderr
    result = cli("forget", str(tmp_path))
    assert result.exit_code == 2 and "is not an indexed root" in result.stderr
