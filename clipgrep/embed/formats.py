"""The image formats clipgrep reads, and the one way every image file is opened.

``FORMATS`` is the single list: the scanner's extensions come from it, and ``open_image``
passes it to ``Image.open(formats=...)``. Without that argument Pillow tries each of its ~40
plugins on any file, whatever its name, and some run programs: an EPS file named
``holiday.jpg`` makes the EPS plugin run Ghostscript (``gs``) on it when it is loaded.
Restricted to these formats, such a file is refused before any plugin but ours sees it.

Kept free of top-level PIL imports: the scanner and ``--help`` paths read the constants.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from PIL import ImageFile

# Pillow format id -> the file extensions that name it (content decides the format, so a
# PNG named .jpg still opens). Each of these plugins only parses bytes, in C or Python.
FORMATS: dict[str, tuple[str, ...]] = {
    "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"),  # Pillow's JPEG opener also returns MPO files
    "PNG": (".png",),
    "WEBP": (".webp",),
    "TIFF": (".tif", ".tiff"),
    "BMP": (".bmp",),
    "GIF": (".gif",),
    "HEIF": (".heic", ".heif"),  # pillow-heif (the heif extra), registered on first use
    "AVIF": (".avif",),  # Pillow's own plugin (Pillow >= 11.3 built with libavif)
}
IMAGE_EXTENSIONS = frozenset(ext for extensions in FORMATS.values() for ext in extensions)

NEEDS_HEIF = "unsupported image format (HEIC needs: pip install pillow-heif)"

# ISO-BMFF major brands that pillow-heif opens. "avif"/"avis" are left to Pillow's own plugin.
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs",
                          b"mif1", b"msf1"})
_PREFIX_BYTES = 16  # what Pillow's format sniffers (the plugins' _accept) are given


class UnsupportedImageFormat(OSError):
    """A file in a format Pillow recognises but clipgrep does not open (EPS), or a variant of a
    supported one that Pillow cannot open (some TIFFs); the message is the short reason."""


def open_image(source: str | os.PathLike[str] | BinaryIO) -> ImageFile.ImageFile:
    """``Image.open`` limited to ``FORMATS`` (lazy: only the header is read).

    Raises ``UnsupportedImageFormat`` for a file Pillow recognises but that is not opened,
    ``PIL.UnidentifiedImageError`` for one no Pillow plugin recognises ("not an image"),
    and whatever else Pillow raises for a malformed header. A caller's file object stays
    open (and at a position Pillow chose); a path is opened and owned by the image.
    """
    from PIL import Image, UnidentifiedImageError

    formats = _registered_formats()
    try:
        return Image.open(source, formats=formats)
    except UnidentifiedImageError:
        prefix = _prefix(source)
        if _is_heif(prefix) and "HEIF" not in formats and _register_heif():
            return open_image(source)  # the first HEIC this process meets: once more, with the opener
        reason = _unsupported_reason(prefix)
        if reason is None:
            raise
        raise UnsupportedImageFormat(reason) from None


def _registered_formats() -> tuple[str, ...]:
    # Image.open raises KeyError for a format no plugin registered (HEIF without pillow-heif,
    # AVIF on an older Pillow), so only the present ones are passed. init() imports every
    # plugin module once (~40 ms): importing runs nothing, and only ours are asked to open.
    from PIL import Image

    Image.init()
    return tuple(name for name in FORMATS if name in Image.OPEN)


def _prefix(source: str | os.PathLike[str] | BinaryIO) -> bytes:
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return f.read(_PREFIX_BYTES)
    source.seek(0)
    prefix = source.read(_PREFIX_BYTES)
    source.seek(0)
    return prefix


def _is_heif(prefix: bytes) -> bool:
    return prefix[4:8] == b"ftyp" and prefix[8:12] in _HEIF_BRANDS


def _unsupported_reason(prefix: bytes) -> str | None:
    """Why a file no allowed plugin opened is refused, when some Pillow plugin recognises it."""
    if _is_heif(prefix) and not _register_heif():
        return NEEDS_HEIF
    from PIL import Image

    for name, (_, accept) in Image.OPEN.items():
        # A plugin without a signature check (TGA...) recognises nothing.
        if accept is not None and _accepts(accept, prefix):
            if name in FORMATS:
                return f"unsupported image format (a {name} variant Pillow cannot open)"
            return f"unsupported image format ({name})"
    return None


def _accepts(accept: Callable[[bytes], bool | str], prefix: bytes) -> bool:
    try:
        return bool(accept(prefix))  # a bytes comparison; nothing is opened or run
    except Exception:  # noqa: BLE001 - a sniffer that chokes on a short prefix said no
        return False


_heif_registered: bool | None = None  # None: not tried yet in this process


def _register_heif() -> bool:
    """Register pillow-heif's opener on first use; False when it is not installed."""
    # Lazy, so processes that never meet a HEIC file do not pay for importing libheif.
    global _heif_registered
    if _heif_registered is None:
        try:
            from pillow_heif import register_heif_opener
        except ImportError:
            _heif_registered = False
        else:
            register_heif_opener()
            _heif_registered = True
    return _heif_registered
