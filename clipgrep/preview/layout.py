"""Placing thumbnails beside (list) or above (grid) their labels, for every protocol.

Graphics protocols draw at the cursor without moving it predictably, so each row of pictures
first prints the newlines it needs (any scrolling happens then, not mid-picture), moves back
up, saves the cursor (ESC 7), and returns to it (ESC 8) after each picture and label.
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import protocols

if TYPE_CHECKING:
    from PIL import Image

ESC = "\x1b"
SAVE, RESTORE = ESC + "7", ESC + "8"
GAP = 2  # columns between a picture and its label, or between grid cells
# C0/C1 controls in a file name would reach the terminal as commands: show them as "?".
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class Item:
    image: Image.Image | None  # None: the file could not be shown (deleted, unreadable)
    score: float
    path: str

    def label(self, width: int) -> str:
        """List mode: the score and the whole path (cut at the front when too long)."""
        return safe_text(f"{self.score:.4f}  {self.path}", width)

    def short_labels(self, width: int) -> tuple[str, str]:
        """Grid mode: the score, and under it as much of the file name as fits under the picture."""
        return f"{self.score:.4f}"[:width], safe_text(os.path.basename(self.path), width)


@dataclass(frozen=True)
class Screen:
    protocol: str  # one of detect.PROTOCOLS
    rows: int  # picture height in text rows
    columns: int  # terminal width
    cell_px: tuple[int, int] = (10, 20)  # a text cell in pixels (from TIOCGWINSZ when the terminal says)
    tmux: bool = False
    truecolor: bool = True

    @property
    def box_cols(self) -> int:
        """Width of a picture's box: square on screen, whatever the cell shape."""
        return max(1, round(self.rows * self.cell_px[1] / self.cell_px[0]))


def layout(items: Sequence[Item], screen: Screen, grid: bool) -> str:
    if not grid:
        return "".join(_row([item], screen, labels_below=False) for item in items)
    per_row = max(1, (screen.columns + GAP) // (screen.box_cols + GAP))
    return "".join(_row(items[i:i + per_row], screen, labels_below=True) for i in range(0, len(items), per_row))


def safe_text(text: str, width: int) -> str:
    """``text`` without control characters, cut to ``width`` columns keeping its end (the file name)."""
    text = _CONTROLS.sub("?", text)
    return text if len(text) <= width else "\u2026" + text[len(text) - width + 1:] if width > 1 else ""


def _row(items: Sequence[Item], screen: Screen, labels_below: bool) -> str:
    cell = screen.box_cols + GAP
    if screen.protocol == "blocks":
        return _blocks_row(items, screen, labels_below)
    height = screen.rows + (2 if labels_below else 0)
    out = ["\n" * height, f"{ESC}[{height}A", SAVE]
    for n, item in enumerate(items):
        x = n * cell
        if item.image is not None:
            out += [RESTORE, _right(x), _picture(item.image, screen)]
        if labels_below:
            for line, text in enumerate(item.short_labels(screen.box_cols)):
                out += [RESTORE, f"{ESC}[{screen.rows + line}B", _right(x), text]
        else:
            out += [RESTORE, _right(cell), item.label(max(1, screen.columns - cell))]
    out += [RESTORE, f"{ESC}[{height}B\r"]
    return "".join(out)


def _right(n: int) -> str:
    return f"{ESC}[{n}C" if n > 0 else ""  # CSI 0 C would still move one column


def _picture(image: Image.Image, screen: Screen) -> str:
    """The escape sequence drawing ``image`` fitted into the picture box, wrapped for tmux if needed."""
    cw, ch = screen.cell_px
    fitted = _fit(image, screen.box_cols * cw, screen.rows * ch)
    cols, rows = -(-fitted.width // cw), -(-fitted.height // ch)
    if screen.protocol == "kitty":
        sequence = protocols.kitty(fitted, cols, rows)
    elif screen.protocol == "iterm":
        sequence = protocols.iterm(fitted, cols, rows)
    else:
        sequence = protocols.sixel(fitted)
    return protocols.tmux_wrap(sequence) if screen.tmux else sequence


def _fit(image: Image.Image, width: int, height: int) -> Image.Image:
    from PIL import Image

    scale = min(width / image.width, height / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    flat = image
    if image.mode == "RGBA":  # protocols get RGB: transparent areas become the usual dark background
        flat = Image.new("RGB", image.size, (0, 0, 0))
        flat.paste(image, mask=image.getchannel("A"))
    return flat.convert("RGB").resize(size, Image.Resampling.LANCZOS)


def _blocks_row(items: Sequence[Item], screen: Screen, labels_below: bool) -> str:
    """Half blocks are plain text: pictures are joined side by side line by line, no cursor movement."""
    width = screen.box_cols
    columns = []
    for item in items:
        lines: list[str] = []
        if item.image is not None:
            fitted = _fit(item.image, width, 2 * screen.rows)  # one half-block pixel is square
            lines = [line + " " * (width - fitted.width) for line in protocols.blocks(fitted, screen.truecolor)]
        columns.append(lines + [" " * width] * (screen.rows - len(lines)))
    text = [(" " * GAP).join(column[y] for column in columns) for y in range(screen.rows)]
    if labels_below:
        for line in range(2):
            text.append((" " * GAP).join(item.short_labels(width)[line].ljust(width) for item in items).rstrip())
    else:
        text[0] += " " * GAP + items[0].label(max(1, screen.columns - width - GAP))
    return "\n".join(text) + "\n"
