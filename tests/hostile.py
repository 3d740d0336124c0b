"""Hostile files for tests, written by hand, plus a fake Ghostscript and a deadline for calls that could block."""
from __future__ import annotations

import contextlib
import os
import signal
import stat
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

# A valid EPS: Pillow's EPS plugin recognises it and, on load, runs Ghostscript to render it.
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
       b"0 0 1 setrgbcolor 0 0 16 16 rectfill\nshowpage\n%%EOF\n")
SVG = (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16">'
       b'<rect width="16" height="16" fill="red"/></svg>\n')


def write_eps(path: Path) -> Path:
    path.write_bytes(EPS)
    return path


def write_svg(path: Path) -> Path:
    path.write_bytes(SVG)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_blank_png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit PNG of black pixels, a few hundred KB even at 20000 x 20000 (a decompression bomb)."""
    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(1)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
                     + _png_chunk(b"IEND", b""))
    return path


def write_undecodable_tiff(path: Path, pages: int = 2, width: int = 8, height: int = 8) -> Path:
    """A little-endian multi-page TIFF of 12-bit RGB: a valid TIFF for which Pillow has no pixel mode."""
    data_len = width * height * 3 * 12 // 8
    out = bytearray(b"II*\x00" + bytes(4))
    next_ifd_at = 4  # where the offset of the next IFD goes
    for _ in range(pages):
        bits_at = len(out)
        out += struct.pack("<3H", 12, 12, 12)
        data_at = len(out)
        out += bytes(data_len)
        struct.pack_into("<I", out, next_ifd_at, len(out))
        def short(v: int) -> bytes:  # type 3, one value, padded to the 4-byte field
            return struct.pack("<HH", v, 0)

        def long(v: int) -> bytes:  # type 4, or an offset to where the values are
            return struct.pack("<I", v)

        entries = [(256, 3, 1, short(width)), (257, 3, 1, short(height)), (258, 3, 3, long(bits_at)),
                   (259, 3, 1, short(1)), (262, 3, 1, short(2)), (273, 4, 1, long(data_at)),
                   (277, 3, 1, short(3)), (278, 3, 1, short(height)), (279, 4, 1, long(data_len))]
        out += struct.pack("<H", len(entries))
        for tag, kind, count, value in entries:  # width, height, 12-bit samples, no compression, RGB...
            out += struct.pack("<HHI", tag, kind, count) + value
        next_ifd_at = len(out)
        out += bytes(4)
    path.write_bytes(bytes(out))
    return path


def fake_ghostscript(directory: Path) -> tuple[Path, Path]:
    """A ``gs`` that only records that it ran: (the folder to put first on PATH, the marker it writes)."""
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / "gs-ran"
    script = directory / "gs"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{marker}"\nexit 1\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return directory, marker


def path_with(first: Path) -> str:
    return f"{first}{os.pathsep}{os.environ.get('PATH', '')}"


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail with TimeoutError instead of hanging: a blocked open() on a FIFO is interrupted by SIGALRM."""
    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
