"""Hostile files in a photo folder, and as query terms: every run completes, each file is skipped
with its reason, the good images are indexed, and no external program runs.

The folder holds what an unlucky user or an attacker can leave next to photos: an EPS named
.jpg (Pillow would run Ghostscript on it), a FIFO and a link to /dev/zero named .jpg (one
blocks an open forever, the other reads without end), a decompression bomb, an image too
large to decode, one 10000 pixels wide and 1 high (it used to cost 2 GB to resize), a
truncated JPEG, an SVG named .png, an undecodable TIFF, an empty file and an unreadable one.
A fake ``gs`` first on PATH records any run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image
from typer.testing import CliRunner

from clipgrep.cli import app
from clipgrep.index.build import IndexOptions, update_index
from clipgrep.index.decode import CORRUPT
from clipgrep.index.plan import fingerprint
from clipgrep.index.scan import FileEntry, ScanResult

from . import test_index
from .fakes import FakeImageEncoder
from .hostile import (
    deadline,
    fake_ghostscript,
    path_with,
    write_blank_png,
    write_eps,
    write_svg,
    write_undecodable_tiff,
)

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"),
                                reason="FIFOs and /dev/zero are POSIX")

REPO_ROOT = Path(__file__).resolve().parents[1]
IS_ROOT = os.geteuid() == 0  # root reads a chmod 000 file
GOOD = ["good.jpg", "good.png", "wide.png"]
SKIPPED = {  # file -> the reason it is skipped at decode time
    "holiday.jpg": "unsupported image format (EPS)",
    "bomb.png": "too many pixels (400 MP > 200 MP)",
    "huge.png": "too many pixels to decode (36 MP > 32 MP)",
    "truncated.jpg": CORRUPT,
    "drawing.png": "not an image",
    "multipage.tif": "unsupported image format (a TIFF variant Pillow cannot open)",
    "empty.jpg": "empty file",
    **({} if IS_ROOT else {"secret.jpg": "unreadable: permission denied"}),
}
NOT_FILES = {"pipe.jpg": "not a regular file", "zero.jpg": "not a regular file"}  # found by the scan


def _photo(colour: tuple[int, int, int]) -> Image.Image:
    noise = np.random.default_rng(sum(colour)).integers(-20, 20, (96, 128, 3))
    return Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8))


def write_hostile_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    _photo((200, 30, 30)).save(root / "good.jpg", quality=90)
    _photo((30, 200, 30)).save(root / "good.png")
    Image.new("RGB", (10_000, 1), (30, 30, 200)).save(root / "wide.png")
    _photo((200, 200, 30)).save(root / "secret.jpg")
    (root / "secret.jpg").chmod(0)
    write_eps(root / "holiday.jpg")
    os.mkfifo(root / "pipe.jpg")
    (root / "zero.jpg").symlink_to("/dev/zero")
    write_blank_png(root / "bomb.png", 20_000, 20_000)
    write_blank_png(root / "huge.png", 6_000, 6_000)
    data = (root / "good.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    write_svg(root / "drawing.png")
    write_undecodable_tiff(root / "multipage.tif")
    (root / "empty.jpg").write_bytes(b"")
    return root


bundle_source, bundle = test_index.bundle_source, test_index.bundle  # the tiny contract bundle, installed


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_hostile_folder(tmp_path / "photos")


@pytest.fixture
def ghostscript(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake gs first on PATH, for this process and its children; returns the marker it writes."""
    bin_dir, marker = fake_ghostscript(tmp_path / "bin")
    monkeypatch.setenv("PATH", path_with(bin_dir))
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # Pillow caches where it found gs
    return marker


def test_index_run_over_hostile_files_completes(bundle, folder: Path, ghostscript: Path) -> None:
    # The real command in a fresh process, with decode workers: a hang fails here by timeout.
    result = subprocess.run(
        [sys.executable, "-m", "clipgrep", "index", str(folder), "--model", "tiny", "--workers", "2",
         "--follow-symlinks", "--json"],
        check=False, capture_output=True, text=True, cwd=REPO_ROOT, timeout=180, env={**os.environ, "NO_COLOR": "1"})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {Path(s["path"]).name: s["reason"] for s in report["skipped"]} == SKIPPED
    assert {Path(p["path"]).name: p["reason"] for p in report["scan_problems"]} == NOT_FILES
    assert report["rows"] == report["added"] == len(GOOD) + IS_ROOT
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr
    assert not ghostscript.exists(), ghostscript.read_text()


@pytest.mark.parametrize("name", sorted(set(SKIPPED) - {"secret.jpg"}))
def test_hostile_file_as_a_query_is_one_line_and_exit_2(bundle, folder: Path, ghostscript: Path,
                                                        tmp_path: Path, name: str) -> None:
    _photo((200, 30, 30)).save(tmp_path / "indexed.png")
    update_index([tmp_path / "indexed.png"], bundle=bundle, options=IndexOptions(workers=0),
                 encoder=FakeImageEncoder())
    result = CliRunner().invoke(app, ["search", "--model", "tiny", str(folder / name)],
                                env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"clipgrep: error: cannot use {folder / name} as a query image: {SKIPPED[name]}")
    assert not ghostscript.exists()


def test_file_swapped_for_a_fifo_after_the_scan_neither_hangs_nor_is_read(
        bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan saw regular files; by the time they are fingerprinted and decoded they are a FIFO and
    a link to /dev/zero (the race O_NONBLOCK and fstat close)."""
    root = tmp_path / "photos"
    root.mkdir()
    _photo((30, 200, 30)).save(root / "good.png")
    os.mkfifo(root / "pipe.jpg")
    (root / "zero.jpg").symlink_to("/dev/zero")
    seen_as_files = ScanResult([FileEntry(str(root / name), 4096, 1) for name in ("good.png", "pipe.jpg", "zero.jpg")])
    monkeypatch.setattr("clipgrep.index.build.scan", lambda *args, **kwargs: seen_as_files)
    with deadline(30):
        for name in ("pipe.jpg", "zero.jpg"):
            with pytest.raises(OSError, match="not a regular file"):
                fingerprint(str(root / name), 4096)
        report = update_index([root], bundle=bundle, options=IndexOptions(workers=0), encoder=FakeImageEncoder())
    assert {Path(s.path).name: s.reason for s in report.skipped} == dict.fromkeys(NOT_FILES, "not a regular file")
    assert report.added == 1
