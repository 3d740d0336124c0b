"""What stays indexed (issue 12): excludes remembered with their root and rows kept unless
``--prune`` (item 1), skipped files listed (item 4), roots that never nest and files that are not
roots (item 10), and roots whose drive is not mounted (item 16)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from clipgrep.errors import ClipgrepError
from clipgrep.index.forget import forget_root
from clipgrep.index.legacy import STATE_FILE
from clipgrep.index.roots import RootSet, anchor, literal, remembered_roots
from clipgrep.index.scan import ScanOptions
from clipgrep.paths import index_dir
from clipgrep.status import index_status

from . import test_index as base
from .fakes import FakeImageEncoder
from .test_index import BLUE, GREEN, RED, YELLOW, cli, index, indexed, names, table_rows, write_image

# test_index's fixtures, shared by assignment (an import would read as shadowed by every test's parameters)
bundle_source, bundle, photos, bad_files, forbid_store = (
    base.bundle_source, base.bundle, base.photos, base.bad_files, base.forbid_store)


def load_tracked(directory: Path) -> tuple[dict, dict]:
    tracked = RootSet.load(directory)
    return tracked.roots, tracked.files


def excludes_of(root: Path) -> tuple[str, ...]:
    return load_tracked(index_dir())[0][str(root)].excludes


def remembered_files() -> list[str]:
    return sorted(load_tracked(index_dir())[1])


def set_recorded_device(path: Path, device: int) -> None:
    """What the state would say had ``path`` been indexed on another drive than the one there now."""
    tracked = RootSet.load(index_dir())
    tracked.record_device(str(path), device)
    tracked.save(index_dir())


# --- item 1: excludes are remembered, and never drop rows without --prune ------------------------


def test_an_exclude_is_remembered_with_its_root_and_shown_by_status(bundle, photos: Path) -> None:
    write_image(photos / "raw" / "yellow.png", YELLOW)
    index(photos, bundle, scan=ScanOptions(excludes=("raw/",)))
    assert names(bundle) == {"red.png", "green.png", "blue.png"}

    report = index([], bundle)  # a plain refresh: the exclude still holds, nothing is encoded
    assert (report.added, report.encoded) == (0, 0)
    assert excludes_of(photos) == ("raw/",)
    assert index_status("tiny")["excludes"] == {str(photos): ["raw/"]}
    status = cli("status", "--model", "tiny").stdout.splitlines()
    assert [line.split(None, 1)[1] for line in status if line.startswith("excludes ")] == [f"{photos}: raw/"]

    with pytest.raises(ClipgrepError, match="no indexed root has the exclude 'nope/'"):
        index([], bundle, remove_excludes=("nope/",))
    report = index([], bundle, remove_excludes=("raw/",))
    assert report.added == 1 and excludes_of(photos) == ()


def test_an_exclude_keeps_indexed_rows_until_prune(bundle, photos: Path, forbid_store) -> None:
    write_image(photos / "raw" / "yellow.png", YELLOW)
    index(photos, bundle)
    report = index(photos, bundle, scan=ScanOptions(excludes=("raw/", "red.png")))
    assert (report.removed, report.kept, report.rows) == (0, 2, 4)
    kept = "2 indexed images kept: excluded now or unreadable; 'clipgrep index --prune' drops them"
    assert report.scan_problems == [(str(photos), kept)]
    assert len(indexed(bundle)) == 4

    forbid_store()  # kept rows do not make every later refresh rewrite the index
    again = index([], bundle)
    assert (again.kept, again.removed, again.rows) == (2, 0, 4)


def test_prune_drops_the_rows_of_excluded_files(bundle, photos: Path) -> None:
    index(photos, bundle)
    (photos / ".clipgrepignore").write_text("red.png\n")  # the persistent, per-folder way
    assert index(photos, bundle).kept == 1
    report = index(photos, bundle, prune=True)
    assert (report.removed, report.kept, report.scan_problems) == (1, 0, [])
    assert names(bundle) == {"green.png", "blue.png"} and table_rows(bundle) == 2


def test_a_deleted_file_still_loses_its_row_without_prune(bundle, photos: Path) -> None:
    index(photos, bundle, scan=ScanOptions(excludes=("red.png",)))
    (photos / "green.png").unlink()
    report = index(photos, bundle)
    assert (report.removed, report.kept) == (1, 0)


def test_a_file_in_a_folder_that_cannot_be_read_now_keeps_its_row(bundle, photos: Path, monkeypatch) -> None:
    index(photos, bundle)
    hidden_away = photos / "red.png"
    hidden_away.unlink()  # what a scan sees when its folder lost its permissions

    real_lstat = os.lstat

    def lstat(path, *args, **kwargs):
        if os.fspath(path) == str(hidden_away):
            raise PermissionError(13, "Permission denied", str(path))
        return real_lstat(path, *args, **kwargs)

    with monkeypatch.context() as patch:  # not monkeypatch.undo(): that would undo CLIPGREP_HOME too
        patch.setattr(os, "lstat", lstat)
        report = index(photos, bundle)
        assert (report.removed, report.kept) == (0, 1)
    assert index(photos, bundle).removed == 1


def test_cli_exclude_warns_once_per_root_and_prune_drops(bundle, photos: Path) -> None:
    assert cli("index", str(photos), "--model", "tiny").exit_code == 0
    result = cli("index", str(photos), "--model", "tiny", "-x", "red.png")
    assert result.exit_code == 0, result.stderr
    assert "(0 added, 0 updated, 0 moved/copied, 0 removed, 2 unchanged, 1 kept)" in result.stderr
    assert (f"  warning: {photos}: 1 indexed images kept: excluded now or unreadable; "
            "'clipgrep index --prune' drops them\n") in result.stderr
    info = json.loads(cli("status", "--model", "tiny", "--json").stdout)
    assert info["excludes"] == {str(photos): ["red.png"]} and info["rows"] == 3
    result = cli("index", "--model", "tiny", "--prune")
    assert "1 removed" in result.stderr and json.loads(cli("status", "--model", "tiny", "--json").stdout)["rows"] == 2


# --- item 10: roots never nest; a FILE is not a root -------------------------------------------------


def test_a_file_argument_is_remembered_as_a_file_kept_fresh_and_forgettable(bundle, tmp_path: Path) -> None:
    picture = write_image(tmp_path / "desk" / "red.png", RED)
    write_image(tmp_path / "desk" / "other.png", GREEN)
    index(picture, bundle)
    assert remembered_roots(index_dir()) == [] and remembered_files() == [str(picture)]
    assert index_status("tiny")["files"] == [str(picture)]
    assert names(bundle) == {"red.png"}  # not its folder

    write_image(picture, BLUE, size=20)
    report = index([], bundle)  # a plain refresh keeps the file current
    assert (report.updated, report.scan_problems) == (1, [])

    picture.unlink()  # deleted, on the drive it was on: its row goes, with no warning
    report = index([], bundle)
    assert (report.removed, report.kept, report.rows, report.scan_problems) == (1, 0, 0, [])
    assert remembered_files() == []


def test_a_file_that_is_not_an_image_is_refused_and_not_remembered(bundle, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ClipgrepError, match="neither a directory nor an image file"):
        index(tmp_path / "notes.txt", bundle)
    assert load_tracked(index_dir()) == ({}, {})


def test_forget_a_remembered_file(bundle, photos: Path) -> None:
    index(photos / "red.png", bundle)
    forgotten = forget_root(str(photos / "red.png"))
    assert (forgotten.removed, forgotten.pattern) == (1, None)
    assert remembered_files() == [] and indexed(bundle) == []


def test_a_file_inside_a_root_is_refreshed_but_not_remembered(bundle, photos: Path) -> None:
    index(photos, bundle)
    write_image(photos / "red.png", YELLOW, size=20)
    report = index(photos / "red.png", bundle)
    assert (report.roots, report.updated) == ([str(photos / "red.png")], 1)
    assert remembered_roots(index_dir()) == [str(photos)] and remembered_files() == []


def test_a_root_over_remembered_roots_and_files_replaces_them_and_keeps_their_excludes(bundle, photos: Path) -> None:
    write_image(photos / "sub" / "raw" / "yellow.png", YELLOW)
    write_image(photos / "raw" / "keep.png", (9, 9, 9))
    index(photos / "sub", bundle, scan=ScanOptions(excludes=("raw/",)))
    index(photos / "red.png", bundle)
    index(photos, bundle)
    assert remembered_roots(index_dir()) == [str(photos)] and remembered_files() == []
    assert excludes_of(photos) == ("/sub/**/raw/",)  # what sub left out stays out; photos/raw is in
    assert names(bundle) == {"red.png", "green.png", "blue.png", "keep.png"}


def test_a_directory_inside_a_root_refreshes_the_root_and_anchors_its_excludes(bundle, photos: Path) -> None:
    write_image(photos / "sub" / "raw" / "yellow.png", YELLOW)
    index(photos, bundle)
    report = index(photos / "sub", bundle, scan=ScanOptions(excludes=("raw/",)), prune=True)
    assert report.roots == [str(photos)] and report.removed == 1
    assert remembered_roots(index_dir()) == [str(photos)] and excludes_of(photos) == ("/sub/**/raw/",)
    index(photos / "sub", bundle, remove_excludes=("raw/",))  # as it was given, relative to sub
    assert excludes_of(photos) == () and "yellow.png" in names(bundle)


def test_forgetting_a_folder_inside_a_root_excludes_it_from_the_root(bundle, photos: Path) -> None:
    write_image(photos / "sub" / "yellow.png", YELLOW)
    index(photos, bundle)
    forgotten = forget_root(str(photos / "sub"))
    assert (forgotten.removed, forgotten.excluded_from, forgotten.pattern) == (1, str(photos), "/sub")
    assert names(bundle) == {"red.png", "green.png", "blue.png"}
    assert index([], bundle).added == 0  # a refresh does not bring it back
    result = cli("forget", str(photos / "red.png"))
    assert result.exit_code == 0 and "--remove-exclude /red.png' undoes it" in result.stderr
    assert index([], bundle, remove_excludes=("/sub",)).added == 1


def test_state_from_before_is_normalised(bundle, photos: Path) -> None:
    write_image(photos / "sub" / "yellow.png", YELLOW)
    legacy = [str(photos), str(photos / "sub"), str(photos / "red.png"), str(photos.parent / "x.png")]
    index_dir().mkdir(parents=True, exist_ok=True)
    (index_dir() / STATE_FILE).write_text(json.dumps({"roots": legacy}))
    tracked = RootSet.load(index_dir())
    assert list(tracked.roots) == [str(photos)] and list(tracked.files) == [str(photos.parent / "x.png")]


@pytest.mark.parametrize(("pattern", "rel", "expected"), [
    ("raw/", "sub", "/sub/**/raw/"), ("*.png", "a/b", "/a/b/**/*.png"), ("x/y.png", "sub", "/sub/x/y.png"),
    ("/top.png", "sub", "/sub/top.png"), ("!keep.png", "sub", "!/sub/**/keep.png"), ("raw/", ".", "raw/"),
    ("raw/", "odd [1]*", r"/odd \[1\]\*/**/raw/"),
])
def test_anchor(pattern: str, rel: str, expected: str) -> None:
    assert anchor(pattern, rel) == expected


def test_literal_patterns_match_only_their_path(tmp_path: Path) -> None:
    from clipgrep.index.scan import scan

    for name in ("a[1].png", "a1.png", "b*.png", "bb.png", "c .png"):
        write_image(tmp_path / name, RED)
    left = scan([tmp_path], ScanOptions(excludes=(literal("a[1].png"), literal("b*.png"), literal("c .png"))))
    assert sorted(Path(e.path).name for e in left.files) == ["a1.png", "bb.png"]


# --- item 16: a root on a drive that is not mounted keeps its rows -------------------------------


def test_an_emptied_root_keeps_its_rows_until_prune(bundle, photos: Path) -> None:
    encoder = FakeImageEncoder()
    index(photos, bundle, encoder)
    backup = shutil.copytree(photos, photos.parent / "backup")
    shutil.rmtree(photos)
    photos.mkdir()  # the mount point left behind when the drive is unmounted
    report = index([], bundle, encoder)
    assert (report.removed, report.kept, report.rows) == (0, 3, 3)
    kept = "3 indexed images kept: is empty now (a drive that is not mounted?); 'clipgrep index --prune' drops them"
    assert report.scan_problems == [(str(photos), kept)]

    shutil.rmtree(photos)
    shutil.copytree(backup, photos)  # mounted again: nothing to encode
    report = index([], bundle, encoder)
    assert (report.encoded, report.removed, report.kept, report.unchanged) == (0, 0, 0, 3)

    for path in photos.iterdir():
        path.unlink()
    assert index([], bundle, encoder, prune=True).removed == 3


def test_a_root_on_another_device_keeps_its_rows_and_its_device_until_prune(bundle, photos: Path) -> None:
    index(photos, bundle)
    real = os.stat(photos).st_dev
    assert load_tracked(index_dir())[0][str(photos)].device == real
    set_recorded_device(photos, real + 1)  # as if indexed on a drive that is not mounted there now
    (photos / "red.png").unlink()
    report = index([], bundle)
    assert (report.removed, report.kept, report.rows) == (0, 1, 3)
    assert "is on another device than when it was indexed" in report.scan_problems[0][1]
    assert load_tracked(index_dir())[0][str(photos)].device == real + 1  # still suspect next time

    report = index([], bundle, prune=True)
    assert (report.removed, report.rows) == (1, 2)
    assert load_tracked(index_dir())[0][str(photos)].device == real


def test_a_device_change_with_nothing_gone_is_recorded_quietly(bundle, photos: Path) -> None:
    index(photos, bundle)
    set_recorded_device(photos, os.stat(photos).st_dev + 1)  # e.g. a network share mounted again
    report = index([], bundle)
    assert (report.kept, report.scan_problems) == (0, [])
    assert load_tracked(index_dir())[0][str(photos)].device == os.stat(photos).st_dev


def test_a_remembered_file_on_an_unmounted_drive_keeps_its_row(bundle, tmp_path: Path) -> None:
    picture = write_image(tmp_path / "usb" / "red.png", RED)
    index(picture, bundle)
    set_recorded_device(picture, os.stat(picture).st_dev + 1)
    picture.unlink()
    report = index([], bundle)
    assert (report.removed, report.rows) == (0, 1)
    assert report.scan_problems[0][0] == str(picture) and "unmounted" in report.scan_problems[0][1]
    assert remembered_files() == [str(picture)]


def test_cli_warns_in_one_line_for_an_unmounted_root(bundle, photos: Path) -> None:
    assert cli("index", str(photos), "--model", "tiny").exit_code == 0
    for path in photos.iterdir():
        path.unlink()
    result = cli("index", "--model", "tiny")
    assert result.exit_code == 0
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    kept = "3 indexed images kept: is empty now (a drive that is not mounted?); 'clipgrep index --prune' drops them"
    assert warnings == [f"  warning: {photos}: {kept}"]


# --- item 4: skipped files are listed --------------------------------------------------------------


def test_status_skipped_lists_files_skipped_by_earlier_runs(bundle, bad_files: Path) -> None:
    index(bad_files, bundle)
    expected = [("empty file", "empty.jpg"), ("not an image", "notes.png"),
                ("truncated or corrupt image", "truncated.jpg")]
    result = cli("status", "--skipped", "--model", "tiny")
    assert result.exit_code == 0 and result.stderr == ""
    assert result.stdout == "".join(f"{reason}\t{bad_files / name}\n" for reason, name in expected)

    lines = cli("status", "--skipped", "--json", "--model", "tiny").stdout.splitlines()
    objects = [json.loads(line) for line in lines]
    assert [(o["reason"], o["path"]) for o in objects] == [(r, str(bad_files / n)) for r, n in expected]
    assert objects[0]["size"] == 0

    null = cli("status", "--skipped", "-0", "--model", "tiny").stdout
    assert null.split("\0")[:-1] == [f"{reason}\t{bad_files / name}" for reason, name in expected]
    assert cli("status", "-0", "--model", "tiny").exit_code == 2


def test_index_verbose_lists_every_file_skipped_now(bundle, bad_files: Path) -> None:
    index(bad_files, bundle)
    result = cli("index", "--model", "tiny", "--verbose")  # nothing new is skipped in this run
    assert result.exit_code == 0, result.stderr
    listed = [line for line in result.stderr.splitlines() if line.startswith("  skipped ")]
    assert listed == [f"  skipped {bad_files / 'empty.jpg'}: empty file",
                      f"  skipped {bad_files / 'notes.png'}: not an image",
                      f"  skipped {bad_files / 'truncated.jpg'}: truncated or corrupt image"]
