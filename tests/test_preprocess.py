"""Runtime image preprocessing: open_clip's eval transform, pixel for pixel, without torch."""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw, JpegImagePlugin

import clipgrep.embed.preprocess as pp
from clipgrep.embed.preprocess import PreprocessConfig, load_image, preprocess, resize_plan

from .convert_support import require_open_clip

REPO_ROOT = Path(__file__).resolve().parents[1]
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
PALETTE_WARNING = "Palette images with Transparency"


@pytest.fixture(scope="module")
def open_clip_eval() -> Callable[[dict[str, Any], Image.Image], np.ndarray]:
    """open_clip's eval transform for a preprocess dict, applied to one PIL image."""
    transform = require_open_clip().transform

    @functools.cache
    def build(key: str) -> Any:
        return transform.image_transform_v2(transform.PreprocessCfg(**json.loads(key)), is_train=False)

    def run(cfg: dict[str, Any], img: Image.Image) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's palette-transparency warning; not what is tested here
            return build(json.dumps(cfg, sort_keys=True))(img).numpy()

    return run


# --- generated images --------------------------------------------------------------------------


def _field(width: int, height: int, channels: int, seed: int) -> np.ndarray:
    """Smooth waves plus noise in [0, 1]: gradients for the filters, noise for the details."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    waves = [np.sin(xx / (3 + c) + yy / (5 + 2 * c) + c) * 0.4 + 0.5 for c in range(channels)]
    return np.clip(np.stack(waves, -1) + rng.normal(0, 0.08, (height, width, channels)), 0, 1)


def _u8(a: np.ndarray) -> np.ndarray:
    return (a * 255).astype(np.uint8)


@functools.cache
def _image(mode: str, width: int, height: int) -> Image.Image:
    a = _field(width, height, 4, seed=width * 7919 + height)
    rgb = Image.fromarray(_u8(a[..., :3]))
    gray = _u8(a[..., 0])
    if mode == "RGB":
        return rgb
    if mode == "RGBA":  # alpha varies across the image: premultiplied resizing shows
        return Image.fromarray(_u8(a))
    if mode == "LA":
        return Image.merge("LA", (Image.fromarray(gray), Image.fromarray(_u8(a[..., 3]))))
    if mode == "L":
        return Image.fromarray(gray)
    if mode.startswith("P"):
        img = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
        if mode == "P+index":  # transparency as one palette index (GIF style)
            img.info["transparency"] = 3
        elif mode == "P+bytes":  # per-entry alpha (PNG tRNS), the case PIL warns about
            img.info["transparency"] = bytes(range(0, 256, 8))
        return img
    if mode == "CMYK":
        return Image.merge("CMYK", [Image.fromarray(_u8(a[..., c])) for c in range(4)])
    if mode == "I;16":  # values past 255 on purpose
        return Image.fromarray((a[..., 0] * 1000).astype(np.uint16))
    if mode == "I":  # negative and past 255
        return Image.fromarray((a[..., 0] * 600 - 200).astype(np.int32))
    if mode == "F":
        return Image.fromarray((a[..., 0] * 350 - 50).astype(np.float32))
    if mode == "1":
        return Image.fromarray(a[..., 0] > 0.5)
    if mode == "YCbCr":
        return rgb.convert("YCbCr")
    raise AssertionError(mode)


def _cfg(size: int | list[int], resize_mode: str, interpolation: str = "bicubic",
         plain: bool = False) -> dict[str, Any]:
    """An open_clip preprocess dict; ``plain`` uses mean 0, std 1 and a grey fill."""
    return {
        "size": size,
        "mode": "RGB",
        "mean": [0.0, 0.0, 0.0] if plain else list(OPENAI_MEAN),
        "std": [1.0, 1.0, 1.0] if plain else list(OPENAI_STD),
        "interpolation": interpolation,
        "resize_mode": resize_mode,
        "fill_color": 128 if plain else 0,
    }


MODES = ["RGB", "RGBA", "LA", "L", "P", "P+index", "P+bytes", "CMYK", "I;16", "I", "F", "1", "YCbCr"]
# (width, height): a single pixel, smaller than the crop, very wide, very tall, odd sizes,
# exactly the small targets below, and sizes that round differently per resize mode.
SIZES = [(1, 1), (5, 7), (300, 6), (6, 300), (31, 33), (32, 32), (24, 40), (97, 61)]
# Small targets keep the mode x size x config matrix fast; every branch of open_clip's
# transform is covered: square and non-square (h, w) for each resize mode, both filters.
SMALL_CONFIGS = [
    _cfg(size, resize_mode, interpolation, plain=interpolation == "bilinear")
    for size in (32, [40, 24], [24, 40])
    for resize_mode in ("shortest", "longest", "squash")
    for interpolation in ("bicubic", "bilinear")
]


def _assert_parity(open_clip_eval: Callable[..., np.ndarray], cfg: dict[str, Any], img: Image.Image) -> float:
    """Same array as open_clip (<= 1e-5), or the same error where open_clip fails."""
    try:
        expected = open_clip_eval(cfg, img)
    except ValueError as e:  # e.g. 'longest' squeezing a 300x6 strip to a 0-pixel edge
        with pytest.raises(type(e), match=str(e)):
            preprocess(img, PreprocessConfig.from_dict(cfg))
        return 0.0
    actual = preprocess(img, PreprocessConfig.from_dict(cfg))
    assert actual.dtype == np.float32
    assert actual.shape == expected.shape
    diff = float(np.abs(actual - expected).max())
    assert diff <= 1e-5, (img.mode, img.size, cfg, diff)
    return diff


# --- parity with open_clip ---------------------------------------------------------------------


@pytest.mark.convert
@pytest.mark.parametrize("mode", MODES)
def test_matches_open_clip_for_every_mode_size_and_config(open_clip_eval: Any, mode: str) -> None:
    # Measured: every case is bit-identical (max diff 0.0), the 1e-5 is only headroom.
    for width, height in SIZES:
        img = _image(mode, width, height)
        assert img.mode == mode.split("+")[0]
        for cfg in SMALL_CONFIGS:
            _assert_parity(open_clip_eval, cfg, img)


@pytest.mark.convert
@pytest.mark.parametrize("size", [224, [256, 192]])
@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
def test_matches_open_clip_at_model_sizes(open_clip_eval: Any, size: Any, resize_mode: str) -> None:
    sizes = [(1, 1), (224, 224), (192, 256), (301, 207)]
    cases = [(mode, wh) for mode in ("RGB", "RGBA", "P+bytes", "L") for wh in sizes]
    cases += [("RGB", (1000, 20)), ("RGB", (20, 1000))]  # 'shortest' upscales these to 11200 pixels long
    for mode, (width, height) in cases:
        _assert_parity(open_clip_eval, _cfg(size, resize_mode), _image(mode, width, height))


@pytest.mark.convert
def test_config_round_trip_gives_the_same_open_clip_transform(open_clip_eval: Any) -> None:
    img = _image("RGB", 97, 61)
    for raw in SMALL_CONFIGS:
        again = PreprocessConfig.from_dict(raw).to_dict()
        np.testing.assert_array_equal(open_clip_eval(again, img), open_clip_eval(raw, img))


@pytest.mark.convert
def test_defaults_are_open_clips() -> None:
    transform = require_open_clip().transform
    ours = PreprocessConfig.from_dict({"size": 224}).to_dict()
    theirs = dataclasses.asdict(transform.PreprocessCfg(size=[224, 224]))
    assert ours == {k: list(v) if isinstance(v, tuple) else v for k, v in theirs.items() if k != "mode"}


@pytest.mark.convert
def test_degenerate_resize_fails_like_open_clip(open_clip_eval: Any) -> None:
    # 'longest' scales a 1000x1 strip to 224x0: open_clip raises, and so do we (the indexer skips it).
    cfg = _cfg(224, "longest")
    img = _image("RGB", 1000, 1)
    with pytest.raises(ValueError, match="height and width must be > 0"):
        open_clip_eval(cfg, img)
    with pytest.raises(ValueError, match="height and width must be > 0"):
        preprocess(img, PreprocessConfig.from_dict(cfg))


def test_palette_transparency_warning_is_silenced_locally() -> None:
    img = _image("P+bytes", 31, 33)
    filters = list(warnings.filters)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        preprocess(img, PreprocessConfig.from_dict(_cfg(32, "shortest")))
    assert warnings.filters == filters
    with pytest.warns(UserWarning, match=PALETTE_WARNING):  # still raised outside preprocess
        img.convert("RGB")


# --- absurd shapes: the resize never builds what the crop throws away -----------------------------


@pytest.fixture
def resized_sizes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The size of every image ``Image.resize`` returns."""
    sizes: list[tuple[int, int]] = []
    real = Image.Image.resize

    def spy(self: Image.Image, *args: Any, **kwargs: Any) -> Image.Image:
        out = real(self, *args, **kwargs)
        sizes.append(out.size)
        return out

    monkeypatch.setattr(Image.Image, "resize", spy)
    return sizes


