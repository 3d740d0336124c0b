"""A generated captioned image set for testing ``compress`` end to end without downloads.

Each image is a scene of 1-3 groups of coloured shapes on a plain background.
A group has a colour, a shape, a size, a position and a count ("two small red
circles on the left"). Five captions per image state the same facts in
different phrasings, word choices and group orders.

Retrieval on it is meant to be non-trivial: there are about a million possible
scenes, so most images have a caption set of their own, but with 8 colours and
6 shapes any two images often share a fact (same colour, other shape; same
shape, other position...). Those are exactly the near misses hard-negative
mining should find. Jittered positions, sizes, angles and colours plus pixel
noise mean that two images with the same scene never have the same pixels.

Image i depends only on (seed, i): a larger ``n_images`` adds images and leaves
the first ones as they were.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from clipgrep.errors import ClipgrepError

CAPTIONS_PER_IMAGE = 5

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "orange": (245, 135, 20), "yellow": (240, 215, 30), "green": (40, 160, 60),
    "blue": (35, 85, 225), "purple": (135, 55, 185), "pink": (245, 120, 185), "brown": (125, 75, 35),
}
# Chosen to contrast with every shape colour; navy is the hardest case (against blue and purple).
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245), "grey": (128, 128, 128), "black": (20, 20, 20),
    "beige": (225, 210, 170), "navy": (20, 30, 75),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")

# The words captions may use for each fact; tests read these to check captions.
BACKGROUND_WORDS = {"white": ("white",), "grey": ("grey", "gray"), "black": ("black",),
                    "beige": ("beige", "cream"), "navy": ("navy", "dark blue")}
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "diamond": "diamonds", "cross": "crosses"}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
COUNT_WORDS = {1: ("a", "one", "a single"), 2: ("two", "a pair of"), 3: ("three",)}
POSITION_WORDS = {
    "left": ("on the left", "at the left", "to the left", "in the left part"),
    "right": ("on the right", "at the right", "to the right", "in the right part"),
    "top": ("at the top", "near the top", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part"),
    "centre": ("in the centre", "in the middle", "at the center"),
}

# Geometry in units of the image side, so the scene distribution is the same at every size.
_ANCHORS = {"left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.2), "bottom": (0.5, 0.8),
            "centre": (0.5, 0.5)}
_RADIUS = {"small": 0.07, "large": 0.12}  # circumradius: every shape fits in this circle
_GAP = 0.04  # between shapes and from the border; more than the jitter can eat
_JITTER = 0.015
_SUPERSAMPLE = 4  # draw 4x larger and box-filter down: anti-aliasing without aggdraw
_NOISE_STD = 3.0


@dataclass(frozen=True)
class ShapeGroup:
    """``count`` identical shapes side by side (vertically on the left and right)."""

    colour: str
    shape: str
    size: str
    position: str
    count: int


@dataclass(frozen=True)
class Scene:
    """A background and 1-3 shape groups, each at its own position."""

    background: str
    groups: tuple[ShapeGroup, ...]

    def to_json(self) -> dict:
        return {"background": self.background, "groups": [asdict(group) for group in self.groups]}


def generate_dataset(out_dir: str | os.PathLike[str], n_images: int, seed: int = 0,
                     image_size: int = 64) -> Path:
    """Write ``n_images`` scenes to an empty ``out_dir`` and return the path of its ``pairs.jsonl``.

    Writes ``images/000000.png``..., ``pairs.jsonl`` (one line per image:
    ``{"image", "captions", "scene"}``, read by ``data.load_pairs``), ``texts.txt``
    (every caption, one per line, for the text tower's stage 1) and ``config.json``
    (the arguments). Same arguments, same bytes.

    Example: ``pairs = load_pairs(generate_dataset("/tmp/shapes", 1000))``
    """
    out = _prepare_out_dir(Path(out_dir).expanduser(), n_images, seed, image_size)
    (out / "images").mkdir()
    rows = []
    for i in range(n_images):
        # One generator per image, so image i never depends on how many came before it.
        rng = np.random.default_rng([seed, i])
        scene = sample_scene(rng)
        captions = describe(scene, rng)
        name = f"images/{i:06d}.png"
        render(scene, rng, image_size).save(out / name)
        rows.append({"image": name, "captions": captions, "scene": scene.to_json()})
    (out / "texts.txt").write_text("".join(f"{c}\n" for row in rows for c in row["captions"]), encoding="utf-8")
    config = {"generator": "benchmarks.synthetic", "n_images": n_images, "seed": seed,
              "image_size": image_size}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    # Written last: a run that dies half-way leaves no pairs file to train on by mistake.
    pairs = out / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return pairs


def sample_scene(rng: np.random.Generator) -> Scene:
    """A random scene whose shapes all fit in the frame without touching."""
    while True:  # rejection sampling; about half the draws fit (crowded layouts do not)
        scene = _draw_facts(rng)
        if _fits(_layout(scene)):
            return scene


def describe(scene: Scene, rng: np.random.Generator, n: int = CAPTIONS_PER_IMAGE) -> list[str]:
    """``n`` different captions of ``scene``, each with its own sentence frame.

    Every caption names every group's count, size, colour, shape and position;
    all but one frame also name the background.
    """
    if not 1 <= n <= len(_FRAMES):
        raise ValueError(f"n must be 1..{len(_FRAMES)}, got {n}")
    frames = rng.permutation(len(_FRAMES))[:n]
    return [_caption(scene, _FRAMES[int(f)], rng) for f in frames]


def render(scene: Scene, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image with jitter and pixel noise."""
    big = size * _SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), _jitter_colour(BACKGROUNDS[scene.background], rng, 8))
    draw = ImageDraw.Draw(canvas)
    for group in scene.groups:
        for x, y, r in _group_layout(group):
            dx, dy = rng.uniform(-_JITTER, _JITTER, size=2)
            radius = r * rng.uniform(0.9, 1.0) * big
            angle = rng.uniform(-12.0, 12.0)
            fill = _jitter_colour(COLOURS[group.colour], rng, 15)
            _draw_shape(draw, group.shape, ((x + dx) * big, (y + dy) * big), radius, angle, fill)
    small = np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.float32)
    noisy = small + rng.normal(0.0, _NOISE_STD, size=small.shape)
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), "RGB")


# --- scene sampling --------------------------------------------------------------------------


def _draw_facts(rng: np.random.Generator) -> Scene:
    n_groups = int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
    positions = rng.permutation(len(POSITIONS))[:n_groups]
    groups = tuple(
        ShapeGroup(colour=_pick(list(COLOURS), rng), shape=_pick(SHAPES, rng), size=_pick(SIZES, rng),
                   position=POSITIONS[int(p)], count=int(rng.choice([1, 2, 3], p=[0.65, 0.25, 0.1])))
        for p in positions)
    return Scene(background=_pick(list(BACKGROUNDS), rng), groups=groups)


def _group_layout(group: ShapeGroup) -> list[tuple[float, float, float]]:
    """(x, y, radius) of each shape in the group, before jitter, in units of the image side."""
    r = _RADIUS[group.size]
    ax, ay = _ANCHORS[group.position]
    step = 2 * r + _GAP
    offsets = [(k - (group.count - 1) / 2) * step for k in range(group.count)]
    vertical = group.position in ("left", "right")  # a column at the sides, a row elsewhere
    return [(ax, ay + o, r) if vertical else (ax + o, ay, r) for o in offsets]


def _layout(scene: Scene) -> list[tuple[float, float, float]]:
    return [shape for group in scene.groups for shape in _group_layout(group)]


def _fits(shapes: list[tuple[float, float, float]]) -> bool:
    # The slack absorbs rounding: shapes of one group are exactly _GAP apart by construction.
    slack = 1e-9
    for i, (x, y, r) in enumerate(shapes):
        if min(x, y) - r < _GAP - slack or max(x, y) + r > 1 - _GAP + slack:
            return False
        for x2, y2, r2 in shapes[:i]:
            if math.hypot(x - x2, y - y2) < r + r2 + _GAP - slack:
                return False
    return True


def _pick(options: tuple[str, ...] | list[str], rng: np.random.Generator) -> str:
    # Index, not rng.choice(options): that would return numpy strings, not str.
    return options[int(rng.integers(len(options)))]


# --- captions -------------------------------------------------------------------------------

