"""The indexer's filesystem walk: what it finds, what it skips, and how it fails."""
from __future__ import annotations

import errno
import itertools
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clipgrep.errors import ClipgrepError
from clipgrep.index.scan import (
    DEFAULT_EXCLUDES,
    IGNORE_FILE,
    IGNORE_FILE_MAX_BYTES,
    PROGRESS_EVERY,
    ScanOptions,
    ScanProblem,
    ScanResult,
    scan,
)

from .hostile import deadline


def touch(root: Path, *names: str, data: bytes = b"") -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def many(tmp_path: Path, folders: list[str], per_folder: int, name: str = "IMG_{:04}.jpg") -> Path:
    """Lots of empty files under ``tmp_path/tree``, as hard links to one file: on a busy disk
    creating an inode can take a millisecond, a link a fiftieth of that; the scan cannot tell."""
    source = tmp_path / "many-source"
    source.touch()
    tree = tmp_path / "tree"
    for relative in folders:
        folder = tree / relative
        folder.mkdir(parents=True)
        for i in range(per_folder):
            os.link(source, folder / name.format(i))
    return tree


def found(result: ScanResult, root: Path) -> list[str]:
    """Found files relative to ``root``, with "/" separators, in result order."""
    return [os.path.relpath(entry.path, root).replace(os.sep, "/") for entry in result.files]


def problems(result: ScanResult, root: Path) -> set[tuple[str, str]]:
    return {(os.path.relpath(p.path, root), p.reason) for p in result.problems}


