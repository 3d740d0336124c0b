"""Thumbnails for previews and the web page, cached as WebP under the platform cache dir.

A cache entry is named by a hash of (path bytes, size, mtime_ns, side, version), taken from a
fresh ``os.stat`` of the file: an edited, replaced or deleted file can never be shown with an
old picture, whatever the index says. Decoding is cheap: ``draft`` lets libjpeg decode at 1/2,
1/4 or 1/8 scale, and it must come *before* ``exif_transpose`` (which loads the full image).

Example::

    cache = ThumbnailCache()
    webp = cache.webp("/photos/a.jpg", 256)          # bytes; generated once, then read back
    webp = cache.webp("/photos/a.jpg", 256, expect=(size, mtime_ns))   # StaleFile if it changed
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

# The web page's grid size, and what `clipgrep index --thumbnails` makes.
GRID_SIDE = 256
# Bump when the pipeline below changes what a thumbnail looks like: old entries are then ignored.
THUMB_VERSION = 1
WEBP_QUALITY = 80


class StaleFile(LookupError):
    """The file on disk is not the one the caller expected (changed since it was indexed)."""


class ThumbnailCache:
    def __init__(self, directory: Path | None = None) -> None:
        if directory is None:
            from .paths import cache_dir

            directory = cache_dir() / "thumbs"
        self.directory = directory

    def entry(self, path: str, size: int, mtime_ns: int, side: int) -> Path:
        """Where the thumbnail of this version of ``path`` lives (it may not exist yet)."""
        key = hashlib.sha256(b"\0".join([os.fsencode(path), str(size).encode(), str(mtime_ns).encode(),
                                         str(side).encode(), str(THUMB_VERSION).encode()])).hexdigest()
        return self.directory / key[:2] / f"{key}.webp"

    def webp(self, path: str, side: int, expect: tuple[int, int] | None = None) -> bytes:
        """The WebP thumbnail (longest edge <= ``side``) of ``path`` as it is now on disk.

        Raises OSError if the file is gone or unreadable, StaleFile if ``expect`` (size, mtime_ns)
        no longer matches it, and PIL's errors for undecodable files.
        """
        version = _version(path)
        if expect is not None and version != tuple(expect):
            raise StaleFile(path)
        entry = self.entry(path, *version, side)
        try:
            return entry.read_bytes()
        except FileNotFoundError:
            pass
        data = encode_webp(make_thumbnail(path, side))
        if _version(path) == version:  # the file did not change while we decoded it
            _write_atomically(entry, data)
        return data

    def fill(self, files: Iterable[tuple[str, int, int]], side: int, workers: int | None = None) -> tuple[int, int]:
        """Make the missing thumbnails of (path, size, mtime_ns) files; returns (ready, failed).

        Threads suffice: Pillow decodes and encodes with the GIL released.
        """
        from concurrent.futures import ThreadPoolExecutor

        def one(file: tuple[str, int, int]) -> bool:
            try:
                self.webp(file[0], side, expect=(file[1], file[2]))
                return True
            except Exception:  # noqa: BLE001  (changed, gone or undecodable: the page shows it without)
                return False

        with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
            done = list(pool.map(one, files))
        return sum(done), len(done) - sum(done)

    def image(self, path: str, side: int) -> Image.Image:
        """The cached thumbnail as a PIL image (for terminal previews)."""
        from PIL import Image

        return Image.open(io.BytesIO(self.webp(path, side)))


def make_index_thumbnails(index_id: str, workers: int | None = None) -> tuple[int, int]:
    """Thumbnails for every indexed file of a model, as the page shows them (``index --thumbnails``)."""
    from .index.freshness import current_snapshot
    from .paths import snapshot_dir

    snap = current_snapshot(snapshot_dir(index_id))
    if snap is None:
        return 0, 0
    return ThumbnailCache().fill(zip(snap.paths, snap.sizes.tolist(), snap.mtimes_ns.tolist()), GRID_SIDE, workers)


def make_thumbnail(path: str, side: int) -> Image.Image:
    """Decode ``path`` at reduced size, apply its EXIF orientation, fit it in side x side, as RGB(A)."""
    from PIL import Image, ImageOps

    from .embed.formats import open_image
    from .index.regular_file import open_regular

    # The indexer's own way in: only regular files (a FIFO named like a photo never hangs the page),
    # only the formats clipgrep decodes (never a plugin that runs a program), HEIC via pillow-heif.
    file, _ = open_regular(path)
    with file, open_image(file) as source:
        source.draft("RGB", (side, side))  # JPEG: decode at the smallest 1/2^k scale still >= side
        im = ImageOps.exif_transpose(source)
        im.thumbnail((side, side), Image.Resampling.LANCZOS, reducing_gap=2.0)
        return im.convert("RGBA" if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info else "RGB")


def encode_webp(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="WEBP", quality=WEBP_QUALITY, method=4)
    return out.getvalue()


def _version(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _write_atomically(entry: Path, data: bytes) -> None:
    """Readers see the whole file or none; a failed write (disk full, read-only cache) is not an error."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=".tmp-", suffix=".webp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, entry)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass
