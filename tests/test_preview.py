"""Terminal previews: protocol encoders (goldens + decoders), detection, tmux, layout, TTY vs pipe."""
from __future__ import annotations

import base64
import io
import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from clipgrep.preview import detect_protocol, protocols, render_previews
from clipgrep.preview.layout import Screen, safe_text
from clipgrep.ranking import Hit
from clipgrep.thumbnails import ThumbnailCache

from .test_search import cli, indexed  # noqa: F401  (the fixture)

ESC = "\x1b"
PIXELS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]


def tiny() -> Image.Image:
    im = Image.new("RGB", (2, 2))
    im.putdata(PIXELS)
    return im


def visible(sequence: str) -> str:
    """Escape sequences as readable ASCII, one per line, for golden files."""
    return sequence.encode("unicode_escape").decode("ascii").replace("\\x1b", "\nESC").lstrip("\n") + "\n"


@pytest.mark.parametrize("name, encode", [
    ("kitty", lambda: protocols.kitty(tiny(), 2, 1)),
    ("iterm", lambda: protocols.iterm(tiny(), 2, 1)),
    ("sixel", lambda: protocols.sixel(tiny())),
    ("blocks_truecolor", lambda: "\n".join(protocols.blocks(tiny(), truecolor=True))),
    ("blocks_256", lambda: "\n".join(protocols.blocks(tiny(), truecolor=False))),
    ("tmux_kitty", lambda: protocols.tmux_wrap(protocols.kitty(tiny(), 2, 1))),
])
def test_protocol_goldens(name: str, encode, golden) -> None:
    golden.check(f"preview/{name}.txt", visible(encode()))


def test_kitty_payload_is_the_png_split_into_4096_byte_chunks() -> None:
    noise = Image.effect_noise((200, 200), 80).convert("RGB")  # incompressible: several chunks
    seq = protocols.kitty(noise, 20, 10)
    chunks = re.findall(ESC + r"_G([^;]*);([^\x1b]*)" + re.escape(ESC + "\\"), seq)
    assert len(chunks) > 2
    assert chunks[0][0].startswith("a=T,f=100") and "c=20,r=10" in chunks[0][0]
    assert [keys.split("m=")[1] for keys, _ in chunks] == ["1"] * (len(chunks) - 1) + ["0"]
    assert all(len(payload) <= 4096 for _, payload in chunks)
    png = base64.b64decode("".join(payload for _, payload in chunks))
    assert list(Image.open(io.BytesIO(png)).convert("RGB").get_flattened_data()) == list(noise.get_flattened_data())


def test_iterm_payload_decodes_to_the_image() -> None:
    seq = protocols.iterm(tiny(), 4, 2)
    header, payload = seq[len(ESC + "]1337;File="):-1].split(":", 1)
    assert "inline=1" in header and "width=4" in header and "height=2" in header and seq.endswith("\a")
    assert list(Image.open(io.BytesIO(base64.b64decode(payload))).get_flattened_data()) == PIXELS


def decode_sixel(seq: str) -> dict[tuple[int, int], tuple[int, int, int]]:
    """A minimal Sixel reader: the colour (in 0-100 percent) of every pixel drawn."""
    body = seq[seq.index("q") + 1:-2]
    palette = {int(c): tuple(int(v) for v in (r, g, b))
               for c, r, g, b in re.findall(r"#(\d+);2;(\d+);(\d+);(\d+)", body)}
    body = re.sub(r"#\d+;2;\d+;\d+;\d+", "", re.sub(r'^"[\d;]+', "", body))
    pixels: dict[tuple[int, int], tuple[int, int, int]] = {}
    x, band, colour = 0, 0, 0
    for token in re.findall(r"#\d+|!\d+[?-~]|[?-~]|\$|-", body):
        if token.startswith("#"):
            colour = int(token[1:])
        elif token == "$":
            x = 0
        elif token == "-":
            x, band = 0, band + 1
        else:
            count, char = (int(token[1:-1]), token[-1]) if token.startswith("!") else (1, token)
            bits = ord(char) - 63
            for _ in range(count):
                for bit in range(6):
                    if bits >> bit & 1:
                        pixels[(x, band * 6 + bit)] = palette[colour]
                x += 1  # noqa: SIM113
    return pixels


def test_sixel_decodes_back_to_the_picture() -> None:
    im = Image.new("RGB", (13, 9), (255, 0, 0))  # 9 rows: two bands, the second one partial
    im.paste((0, 0, 255), (5, 3, 13, 9))
    pixels = decode_sixel(protocols.sixel(im))
    assert len(pixels) == 13 * 9
    assert pixels[(0, 0)] == (100, 0, 0) and pixels[(12, 8)] == (0, 0, 100) and pixels[(4, 8)] == (100, 0, 0)


def test_sixel_run_length_encodes_runs_of_four_or_more() -> None:
    assert protocols._run_length([63, 63, 63, 64, 64, 64, 64, 65]) == "???!4@A"


def test_half_blocks_put_the_upper_pixel_in_front_and_the_lower_behind() -> None:
    line, = protocols.blocks(tiny(), truecolor=True)
    cells = re.findall(ESC + r"\[38;2;(\d+;\d+;\d+);48;2;(\d+;\d+;\d+)m\u2580", line)
    assert cells == [("255;0;0", "0;0;255"), ("0;255;0", "255;255;255")] and line.endswith(ESC + "[0m")


def test_tmux_passthrough_doubles_every_escape() -> None:
    inner = protocols.kitty(tiny(), 2, 1)
    wrapped = protocols.tmux_wrap(inner)
    assert wrapped.startswith(ESC + "Ptmux;" + ESC + ESC + "_G") and wrapped.endswith(ESC + "\\")
    assert wrapped[len(ESC + "Ptmux;"):-2].replace(ESC + ESC, ESC) == inner


@pytest.mark.parametrize("env, expected", [
    ({"TERM": "xterm-kitty"}, "kitty"),
    ({"TERM": "screen-256color", "TMUX": "/tmp/x", "TERM_PROGRAM": "tmux", "KITTY_WINDOW_ID": "1"}, "kitty"),
    ({"TERM": "xterm-ghostty"}, "kitty"),
    ({"TERM": "xterm-256color", "KONSOLE_VERSION": "240202"}, "kitty"),
    ({"TERM": "xterm-256color", "TERM_PROGRAM": "iTerm.app"}, "iterm"),
    ({"TERM": "xterm-256color", "LC_TERMINAL": "iTerm2"}, "iterm"),  # over ssh
    ({"TERM": "xterm-256color", "TERM_PROGRAM": "WezTerm"}, "iterm"),
    ({"TERM": "xterm-256color", "TERM_PROGRAM": "vscode"}, "iterm"),
    ({"TERM": "foot"}, "sixel"),
    ({"TERM": "mlterm"}, "sixel"),
    ({"TERM": "xterm-256color", "WT_SESSION": "abc"}, "sixel"),
    ({"TERM": "xterm-256color"}, "blocks"),
    ({}, "blocks"),
])
def test_protocol_detection_from_the_environment(env: dict[str, str], expected: str) -> None:
    assert detect_protocol(env) == expected


def test_file_names_cannot_send_escape_sequences() -> None:
    assert safe_text("/p/evil\x1b]0;pwned\a.jpg", 80) == "/p/evil?]0;pwned?.jpg"
    assert safe_text("/very/long/path/name.jpg", 10) == "\u2026/name.jpg"


def photos(tmp_path: Path, n: int) -> list[Hit]:
    hits = []
    for i in range(n):
        path = tmp_path / f"p{i}.png"
        Image.new("RGB", (60, 40), (40 * i, 100, 200)).save(path)
        hits.append(Hit(1.0 - i / 10, str(path)))
    return hits


def test_list_layout_reserves_rows_and_writes_labels_beside_pictures(tmp_path: Path) -> None:
    hits = photos(tmp_path, 2)
    screen = Screen("kitty", rows=3, columns=300, cell_px=(10, 20))
    out = render_previews(hits, screen, cache=ThumbnailCache(tmp_path / "c")).decode()
    assert out.count(ESC + "_Ga=T") == 2
    first = out.index(ESC + "_Ga=T")
    assert out[:first].startswith("\n\n\n" + ESC + "[3A" + ESC + "7" + ESC + "8")
    assert ESC + "8" + ESC + f"[{screen.box_cols + 2}C1.0000  {hits[0].path}" in out
    assert out.endswith(ESC + "8" + ESC + "[3B\r")


def test_grid_layout_fills_the_terminal_width(tmp_path: Path) -> None:
    hits = photos(tmp_path, 5)
    screen = Screen("blocks", rows=8, columns=54, cell_px=(10, 20))  # box 16 columns + gap 2: 3 per row
    lines = render_previews(hits, screen, grid=True, cache=ThumbnailCache(tmp_path / "c")).decode().split("\n")
    labels = [line for line in lines if "." in line and "\u2580" not in line]
    cell = "{:<16}  "  # each label under its 16-column picture, 2 columns apart
    assert labels == [(cell * 2 + "{}").format("1.0000", "0.9000", "0.8000"),
                      (cell * 2 + "{}").format("p0.png", "p1.png", "p2.png"),
                      (cell + "{}").format("0.7000", "0.6000"), (cell + "{}").format("p3.png", "p4.png")]
    assert sum("\u2580" in line for line in lines) == 2 * 6  # 2 grid rows x 6 text rows (60x40 fits 16x11 px)


def test_missing_file_keeps_its_line_without_a_picture(tmp_path: Path) -> None:
    hits = photos(tmp_path, 1) + [Hit(0.5, str(tmp_path / "gone.jpg"))]
    out = render_previews(hits, Screen("sixel", 2, 80), cache=ThumbnailCache(tmp_path / "c")).decode()
    assert out.count(ESC + "Pq") == 1 and "gone.jpg" in out


def test_preview_in_a_pipe_is_ignored_with_one_warning(indexed: Path) -> None:  # noqa: F811
    plain = cli(str(indexed / "red.png"), "-k", "3")
    previewed = cli(str(indexed / "red.png"), "-k", "3", "--preview-grid", "--preview-protocol", "kitty")
    assert previewed.exit_code == 0 and previewed.stdout_bytes == plain.stdout_bytes
    assert previewed.stderr == "clipgrep: warning: --preview ignored: stdout is not a terminal\n"


def run_on_a_terminal(args: list[str], env: dict[str, str]) -> bytes:
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 300, 3000, 1000))  # 300 columns, 10x20 cells
    proc = subprocess.Popen([sys.executable, "-m", "clipgrep", *args], stdout=slave, stderr=subprocess.PIPE,
                            env={**os.environ, **env})
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 30)
        if not ready:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    proc.wait(30)
    os.close(master)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    return out


def test_preview_on_a_terminal_draws_pictures(indexed: Path) -> None:  # noqa: F811
    out = run_on_a_terminal(["search", "--model", "tiny", str(indexed / "red.png"), "-k", "2", "--preview"],
                            {"TERM": "xterm-kitty", "TMUX": ""})
    assert out.count(b"\x1b_Ga=T,f=100") == 2 and str(indexed / "red.png").encode() in out


def test_preview_inside_tmux_uses_passthrough(indexed: Path) -> None:  # noqa: F811
    out = run_on_a_terminal(["search", "--model", "tiny", str(indexed / "red.png"), "-k", "1", "--preview"],
                            {"TERM": "tmux-256color", "TMUX": "/tmp/tmux-0/default,1,0", "TERM_PROGRAM": "tmux",
                             "LC_TERMINAL": "iTerm2"})
    assert out.count(b"\x1bPtmux;\x1b\x1b]1337;File=") == 1


def test_graphics_grid_puts_score_and_name_under_each_picture(tmp_path: Path) -> None:
    hits = photos(tmp_path, 3)
    screen = Screen("iterm", rows=3, columns=20, cell_px=(10, 20))  # box 6 + gap 2: 2 per row
    out = render_previews(hits, screen, grid=True, cache=ThumbnailCache(tmp_path / "c")).decode()
    rows = out.split("\n" * 5)  # each grid row reserves 3 picture rows + 2 label rows
    assert len(rows) == 3 and out.count(ESC + "]1337;File=") == 3
    assert ESC + "8" + ESC + "[3B" + ESC + "[8C0.9000" in rows[1]  # second cell: 8 columns right
    assert ESC + "8" + ESC + "[4B" + ESC + "[8Cp1.png" in rows[1]
