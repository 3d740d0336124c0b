"""Search results as pictures in the terminal: ``clipgrep search --preview``.

``render_previews`` returns the bytes to write (the library never prints); the CLI writes them
only when stdout is a terminal.

Example::

    out = render_previews(hits, protocol="auto", rows=8, grid=False)   # bytes with escape codes
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from .detect import PROTOCOLS, detect_protocol, in_tmux, truecolor
from .layout import Item, Screen, layout

if TYPE_CHECKING:
    from ..ranking import Hit
    from ..thumbnails import ThumbnailCache

__all__ = ["PROTOCOLS", "detect_protocol", "render_previews", "screen_for"]
# Thumbnail sizes shared with the web page's cache; a preview uses the smallest that is big enough.
_SIDES = (256, 512, 1024)


def screen_for(protocol: str, rows: int, env: Mapping[str, str], fd: int | None = None) -> Screen:
    """The terminal we draw on: protocol ("auto" detects it), width and cell size from ``fd``."""
    columns, cell_px = 80, (10, 20)
    if fd is not None:
        columns, cell_px = _terminal_geometry(fd, columns, cell_px)
    chosen = detect_protocol(env) if protocol == "auto" else protocol
    return Screen(chosen, rows, columns, cell_px, tmux=in_tmux(env), truecolor=truecolor(env))


def render_previews(hits: Sequence[Hit], screen: Screen, *, grid: bool = False,
                    cache: ThumbnailCache | None = None) -> bytes:
    """Each hit's thumbnail with its score and path, laid out for ``screen``."""
    from ..thumbnails import ThumbnailCache

    cache = cache or ThumbnailCache()
    need = max(screen.box_cols * screen.cell_px[0], screen.rows * screen.cell_px[1])
    side = next((s for s in _SIDES if s >= need), _SIDES[-1])
    items = []
    for hit in hits:
        try:
            image = cache.image(hit.path, side)
        except Exception:  # noqa: BLE001  (deleted, unreadable, undecodable: show the line without it)
            image = None
        items.append(Item(image, hit.score, hit.path))
    # surrogateescape: a non-UTF-8 file name is written as the bytes the filesystem holds.
    return layout(items, screen, grid).encode("utf-8", "surrogateescape")


def _terminal_geometry(fd: int, columns: int, cell_px: tuple[int, int]) -> tuple[int, tuple[int, int]]:
    """Columns and the pixel size of one cell from TIOCGWINSZ (pixels are 0 where the terminal does not say)."""
    try:
        import fcntl
        import struct
        import termios

        rows_, cols_, xpix, ypix = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except (OSError, ImportError):
        return columns, cell_px
    if cols_:
        columns = cols_
        if xpix and ypix and rows_:
            cell_px = (max(1, xpix // cols_), max(1, ypix // rows_))
    return columns, cell_px