def test_absurd_aspect_ratio_is_resized_only_where_the_crop_keeps(resized_sizes: list[tuple[int, int]]) -> None:
    # Shortest edge 224 of a 10000x1 strip is a 2240000x224 image: 2 GB in PIL's 4-byte RGB.
    for width, height in ((10_000, 1), (1, 10_000)):
        for mode in ("RGB", "RGBA", "P"):
            for size in (224, [256, 192]):
                cfg = PreprocessConfig.from_dict(_cfg(size, "shortest"))
                img = Image.new("RGB", (width, height), (255, 0, 0)).convert(mode)
                out = preprocess(img, cfg)
                assert out.shape == (3, *cfg.size)
                red = (1 - OPENAI_MEAN[0]) / OPENAI_STD[0]
                np.testing.assert_allclose(out[0], red, atol=1e-5)  # still the picture, all of the crop
    assert resized_sizes and max(w * h for w, h in resized_sizes) <= pp.MAX_RESIZED_PIXELS


def test_crop_only_resize_stays_close_to_open_clips_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    # Forced onto shapes whose exact resize is affordable, to compare the two paths.
    for mode, (width, height) in (("RGB", (20, 1000)), ("RGB", (1000, 20)), ("L", (301, 207))):
        for size in (224, [256, 192]):
            cfg = PreprocessConfig.from_dict(_cfg(size, "shortest"))
            img = _image(mode, width, height)
            exact = preprocess(img, cfg)
            monkeypatch.setattr(pp, "MAX_RESIZED_PIXELS", 0)
            cropped_first = preprocess(img, cfg)
            monkeypatch.undo()
            levels = np.abs(exact - cropped_first) * np.asarray(OPENAI_STD)[:, None, None] * 255
            # Measured: at most 6.2 grey levels, 0.27 on average (a tall strip; 1 and 0.0001 otherwise).
            assert levels.max() < 8 and levels.mean() < 0.4, (mode, width, height, size)


