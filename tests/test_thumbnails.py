"""The thumbnail cache: reduced-size decode, EXIF orientation, never a stale picture."""
from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image

from clipgrep.thumbnails import StaleFile, ThumbnailCache


def _jpeg(path: Path, size: tuple[int, int], colour: str, orientation: int | None = None) -> Path:
    im = Image.new("RGB", size, colour)
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    im.save(path, "JPEG", exif=exif.tobytes())
    return path


def _decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    assert im.format == "WEBP"
    return im.convert("RGB")


def test_thumbnail_fits_the_side_and_applies_exif_orientation(tmp_path: Path) -> None:
    photo = _jpeg(tmp_path / "a.jpg", (400, 200), "red", orientation=6)  # 6: rotate 90 degrees to display
    im = _decode(ThumbnailCache(tmp_path / "cache").webp(str(photo), 64))
    assert im.size == (32, 64)  # portrait after the rotation, longest edge 64
    r, g, b = im.getpixel((16, 32))
    assert r > 200 and g < 60 and b < 60


def test_jpeg_is_decoded_at_reduced_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    photo = _jpeg(tmp_path / "big.jpg", (2048, 1024), "blue")
    loaded: list[tuple[int, int]] = []
    real_transpose = __import__("PIL.ImageOps", fromlist=["x"]).exif_transpose

    def spy(im: Image.Image, **kw: object) -> Image.Image:
        loaded.append(im.size)  # after draft, before the full load: the size libjpeg will decode at
        return real_transpose(im)

    monkeypatch.setattr("PIL.ImageOps.exif_transpose", spy)
    ThumbnailCache(tmp_path / "cache").webp(str(photo), 128)
    assert loaded == [(256, 128)]  # 1/8 scale, not 2048x1024


def test_second_request_is_served_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    photo = _jpeg(tmp_path / "a.jpg", (100, 100), "green")
    cache = ThumbnailCache(tmp_path / "cache")
    first = cache.webp(str(photo), 64)
    monkeypatch.setattr("clipgrep.thumbnails.make_thumbnail", lambda *a: pytest.fail("decoded again"))
    assert cache.webp(str(photo), 64) == first
    assert len(list((tmp_path / "cache").rglob("*.webp"))) == 1


def test_a_changed_file_never_gets_its_old_thumbnail(tmp_path: Path) -> None:
    photo = _jpeg(tmp_path / "a.jpg", (100, 100), "red")
    cache = ThumbnailCache(tmp_path / "cache")
    cache.webp(str(photo), 64)
    st = os.stat(photo)
    _jpeg(photo, (100, 100), "blue")
    os.utime(photo, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # even a 1 ns newer mtime is a new version
    r, _, b = _decode(cache.webp(str(photo), 64)).getpixel((32, 32))
    assert b > 200 and r < 60


def test_expect_refuses_a_file_that_changed_since_indexing(tmp_path: Path) -> None:
    photo = _jpeg(tmp_path / "a.jpg", (100, 100), "red")
    st = os.stat(photo)
    cache = ThumbnailCache(tmp_path / "cache")
    assert cache.webp(str(photo), 64, expect=(st.st_size, st.st_mtime_ns))
    with pytest.raises(StaleFile):
        cache.webp(str(photo), 64, expect=(st.st_size, st.st_mtime_ns - 1))
    photo.unlink()
    with pytest.raises(FileNotFoundError):
        cache.webp(str(photo), 64)


def test_transparency_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "t.png"
    Image.new("RGBA", (50, 50), (255, 0, 0, 0)).save(path)
    im = Image.open(io.BytesIO(ThumbnailCache(tmp_path / "cache").webp(str(path), 32)))
    assert im.mode == "RGBA" and im.getpixel((5, 5))[3] == 0


def test_index_thumbnails_fills_the_cache_for_the_page(tmp_path: Path, clipgrep_home: Path) -> None:
    from typer.testing import CliRunner

    from clipgrep.cli import app
    from clipgrep.models import add_model
    from clipgrep.thumbnails import GRID_SIDE

    from .factories import make_contract_bundle

    add_model("tiny", checkpoint=make_contract_bundle(tmp_path / "bundle"))
    photos = [_jpeg(tmp_path / "pics" / f"{c}.jpg", (300, 200), c) for c in ("red", "green", "blue")
              if (tmp_path / "pics").mkdir(exist_ok=True) is None]
    result = CliRunner().invoke(app, ["index", str(tmp_path / "pics"), "--model", "tiny", "--thumbnails",
                                      "--workers", "0"])
    assert result.exit_code == 0, result.stderr
    assert "3 thumbnails ready" in result.stderr
    cache = ThumbnailCache()
    assert cache.directory == clipgrep_home / "cache" / "thumbs"
    for photo in photos:
        st = os.stat(photo)
        assert cache.entry(str(photo), st.st_size, st.st_mtime_ns, GRID_SIDE).exists()


def test_thumbnails_open_only_regular_files_in_supported_formats(tmp_path: Path) -> None:
    """The page serves indexed rows, but the file behind a row can be swapped: the thumbnailer opens
    files the way the indexer does (no FIFO hang, no EPS handed to Ghostscript)."""
    from clipgrep.embed.formats import UnsupportedImageFormat
    from clipgrep.index.regular_file import NotRegularFile
    from clipgrep.thumbnails import make_thumbnail

    eps = tmp_path / "holiday.jpg"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(UnsupportedImageFormat):
        make_thumbnail(str(eps), 64)
    fifo = tmp_path / "pipe.jpg"  # after the EPS: Pillow's own open blocks on a FIFO for ever
    os.mkfifo(fifo)
    with pytest.raises(NotRegularFile):
        make_thumbnail(str(fifo), 64)