# Sentence frames: {G} the groups, {B} the background word, {be} "is"/"are" for the first group.
_FRAMES = (
    "{G} on a {B} background",
    "there {be} {G} against a {B} background",
    "a {B} background with {G}",
    "{G}",
    "a picture of {G} over {B}",
    "on a {B} canvas, {G}",
    "a simple drawing of {G} on {B}",
)
# Ways to phrase one group: {c} count, {z} size, {k} colour, {n} noun, {p} position, {be}.
_GROUP_STYLES = (
    "{c} {z} {k} {n} {p}",
    "{c} {n} in {k}, {z}, {p}",
    "{c} {k} {n} that {be} {z}, {p}",
    "{c} {z} {n} coloured {k} {p}",
)


def _caption(scene: Scene, frame: str, rng: np.random.Generator) -> str:
    style = _GROUP_STYLES[int(rng.integers(len(_GROUP_STYLES)))]
    order = rng.permutation(len(scene.groups))
    groups = [scene.groups[int(i)] for i in order]
    phrases = [_group_phrase(group, style, rng) for group in groups]
    # Styles with inner commas would blur where one group ends: separate groups with ";" there.
    text = frame.format(G=_join(phrases, "; " if "," in style else ", "), B=_pick(BACKGROUND_WORDS[scene.background], rng),
                        be="is" if groups[0].count == 1 else "are")
    return _articles(text)


def _group_phrase(group: ShapeGroup, style: str, rng: np.random.Generator) -> str:
    noun = group.shape if group.count == 1 else PLURALS[group.shape]
    return style.format(c=_pick(COUNT_WORDS[group.count], rng), z=_pick(SIZE_WORDS[group.size], rng),
                        k=group.colour, n=noun, p=_pick(POSITION_WORDS[group.position], rng),
                        be="is" if group.count == 1 else "are")


def _join(phrases: list[str], separator: str) -> str:
    return phrases[0] if len(phrases) == 1 else separator.join(phrases[:-1]) + " and " + phrases[-1]


def _articles(text: str) -> str:
    """'a orange' -> 'an orange' (the frames and styles only ever write 'a')."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


# --- drawing --------------------------------------------------------------------------------


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], radius: float,
                angle: float, fill: tuple[int, int, int]) -> None:
    cx, cy = centre
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        return
    theta = math.radians(angle)
    cos, sin = math.cos(theta), math.sin(theta)
    points = [(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos)) for x, y in _OUTLINES[shape]]
    draw.polygon(points, fill=fill)


def _star(points: int = 5, inner: float = 0.45) -> tuple[tuple[float, float], ...]:
    return tuple((r * math.cos(a), r * math.sin(a)) for k in range(2 * points)
                 for r, a in [((1.0 if k % 2 == 0 else inner), -math.pi / 2 + k * math.pi / points)])


def _regular(sides: int, start: float) -> tuple[tuple[float, float], ...]:
    return tuple((math.cos(start + k * 2 * math.pi / sides), math.sin(start + k * 2 * math.pi / sides))
                 for k in range(sides))


_W = 0.3  # half-width of a cross's arms
# Outlines in units of the circumradius, y pointing down (image coordinates).
_OUTLINES: dict[str, tuple[tuple[float, float], ...]] = {
    "square": _regular(4, math.pi / 4),
    "triangle": _regular(3, -math.pi / 2),  # pointing up
    "star": _star(),
    "diamond": ((0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)),  # taller than wide: not a turned square
    "cross": ((-_W, -1), (_W, -1), (_W, -_W), (1, -_W), (1, _W), (_W, _W), (_W, 1), (-_W, 1), (-_W, _W),
              (-1, _W), (-1, -_W), (-_W, -_W)),
}


def _jitter_colour(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple[int, int, int]:
    shifted = np.clip(np.asarray(rgb) + rng.integers(-amount, amount + 1, size=3), 0, 255)
    r, g, b = (int(v) for v in shifted)
    return r, g, b


def _prepare_out_dir(out: Path, n_images: int, seed: int, image_size: int) -> Path:
    if n_images < 1:
        raise ClipgrepError(f"n_images must be at least 1, got {n_images}", "ask for 1 or more images")
    if image_size < 16:
        raise ClipgrepError(f"image_size {image_size} is too small to draw shapes in", "use 16 or more pixels")
    if seed < 0:
        raise ClipgrepError(f"seed must be 0 or more, got {seed}", "use a non-negative integer seed")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ClipgrepError(f"{out} already exists and is not an empty directory",
                            "choose a new output directory, or delete this one")
    out.mkdir(parents=True, exist_ok=True)
    return out