# --- loading: EXIF orientation ------------------------------------------------------------------


def _encode(img: Image.Image, fmt: str, orientation: int | None = None, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize(
    "orientation, transpose",
    [(6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90), (3, Image.Transpose.ROTATE_180)],
)
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied(orientation: int, transpose: Image.Transpose, fmt: str) -> None:
    cfg = PreprocessConfig.from_dict(_cfg([40, 24], "shortest"))
    data = _encode(_image("RGB", 97, 61), fmt, orientation)
    upright = Image.open(io.BytesIO(data)).transpose(transpose)  # the same decoded pixels, turned by hand
    np.testing.assert_array_equal(load_image(io.BytesIO(data), cfg, draft=False), preprocess(upright, cfg))
    # 97x61 is too small to draft, so the default path is exact too.
    np.testing.assert_array_equal(load_image(io.BytesIO(data), cfg), preprocess(upright, cfg))


def test_load_image_without_draft_is_preprocess_of_the_opened_image(tmp_path: Path) -> None:
    cfg = PreprocessConfig.from_dict(_cfg(32, "longest"))
    for fmt, mode in [("PNG", "RGBA"), ("PNG", "P+bytes"), ("GIF", "P"), ("TIFF", "CMYK"), ("JPEG", "L")]:
        path = tmp_path / f"{mode}.{fmt.lower()}"
        path.write_bytes(_encode(_image(mode, 97, 61), fmt))
        with Image.open(path) as img:
            expected = preprocess(img, cfg)
        np.testing.assert_array_equal(load_image(path, cfg), expected)
        np.testing.assert_array_equal(load_image(str(path), cfg, draft=False), expected)


def test_load_image_closes_the_file_and_propagates_pil_errors(tmp_path: Path) -> None:
    cfg = PreprocessConfig.from_dict(_cfg(32, "shortest"))
    path = tmp_path / "a.jpg"
    path.write_bytes(_encode(_image("RGB", 97, 61), "JPEG"))
    load_image(path, cfg)
    fd_dir = Path("/proc/self/fd")
    if fd_dir.is_dir():  # Linux: no descriptor of this process still points at the file
        assert not any(os.path.realpath(fd_dir / fd) == os.path.realpath(path) for fd in os.listdir(fd_dir))
    (tmp_path / "broken.jpg").write_bytes(path.read_bytes()[:200])
    with pytest.raises(OSError):  # truncated data: PIL's own error reaches the indexer
        load_image(tmp_path / "broken.jpg", cfg)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(Image.UnidentifiedImageError):
        load_image(tmp_path / "text.png", cfg)


# --- loading: JPEG draft ------------------------------------------------------------------------


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Photo-like: smooth colour regions, object edges, some fine texture and sensor noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 150 + 2, width // 150 + 2, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(30):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(width // 40, width // 8))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    for _ in range(60):
        x0, x1, y0, y1 = (int(v) for v in (*rng.integers(0, width, 2), *rng.integers(0, height, 2)))
        draw.line((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=2)
    a = np.asarray(img, dtype=np.float32) + rng.normal(0, 4, (height, width, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


@pytest.fixture
def seen_by_preprocess(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Sizes of the decoded (drafted, transposed) images load_image hands to preprocess."""
    sizes: list[tuple[int, int]] = []
    real = pp.preprocess

    def spy(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
        sizes.append(img.size)
        return real(img, cfg)

    monkeypatch.setattr(pp, "preprocess", spy)
    return sizes


@pytest.fixture
def draft_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    calls: list[tuple[str, Any]] = []
    for cls in (Image.Image, JpegImagePlugin.JpegImageFile):
        real = cls.draft

        def spy(self: Image.Image, mode: Any, size: Any, _real: Any = real) -> Any:
            calls.append((self.format, size))
            return _real(self, mode, size)

        monkeypatch.setattr(cls, "draft", spy)
    return calls


def test_draft_is_close_to_a_full_decode() -> None:
    # Measured on this image (DRAFT_OVERSAMPLE=2: decoded at 1/2 scale, then resized):
    # mean |diff| 0.0036-0.0076 and max 0.17-0.21 in normalised units (0.21 ~ 14 of 255
    # levels, on the thin lines); 1/8 of that mean is about half a grey level. Requesting
    # exactly the resize size instead (1/4 scale) measured mean 0.0072-0.0162, max 0.20-0.31,
    # so the mean bound also fails if the oversampling is dropped.
    data = _encode(_photo(1600, 1200), "JPEG", quality=90)
    for resize_mode in ("shortest", "longest", "squash"):
        cfg = PreprocessConfig.from_dict(_cfg(224, resize_mode))
        diff = np.abs(load_image(io.BytesIO(data), cfg) - load_image(io.BytesIO(data), cfg, draft=False))
        assert 0 < diff.mean() < 0.011, (resize_mode, diff.mean())  # > 0: the draft did happen
        assert diff.max() < 0.3, (resize_mode, diff.max())


def test_draft_never_decodes_below_what_the_resize_needs(
    seen_by_preprocess: list[tuple[int, int]], draft_calls: list[tuple[str, Any]]
) -> None:
    photo = _photo(1000, 600)
    for orientation in (1, 6):  # 6: stored sideways, so the request must be turned as well
        data = _encode(photo, "JPEG", orientation)
        full = (600, 1000) if orientation == 6 else (1000, 600)  # display size
        for size in (32, [40, 24], [24, 40], 100, [150, 90], 300):
            for resize_mode in ("shortest", "longest", "squash"):
                cfg = PreprocessConfig.from_dict(_cfg(size, resize_mode))
                load_image(io.BytesIO(data), cfg)
                decoded = seen_by_preprocess[-1]
                (need_w, need_h), _ = resize_plan(*full, cfg)  # what a full decode would be resized to
                (out_w, out_h), _ = resize_plan(*decoded, cfg)  # what the drafted image is resized to
                assert decoded[0] >= need_w and decoded[1] >= need_h, (size, resize_mode, decoded)
                # ...and the resize that follows only ever shrinks it.
                assert out_w <= decoded[0] and out_h <= decoded[1], (size, resize_mode, decoded)
                assert decoded[0] >= pp.DRAFT_OVERSAMPLE * need_w or decoded == full
                assert decoded[1] >= pp.DRAFT_OVERSAMPLE * need_h or decoded == full
    reduced = [s for s in seen_by_preprocess if s not in ((1000, 600), (600, 1000))]
    assert len(reduced) >= 12  # it did reduce, for the small targets
    assert all(fmt == "JPEG" for fmt, _ in draft_calls)
    assert len(draft_calls) == len(reduced)  # called only when it reduces


def test_draft_only_for_jpeg(
    seen_by_preprocess: list[tuple[int, int]], draft_calls: list[tuple[str, Any]]
) -> None:
    cfg = PreprocessConfig.from_dict(_cfg(32, "shortest"))
    for fmt in ("PNG", "WEBP", "TIFF"):
        data = _encode(_image("RGB", 300, 200), fmt)
        load_image(io.BytesIO(data), cfg)
        assert seen_by_preprocess[-1] == (300, 200)
    assert draft_calls == []
    load_image(io.BytesIO(_encode(_image("RGB", 100, 80), "JPEG")), cfg)  # 100 < 2 * 2 * 32: no gain
    assert draft_calls == []


# --- PreprocessConfig ---------------------------------------------------------------------------


def test_config_from_and_to_dict() -> None:
    raw = _cfg(224, "shortest")
    cfg = PreprocessConfig.from_dict(raw)
    assert cfg.size == (224, 224) and (cfg.height, cfg.width) == (224, 224)
    assert cfg.mean == OPENAI_MEAN and cfg.std == OPENAI_STD
    d = cfg.to_dict()
    assert d == {**{k: v for k, v in raw.items() if k != "mode"}, "size": [224, 224]}
    assert json.loads(json.dumps(d)) == d
    assert PreprocessConfig.from_dict(d) == cfg
    assert hash(PreprocessConfig.from_dict(d)) == hash(cfg)
    assert PreprocessConfig.from_dict({**raw, "size": [256, 192]}).to_dict()["size"] == [256, 192]
    assert PreprocessConfig.from_dict({**raw, "size": (256, 192)}).size == (256, 192)
    assert PreprocessConfig.from_dict({**raw, "size": [320]}).size == (320, 320)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.size = (1, 1)  # type: ignore[misc]


def test_config_defaults_follow_open_clip() -> None:
    # A legacy model cfg has only size/mean/std; missing or falsy values get open_clip's defaults.
    legacy = PreprocessConfig.from_dict({"size": 224, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)})
    assert (legacy.interpolation, legacy.resize_mode, legacy.fill_color) == ("bicubic", "shortest", 0)
    bare = PreprocessConfig.from_dict({"size": 224, "mean": None, "std": None, "resize_mode": None})
    assert (bare.mean, bare.std, bare.resize_mode) == (OPENAI_MEAN, OPENAI_STD, "shortest")
    assert PreprocessConfig.from_dict({"size": 224, "mean": 0.5}).mean == (0.5, 0.5, 0.5)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"interpolation": "lanczos"}, "unknown interpolation 'lanczos'"),
        ({"interpolation": "random"}, "unknown interpolation 'random'"),
        ({"resize_mode": "crop"}, "unknown resize_mode 'crop'"),
        ({"mode": "L"}, "only mode 'RGB'"),
        ({"crop_pct": 0.9}, r"unknown preprocess keys \['crop_pct'\]"),
        ({"size": None}, "has no size"),
        ({"size": 0}, "size must be two positive integers"),
        ({"size": [224, 224, 3]}, "size must be an int or"),
        ({"size": "224"}, "size must be an int or"),
        ({"size": True}, "size must be an int or"),
        ({"size": 22.4}, "size must be an int or"),
        ({"mean": [0.5, 0.5]}, "mean must be a number or three numbers"),
        ({"std": [0.5, "x", 0.5]}, "std must be a number or three numbers"),
        ({"std": [0.5, 0.0, 0.5]}, "std must not contain 0"),
        ({"fill_color": 1.5}, "fill_color must be an integer"),
    ],
)
def test_config_rejects_bad_values(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PreprocessConfig.from_dict({**_cfg(224, "shortest"), **change})


# --- import discipline --------------------------------------------------------------------------


def test_runtime_does_not_import_torch_or_open_clip(tmp_path: Path) -> None:
    _image("RGBA", 97, 61).save(tmp_path / "a.png")
    _photo(400, 300).save(tmp_path / "b.jpg")
    script = textwrap.dedent(
        f"""
        import sys
        from clipgrep.embed.preprocess import PreprocessConfig, load_image

        cfg = PreprocessConfig.from_dict({{"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}})
        for name in ("a.png", "b.jpg"):
            assert load_image({str(tmp_path)!r} + "/" + name, cfg).shape == (3, 32, 32)
        print(sorted(m for m in ("torch", "torchvision", "open_clip") if m in sys.modules))
        """
    )
    pythonpath = [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath)}
    result = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
