"""A full disk and a read-only home: one line saying what happened, exit 2, and search keeps working.

The real cases need root to mount a small tmpfs and a read-only bind mount (CI runs as root);
elsewhere they are skipped with the reason.
"""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clipgrep import models
from clipgrep.cli import app
from clipgrep.cli_errors import storage_error

from . import test_index
from .test_index import BLUE, GREEN, PLAIN, RED, YELLOW, age, write_image

bundle_source = test_index.bundle_source  # the fixture


def cli(*args: str):
    return CliRunner().invoke(app, list(args), env=PLAIN)


def mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], check=False, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here (mount {' '.join(args)}: {done.stderr.strip() or done.returncode})")


@pytest.fixture
def mounts():
    """Mount points to unmount after the test, most recent first."""
    points: list[Path] = []
    yield points
    for point in reversed(points):
        subprocess.run(["umount", "-l", str(point)], check=False, capture_output=True)


def one_error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("clipgrep: error: "), result.stderr
    assert "internal error" not in result.stderr and ".rs:" not in result.stderr
    return result.stderr


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    age(write_image(root / "red.png", RED), write_image(root / "green.png", GREEN), write_image(root / "blue.png", BLUE))
    return root


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError as e:
                assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_is_one_line_and_search_still_works(tmp_path: Path, photos: Path, bundle_source: Path,
                                                        mounts: list, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    mount("-t", "tmpfs", "-o", "size=12m", "tmpfs", str(disk))
    mounts.append(disk)
    monkeypatch.setenv("CLIPGREP_HOME", str(disk / "home"))
    models.add_model("tiny", checkpoint=bundle_source)
    assert cli("index", str(photos), "--model", "tiny").exit_code == 0
    shutil.rmtree(disk / "home" / "cache", ignore_errors=True)  # so search has to build it on a full disk

    filler = fill(disk)
    write_image(photos / "yellow.png", YELLOW)
    assert f"no space left on {disk}" in one_error_line(cli("index", "--model", "tiny"))
    found = cli("search", "a photo", "--model", "tiny", "--paths")
    assert found.exit_code == 0 and found.stderr == ""
    assert sorted(found.stdout.split()) == sorted(str(photos / f"{c}.png") for c in ("blue", "green", "red"))

    filler.unlink()
    assert cli("index", "--model", "tiny").exit_code == 0
    found = cli("search", "a photo", "--model", "tiny", "--paths", "-k", "10")
    assert len(found.stdout.split()) == 4


def test_a_read_only_home_is_one_line_and_search_still_works(clipgrep_home: Path, photos: Path,
                                                             bundle_source: Path, mounts: list) -> None:
    models.add_model("tiny", checkpoint=bundle_source)
    assert cli("index", str(photos), "--model", "tiny").exit_code == 0
    shutil.rmtree(clipgrep_home / "cache", ignore_errors=True)
    mount("--bind", str(clipgrep_home), str(clipgrep_home))
    mounts.append(clipgrep_home)
    mount("-o", "remount,ro,bind", str(clipgrep_home))

    write_image(photos / "yellow.png", YELLOW)
    assert f"{clipgrep_home} is read-only" in one_error_line(cli("index", "--model", "tiny"))
    assert f"{clipgrep_home} is read-only" in one_error_line(cli("forget", str(photos)))
    found = cli("search", "a photo", "--model", "tiny", "--paths")
    assert found.exit_code == 0 and found.stderr == ""
    assert len(found.stdout.split()) == 3


def test_lancedb_io_errors_are_recognised_through_their_text_and_causes(clipgrep_home: Path) -> None:
    rust = OSError("LanceError(IO): Generic LocalFileSystem error: Unable to write: "
                   "No space left on device (os error 28), /home/runner/lance/rust/encodings/structural.rs:258:30")
    error = storage_error(rust)
    assert error is not None and error.message.startswith("no space left on /")
    try:
        try:
            raise PermissionError(errno.EACCES, "Permission denied", str(clipgrep_home / "index" / ".lock"))
        except OSError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        error = storage_error(outer)
    assert error is not None and error.message == f"permission denied: {clipgrep_home / 'index' / '.lock'}"
    assert storage_error(ValueError("a bug")) is None
    assert storage_error(FileNotFoundError(errno.ENOENT, "No such file", "/x")) is None