@pytest.fixture
def listed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every directory the scan opens, to prove that excluded directories are pruned."""
    opened: list[str] = []
    real_scandir = os.scandir

    def spy(path: str) -> Iterator[os.DirEntry[str]]:
        opened.append(os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", spy)
    return opened


# --- what counts as an image ----------------------------------------------------------------


def test_extensions_match_case_insensitively_and_other_files_are_ignored(tmp_path: Path) -> None:
    touch(tmp_path, "IMG_0001.JPG", "photo.Jpeg", "scan.TIFF", "a.png", "b.heic", "notes.txt",
          "no_extension", "archive.jpg.zip", "jpg", "sub/deep/c.webp")
    result = scan([tmp_path])
    assert found(result, tmp_path) == ["IMG_0001.JPG", "a.png", "b.heic", "photo.Jpeg", "scan.TIFF",
                                       "sub/deep/c.webp"]
    assert result.problems == [] and result.excluded == 0


def test_entries_carry_absolute_path_size_and_mtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    touch(tmp_path, "a/x.jpg", data=b"12345")
    monkeypatch.chdir(tmp_path)
    (entry,) = scan(["a/../a"]).files  # relative roots are made absolute and normalised
    st = os.stat(tmp_path / "a" / "x.jpg")
    assert entry.path == str(tmp_path / "a" / "x.jpg")
    assert (entry.size, entry.mtime_ns) == (5, st.st_mtime_ns)


def test_custom_extensions_are_normalised(tmp_path: Path) -> None:
    touch(tmp_path, "a.PNG", "b.jpg", "c.raw")
    result = scan([tmp_path], ScanOptions(extensions=frozenset({".PNG", "raw"})))
    assert found(result, tmp_path) == ["a.PNG", "c.raw"]


def test_fifo_named_like_an_image_is_not_a_file(tmp_path: Path) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    os.mkfifo(tmp_path / "pipe.jpg")
    touch(tmp_path, "real.jpg")
    result = scan([tmp_path])
    assert found(result, tmp_path) == ["real.jpg"]
    assert problems(result, tmp_path) == {("pipe.jpg", "not a regular file")}  # said, not silently dropped


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_link_to_a_device_named_like_an_image_is_not_a_file(tmp_path: Path) -> None:
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    touch(tmp_path, "real.jpg")
    result = scan([tmp_path], ScanOptions(follow_symlinks=True))
    assert found(result, tmp_path) == ["real.jpg"]
    assert problems(result, tmp_path) == {("zero.jpg", "not a regular file")}
    default = scan([tmp_path])  # links are not followed at all by default
    assert (found(default, tmp_path), default.problems, default.excluded) == (["real.jpg"], [], 1)


# --- --exclude patterns ----------------------------------------------------------------------


def test_exclude_file_glob(tmp_path: Path) -> None:
    touch(tmp_path, "a.jpg", "a.tmp.jpg", "sub/b.tmp.jpg", "sub/b.jpg")
    result = scan([tmp_path], ScanOptions(excludes=("*.tmp.jpg",)))
    assert found(result, tmp_path) == ["a.jpg", "sub/b.jpg"]
    assert result.excluded == 2


def test_exclude_directory_pattern_prunes_without_listing(tmp_path: Path, listed: list[str]) -> None:
    touch(tmp_path, "keep/a.jpg", "trash/b.jpg", "x/trash/c.jpg", "x/trash/deeper/d.jpg", "trash.jpg")
    result = scan([tmp_path], ScanOptions(excludes=("trash/",)))
    # "trash/" names directories only, so the file trash.jpg stays.
    assert found(result, tmp_path) == ["keep/a.jpg", "trash.jpg"]
    assert not [p for p in listed if "trash" in p]
    assert result.excluded == 2


def test_exclude_anchored_pattern_only_matches_at_the_root(tmp_path: Path) -> None:
    touch(tmp_path, "top.jpg", "sub/top.jpg", "raw/a.jpg", "sub/raw/b.jpg", "sub/exports/c.jpg",
          "exports/d.jpg")
    opts = ScanOptions(excludes=("/top.jpg", "/raw/", "sub/exports/"))
    assert found(scan([tmp_path], opts), tmp_path) == ["exports/d.jpg", "sub/raw/b.jpg", "sub/top.jpg"]


def test_exclude_negation_reincludes_a_file(tmp_path: Path) -> None:
    touch(tmp_path, "a.png", "keep.png", "sub/keep.png", "c.jpg")
    result = scan([tmp_path], ScanOptions(excludes=("*.png", "!keep.png")))
    assert found(result, tmp_path) == ["c.jpg", "keep.png", "sub/keep.png"]


def test_a_bare_string_is_one_root_and_one_pattern(tmp_path: Path) -> None:
    touch(tmp_path, "a.png", "b.jpg")
    result = scan(str(tmp_path), ScanOptions(excludes="*.png"))  # type: ignore[arg-type]
    assert found(result, tmp_path) == ["b.jpg"]


def test_excludes_are_relative_to_each_root(tmp_path: Path) -> None:
    touch(tmp_path, "one/raw/a.jpg", "two/raw/b.jpg", "two/c.jpg")
    result = scan([tmp_path / "one", tmp_path / "two"], ScanOptions(excludes=("/raw/",)))
    assert found(result, tmp_path) == ["two/c.jpg"]


def test_invalid_exclude_pattern_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(ClipgrepError) as info:
        scan([tmp_path], ScanOptions(excludes=("!",)))
    assert "--exclude" in info.value.message and info.value.hint


# --- .clipgrepignore -------------------------------------------------------------------------


def test_ignore_file_applies_to_its_directory_and_below_only(tmp_path: Path) -> None:
    touch(tmp_path, "a/x.png", "a/keep.png", "a/sub/y.png", "a/local.jpg", "a/sub/local.jpg",
          "b/z.png", "local.jpg")
    (tmp_path / "a" / IGNORE_FILE).write_text("# previews\n*.png\n!keep.png\n/local.jpg\n")
    result = scan([tmp_path])
    assert found(result, tmp_path) == ["a/keep.png", "a/sub/local.jpg", "b/z.png", "local.jpg"]
    assert result.excluded == 3


def test_ignore_file_directory_pattern_prunes(tmp_path: Path, listed: list[str]) -> None:
    touch(tmp_path, "a/cache/x.jpg", "a/ok.jpg", "cache/y.jpg")
    (tmp_path / "a" / IGNORE_FILE).write_text("cache/\n")
    assert found(scan([tmp_path]), tmp_path) == ["a/ok.jpg", "cache/y.jpg"]
    assert str(tmp_path / "a" / "cache") not in listed


def test_deeper_ignore_file_overrides_shallower_and_defaults(tmp_path: Path) -> None:
    touch(tmp_path, "a.gif", "sub/b.gif", "sub/node_modules/c.jpg", "node_modules/d.jpg")
    (tmp_path / IGNORE_FILE).write_text("*.gif\n")
    (tmp_path / "sub" / IGNORE_FILE).write_text("!*.gif\n!node_modules/\n")
    assert found(scan([tmp_path]), tmp_path) == ["sub/b.gif", "sub/node_modules/c.jpg"]


def test_exclude_option_overrides_ignore_files(tmp_path: Path) -> None:
    touch(tmp_path, "a.png", "b.png")
    (tmp_path / IGNORE_FILE).write_text("!a.png\n")
    assert found(scan([tmp_path], ScanOptions(excludes=("*.png",))), tmp_path) == []


def test_invalid_line_in_ignore_file_is_a_problem_and_the_rest_applies(tmp_path: Path) -> None:
    touch(tmp_path, "a.png", "b.jpg")
    (tmp_path / IGNORE_FILE).write_text("*.png\n!\n")
    result = scan([tmp_path])
    assert found(result, tmp_path) == ["b.jpg"]
    assert problems(result, tmp_path) == {(IGNORE_FILE, "invalid pattern '!' ignored")}


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"), reason="POSIX only")
def test_hostile_ignore_file_is_a_problem_not_a_hang(tmp_path: Path) -> None:
    # A FIFO would block the open forever; a link to /dev/zero would be read without end.
    touch(tmp_path, "fifo/a.jpg", "zero/b.jpg", "huge/c.jpg", "fine.jpg")
    os.mkfifo(tmp_path / "fifo" / IGNORE_FILE)
    (tmp_path / "zero" / IGNORE_FILE).symlink_to("/dev/zero")
    (tmp_path / "huge" / IGNORE_FILE).write_bytes(b"#" * (IGNORE_FILE_MAX_BYTES + 1))
    with deadline(20):
        result = scan([tmp_path])
    assert found(result, tmp_path) == ["fifo/a.jpg", "fine.jpg", "huge/c.jpg", "zero/b.jpg"]
    assert problems(result, tmp_path) == {(f"fifo/{IGNORE_FILE}", "not a regular file"),
                                          (f"zero/{IGNORE_FILE}", "not a regular file"),
                                          (f"huge/{IGNORE_FILE}", "too large for a pattern file")}


# --- defaults: hidden files and junk directories ---------------------------------------------


def test_default_excludes_prune_junk_directories(tmp_path: Path, listed: list[str]) -> None:
    junk = [".git/objects/a.png", "node_modules/pkg/logo.png", "web/node_modules/b.png",
            "@eaDir/IMG_1.JPG/SYNOFILE_THUMB_XL.jpg", "2020/@eaDir/c.jpg", "#recycle/d.jpg",
            "$RECYCLE.BIN/e.jpg", "#snapshot/x.jpg", ".Trash-1000/files/f.jpg",
            "Lightroom Catalog Previews.lrdata/0/g.jpg",
            "__MACOSX/2020/._h.jpg", "__pycache__/i.png", ".cache/j.png",
            "Photos Library.photoslibrary/resources/derivatives/k.jpg"]
    touch(tmp_path, "2020/IMG_1.JPG", "Photos Library.photoslibrary/originals/l.jpg", *junk)
    # include_hidden, so .git and .Trash-1000 are kept out by the defaults, not the hidden rule.
    result = scan([tmp_path], ScanOptions(include_hidden=True))
    assert found(result, tmp_path) == ["2020/IMG_1.JPG", "Photos Library.photoslibrary/originals/l.jpg"]
    assert not [p for p in listed if "node_modules" in p or "@eaDir" in p or ".git" in p]
    assert result.excluded == len(junk)


def test_default_excludes_are_directory_patterns(tmp_path: Path) -> None:
    # A file that happens to share a junk directory's name is not junk.
    assert all(p.endswith("/") for p in DEFAULT_EXCLUDES)
    touch(tmp_path, "node_modules.png")
    assert found(scan([tmp_path]), tmp_path) == ["node_modules.png"]


def test_hidden_files_and_dirs_skipped_unless_asked(tmp_path: Path) -> None:
    touch(tmp_path, "a.jpg", ".b.jpg", ".album/c.jpg", "sub/.d.png", "._e.jpg", ".notes")
    off = scan([tmp_path])
    assert found(off, tmp_path) == ["a.jpg"]
    assert off.excluded == 4  # .b.jpg, .album, sub/.d.png, ._e.jpg (.notes is no image)
    on = scan([tmp_path], ScanOptions(include_hidden=True))
    # AppleDouble "._" files are resource forks, never images, so they stay out.
    assert found(on, tmp_path) == [".album/c.jpg", ".b.jpg", "a.jpg", "sub/.d.png"]


def test_hidden_root_is_not_hidden(tmp_path: Path) -> None:
    root = tmp_path / ".photos"
    touch(root, "a.jpg", ".hidden/b.jpg")
    touch(tmp_path, ".single.jpg")
    assert found(scan([root]), root) == ["a.jpg"]
    assert found(scan([tmp_path / ".single.jpg"]), tmp_path) == [".single.jpg"]


# --- symlinks --------------------------------------------------------------------------------


@pytest.fixture
def linked_tree(tmp_path: Path) -> Path:
    """root/real/a.jpg, root/link.jpg -> real/a.jpg, root/album -> real, root/outside -> ../elsewhere."""
    root = tmp_path / "root"
    touch(root, "real/a.jpg")
    touch(tmp_path, "elsewhere/b.jpg")
    (root / "link.jpg").symlink_to(root / "real" / "a.jpg")
    (root / "album").symlink_to(root / "real", target_is_directory=True)
    (root / "outside").symlink_to(Path("..") / "elsewhere", target_is_directory=True)
    return root


def test_symlinks_are_skipped_by_default(linked_tree: Path) -> None:
    result = scan([linked_tree])
    assert found(result, linked_tree) == ["real/a.jpg"]
    assert result.excluded == 3 and result.problems == []


def test_symlinks_followed_when_asked_without_duplicates(linked_tree: Path) -> None:
    result = scan([linked_tree], ScanOptions(follow_symlinks=True))
    # link.jpg and album/a.jpg are the same file as real/a.jpg, which keeps its real path
    # even though "album" and "link.jpg" sort first.
    assert found(result, linked_tree) == ["outside/b.jpg", "real/a.jpg"]
    assert result.problems == []


def test_symlink_loop_terminates_with_a_problem(tmp_path: Path) -> None:
    touch(tmp_path, "a/x.jpg")
    (tmp_path / "a" / "up").symlink_to("..", target_is_directory=True)
    (tmp_path / "self.jpg").symlink_to("self.jpg")
    result = scan([tmp_path], ScanOptions(follow_symlinks=True))
    assert found(result, tmp_path) == ["a/x.jpg"]
    assert problems(result, tmp_path) == {("a/up", "symlink loop"), ("self.jpg", "symlink loop")}


def test_mutual_symlinks_between_outside_dirs_terminate(tmp_path: Path) -> None:
    touch(tmp_path, "p/a.jpg", "q/b.jpg", "root/c.jpg")
    (tmp_path / "p" / "to_q").symlink_to(tmp_path / "q", target_is_directory=True)
    (tmp_path / "q" / "to_p").symlink_to(tmp_path / "p", target_is_directory=True)
    (tmp_path / "root" / "p").symlink_to(tmp_path / "p", target_is_directory=True)
    root = tmp_path / "root"
    result = scan([root], ScanOptions(follow_symlinks=True))
    assert found(result, root) == ["c.jpg", "p/a.jpg", "p/to_q/b.jpg"]
    assert problems(result, root) == {("p/to_q/to_p", "symlink loop")}


def test_broken_symlink(tmp_path: Path) -> None:
    touch(tmp_path, "ok.jpg")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    (tmp_path / "gone.txt").symlink_to(tmp_path / "missing.txt")  # not an image: nobody cares
    followed = scan([tmp_path], ScanOptions(follow_symlinks=True))
    assert found(followed, tmp_path) == ["ok.jpg"]
    assert problems(followed, tmp_path) == {("gone.jpg", "broken symlink")}
    default = scan([tmp_path])
    assert default.problems == [] and default.excluded == 1


def test_symlinked_root_keeps_its_spelling(tmp_path: Path) -> None:
    touch(tmp_path, "real/a.jpg")
    (tmp_path / "alias").symlink_to(tmp_path / "real", target_is_directory=True)
    (entry,) = scan([tmp_path / "alias"]).files
    assert entry.path == str(tmp_path / "alias" / "a.jpg")


# --- awkward names ---------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="needs a filesystem that stores raw bytes")
def test_non_utf8_name_survives_as_surrogate_escape(tmp_path: Path) -> None:
    raw = os.path.join(os.fsencode(tmp_path), b"caf\xe9.jpg")
    os.close(os.open(raw, os.O_CREAT | os.O_WRONLY, 0o644))
    (entry,) = scan([tmp_path]).files
    assert isinstance(entry.path, str) and entry.path.endswith("caf\udce9.jpg")
    assert os.fsencode(entry.path) == raw
    assert os.stat(entry.path).st_size == 0


@pytest.mark.skipif(sys.platform == "win32", reason="newlines are not allowed in Windows file names")
def test_newline_in_name(tmp_path: Path) -> None:
    touch(tmp_path, "two\nlines.jpg", "plain.jpg")
    assert found(scan([tmp_path]), tmp_path) == ["plain.jpg", "two\nlines.jpg"]
    assert found(scan([tmp_path], ScanOptions(excludes=("two*.jpg",))), tmp_path) == ["plain.jpg"]


# --- roots -----------------------------------------------------------------------------------


def test_overlapping_roots_give_no_duplicates(tmp_path: Path) -> None:
    touch(tmp_path, "a.jpg", "sub/b.jpg", "sub/deep/c.jpg")
    for options in (ScanOptions(), ScanOptions(follow_symlinks=True)):
        result = scan([tmp_path / "sub", tmp_path, tmp_path / "sub" / "deep" / "c.jpg", tmp_path], options)
        assert found(result, tmp_path) == ["a.jpg", "sub/b.jpg", "sub/deep/c.jpg"]


def test_single_image_file_root(tmp_path: Path) -> None:
    touch(tmp_path, "one.PNG", "other.jpg")
    assert found(scan([tmp_path / "one.PNG"]), tmp_path) == ["one.PNG"]


def test_single_non_image_file_root_is_a_user_error(tmp_path: Path) -> None:
    touch(tmp_path, "notes.txt")
    with pytest.raises(ClipgrepError, match="neither a directory nor an image"):
        scan([tmp_path / "notes.txt"])


def test_missing_root_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(ClipgrepError) as info:
        scan([tmp_path / "nope"])
    assert "does not exist" in info.value.message and info.value.hint


def test_results_are_sorted_by_path(tmp_path: Path) -> None:
    touch(tmp_path, "b/z.jpg", "a.jpg", "B.jpg", "b/a.jpg", "a/c.jpg", "a b.jpg")
    paths = [entry.path for entry in scan([tmp_path]).files]
    assert paths == sorted(paths) and len(paths) == 6


# --- failures inside the tree ----------------------------------------------------------------


def test_unreadable_directory_is_a_problem_and_the_rest_is_scanned(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    touch(tmp_path, "locked/a.jpg", "open/b.jpg", "c.jpg")
    locked = str(tmp_path / "locked")
    real_scandir = os.scandir

    def scandir(path: str) -> Iterator[os.DirEntry[str]]:
        if os.fspath(path) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    result = scan([tmp_path])
    assert found(result, tmp_path) == ["c.jpg", "open/b.jpg"]
    assert result.problems == [ScanProblem(locked, "permission denied")]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any directory")
def test_chmod_000_directory_is_a_problem(tmp_path: Path) -> None:
    touch(tmp_path, "locked/a.jpg", "b.jpg")
    (tmp_path / "locked").chmod(0)
    try:
        result = scan([tmp_path])
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert found(result, tmp_path) == ["b.jpg"]
    assert problems(result, tmp_path) == {("locked", "permission denied")}


class _VanishingEntry:
    """A DirEntry whose file disappears between the listing and the stat."""

    def __init__(self, entry: os.DirEntry[str]) -> None:
        self._entry = entry

    def __getattr__(self, name: str) -> object:
        return getattr(self._entry, name)

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", self._entry.path)


def test_failed_file_stat_is_a_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    touch(tmp_path, "gone.jpg", "ok.jpg")
    real_scandir = os.scandir

    class Listing:
        def __init__(self, path: str) -> None:
            self._it = real_scandir(path)

        def __enter__(self) -> Iterator[object]:
            entries = list(self._it)
            return iter(_VanishingEntry(e) if e.name == "gone.jpg" else e for e in entries)

        def __exit__(self, *exc: object) -> None:
            self._it.close()

    monkeypatch.setattr(os, "scandir", Listing)
    result = scan([tmp_path])
    assert found(result, tmp_path) == ["ok.jpg"]
    assert problems(result, tmp_path) == {("gone.jpg", "vanished during scan")}


# --- progress and speed ----------------------------------------------------------------------


def test_on_progress_reports_every_thousand_entries_and_at_the_end(tmp_path: Path) -> None:
    many(tmp_path, [f"d{d}" for d in range(5)], 250, "{}.jpg")
    tree = many(tmp_path, [f"other/d{d}" for d in range(5)], 250, "{}.txt")
    calls: list[int] = []
    result = scan([tree], on_progress=calls.append)
    total = 6 + 5 + 10 * 250  # directories are entries too: d0-d4 and other, then its d0-d4
    assert len(result.files) == 1250
    assert calls[-1] == total
    assert calls == sorted(calls)
    assert all(b - a >= PROGRESS_EVERY for a, b in itertools.pairwise(calls[:-1]))
    assert len(calls) == total // PROGRESS_EVERY + 1


def test_speed_sanity_20k_files(tmp_path: Path) -> None:
    """Not an assertion: prints the scan rate (see it with pytest -s)."""
    tree = many(tmp_path, [f"d{d:02}" for d in range(100)], 200)
    elapsed = float("inf")
    for _ in range(3):  # the first run warms the dentry cache; keep the best (2 shared cores)
        started = time.perf_counter()
        result = scan([tree])
        elapsed = min(elapsed, time.perf_counter() - started)
        assert len(result.files) == 20_000
    print(f"\nscan: 20,000 files in {elapsed * 1e3:.0f} ms = {20_000 / elapsed:,.0f} files/s")
