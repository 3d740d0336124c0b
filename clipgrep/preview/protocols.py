"""Terminal image encoders: Kitty graphics, iTerm2 inline images, Sixel, and Unicode half blocks.

Each graphics encoder returns one escape sequence that draws an RGB image over ``cols`` x ``rows``
cells at the cursor. ``tmux_wrap`` makes a sequence pass through tmux (DCS passthrough; tmux >= 3.3
also needs ``set -g allow-passthrough on``). Small and dependency-free on purpose: see README
("Previews in the terminal") for why no PyPI encoder was used.
"""
from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

ESC = "\x1b"
ST = ESC + "\\"
_KITTY_CHUNK = 4096  # the protocol's maximum base64 payload per escape code


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def kitty(image: Image.Image, cols: int, rows: int) -> str:
    """Kitty graphics protocol: transmit-and-display a PNG, chunked; ``q=2`` silences the terminal's replies,
    ``C=1`` leaves the cursor where it was so that text can be written beside the picture."""
    payload = base64.standard_b64encode(_png(image)).decode("ascii")
    chunks = [payload[i:i + _KITTY_CHUNK] for i in range(0, len(payload), _KITTY_CHUNK)] or [""]
    parts = []
    for i, chunk in enumerate(chunks):
        more = int(i < len(chunks) - 1)
        keys = f"a=T,f=100,t=d,q=2,C=1,c={cols},r={rows},m={more}" if i == 0 else f"m={more}"
        parts.append(f"{ESC}_G{keys};{chunk}{ST}")
    return "".join(parts)


def iterm(image: Image.Image, cols: int, rows: int) -> str:
    """iTerm2 inline image (OSC 1337 File=), also understood by WezTerm and VS Code's terminal."""
    data = _png(image)
    payload = base64.standard_b64encode(data).decode("ascii")
    return (f"{ESC}]1337;File=inline=1;size={len(data)};width={cols};height={rows};"
            f"preserveAspectRatio=1:{payload}\a")


def sixel(image: Image.Image) -> str:
    """DEC Sixel at the image's own pixel size, with an adaptive palette of up to 255 colours."""
    import numpy as np
    from PIL import Image

    paletted = image.convert("RGB").quantize(colors=255, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    width, height = paletted.size
    pixels = np.asarray(paletted, dtype=np.int32)
    palette = paletted.getpalette() or []
    used = np.unique(pixels)
    out = [f"{ESC}Pq\"1;1;{width};{height}"]
    for c in used.tolist():
        r, g, b = palette[3 * c:3 * c + 3]
        out.append(f"#{c};2;{r * 100 // 255};{g * 100 // 255};{b * 100 // 255}")
    weights = (1 << np.arange(6, dtype=np.int32))[:, None]
    for top in range(0, height, 6):
        band = pixels[top:top + 6]
        lines = []
        for c in np.unique(band).tolist():
            bits = ((band == c) * weights[:len(band)]).sum(axis=0)  # one sixel (6 vertical pixels) per column
            lines.append(f"#{c}{_run_length(bits + 63)}")
        out.append("$".join(lines) + "-")
    out.append(ST)
    return "".join(out)


def _run_length(codes: object) -> str:
    """Sixel characters with runs of 4 or more written as ``!<count><char>``."""
    import numpy as np

    codes = np.asarray(codes)
    starts = np.flatnonzero(np.concatenate([[True], codes[1:] != codes[:-1]]))
    lengths = np.diff(np.concatenate([starts, [len(codes)]]))
    parts = []
    for start, length in zip(starts.tolist(), lengths.tolist()):
        char = chr(int(codes[start]))
        parts.append(f"!{length}{char}" if length > 3 else char * length)
    return "".join(parts)


def blocks(image: Image.Image, truecolor: bool = True) -> list[str]:
    """Unicode half blocks: each character cell shows two pixels (upper = foreground, lower = background).

    ``image`` must already have the cell size: width = columns, height = 2 x rows.
    """
    import numpy as np

    rgb = np.asarray(image.convert("RGB"), dtype=np.int32)
    if len(rgb) % 2:
        rgb = np.concatenate([rgb, rgb[-1:]])
    lines = []
    for y in range(0, len(rgb), 2):
        cells = []
        for upper, lower in zip(rgb[y].tolist(), rgb[y + 1].tolist()):
            cells.append(f"{ESC}[{_colour(38, upper, truecolor)};{_colour(48, lower, truecolor)}m\u2580")
        lines.append("".join(cells) + f"{ESC}[0m")
    return lines


def _colour(base: int, rgb: list[int], truecolor: bool) -> str:
    if truecolor:
        return f"{base};2;{rgb[0]};{rgb[1]};{rgb[2]}"
    r, g, b = (round(v / 255 * 5) for v in rgb)  # the 6x6x6 cube of the 256-colour palette
    return f"{base};5;{16 + 36 * r + 6 * g + b}"


def tmux_wrap(sequence: str) -> str:
    """DCS passthrough: tmux forwards the wrapped sequence to the outer terminal (ESCs doubled)."""
    return f"{ESC}Ptmux;{sequence.replace(ESC, ESC + ESC)}{ST}"
