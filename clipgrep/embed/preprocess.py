"""CLIP image preprocessing with PIL and numpy only.

``preprocess`` reproduces open_clip's eval transform
(``open_clip.transform.image_transform_v2(cfg, is_train=False)``) pixel for pixel
without importing torch: torchvision's transforms, given a PIL image, only do size
arithmetic and then call PIL (``resize``, ``ImageOps.expand``, ``crop``,
``convert``), so making the same PIL calls with the same arguments gives the same
pixels. Every helper below mirrors one torchvision/open_clip step; the comments name
the step. Keep it that way: "simplifying" the arithmetic (rounding, the order of
resize/crop/convert, which filter is used) breaks parity with the embeddings the
model was trained and exported with.

``load_image`` adds what open_clip leaves to the caller: opening only the formats
clipgrep supports (``formats.open_image``), EXIF orientation, and reduced-size JPEG
decoding (``draft``), the one deliberate, measured departure from a full decode. One
other departure is limited to images of absurd shape, where open_clip's resize would
take gigabytes (``MAX_RESIZED_PIXELS``).

Runtime module: it must never import torch, torchvision or open_clip.
"""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageOps

from .formats import open_image

_FILTERS: dict[str, Image.Resampling] = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
}
_RESIZE_MODES = ("shortest", "longest", "squash")
# open_clip's PreprocessCfg fields; "mode" is accepted but can only be RGB there too.
_KEYS = frozenset({"size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color"})
# What open_clip uses when a key is missing or falsy: PreprocessCfg's defaults, and
# image_transform's own `mean or OPENAI_DATASET_MEAN`, `interpolation or 'bicubic'`...
_DEFAULTS: dict[str, Any] = {
    "mean": (0.48145466, 0.4578275, 0.40821073),  # open_clip.constants.OPENAI_DATASET_MEAN
    "std": (0.26862954, 0.26130258, 0.27577711),  # open_clip.constants.OPENAI_DATASET_STD
    "interpolation": "bicubic",
    "resize_mode": "shortest",
    "fill_color": 0,
}

# JPEG draft: decode at 1/2, 1/4 or 1/8 scale in the DCT domain, but keep at least
# DRAFT_OVERSAMPLE times the size the resize produces, so the final antialiased
# bicubic still does real downsampling (the DCT scaling alone is close to a box
# filter), as PIL's own thumbnail() does with reducing_gap=2. Measured on generated
# 4000x3000 photos, shortest-edge 224: full decode ~150 ms, oversample 2 ~38 ms,
# oversample 1 ~32 ms; oversample 1 deviated 2-3x more from the full decode.
DRAFT_OVERSAMPLE = 2.0
_DRAFT_FORMATS = frozenset({"JPEG", "MPO"})  # MPO: multi-picture JPEGs many cameras write
# The resize before a centre crop can be far larger than the crop: shortest edge 224 of a
# 10000x1 PNG is 2240000x224, 2 GB in PIL's 4-byte RGB, to keep 224x224 of it. Past this many
# pixels only the part the crop keeps is resized (PIL's ``box``). That is not bit-identical to
# resize-then-crop (PIL takes the box in float32 and weighs the pixels slightly differently:
# measured, a few grey levels in some pixels, 0.3 on average), so every image of a sane shape
# keeps open_clip's exact steps; at 224 this starts beyond an 80:1 aspect ratio.
MAX_RESIZED_PIXELS = 4_000_000
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width/height


@dataclass(frozen=True)
class PreprocessConfig:
    """open_clip's PreprocessCfg as stored in a bundle manifest; size is (height, width)."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    resize_mode: str
    fill_color: int = 0

    def __post_init__(self) -> None:
        self._validate()
        # Lists given by hand become tuples, so configs compare and hash by value.
        for name in ("size", "mean", "std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    def _validate(self) -> None:
        if self.interpolation not in _FILTERS:
            raise ValueError(
                f"unknown interpolation {self.interpolation!r}; expected one of {sorted(_FILTERS)}"
            )
        if self.resize_mode not in _RESIZE_MODES:
            raise ValueError(
                f"unknown resize_mode {self.resize_mode!r}; expected one of {list(_RESIZE_MODES)}"
            )
        if not _is_pair(self.size) or not all(_is_int(v) and v > 0 for v in self.size):
            raise ValueError(f"size must be two positive integers (height, width), got {self.size!r}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if not isinstance(values, Sequence) or len(values) != 3 or not all(_is_number(v) for v in values):
                raise ValueError(f"{name} must be three numbers, got {values!r}")
        if any(v == 0 for v in self.std):
            raise ValueError(f"std must not contain 0, got {self.std!r}")  # torchvision refuses it too
        if not _is_int(self.fill_color):
            raise ValueError(f"fill_color must be an integer, got {self.fill_color!r}")

    @property
    def height(self) -> int:
        return self.size[0]

    @property
    def width(self) -> int:
        return self.size[1]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessConfig:
        """Build from open_clip's preprocess cfg dict (``size`` an int or ``[h, w]``)."""
        unknown = set(d) - _KEYS
        if unknown:
            # A key we do not know may change preprocessing; guessing would silently break parity.
            raise ValueError(
                f"unknown preprocess keys {sorted(unknown)}; expected a subset of {sorted(_KEYS)}"
            )
        if d.get("size") is None:  # PreprocessCfg defaults to 224, but a model's input size must be explicit
            raise ValueError("preprocess config has no size")
        if d.get("mode", "RGB") not in ("RGB", None):
            raise ValueError(f"only mode 'RGB' is supported, got {d['mode']!r}")
        # `or`, not `is None`: open_clip replaces any falsy value (None, 0, "") by the default.
        opt = {k: d.get(k) or v for k, v in _DEFAULTS.items()}
        return cls(
            size=_parse_size(d["size"]),
            mean=_parse_triple("mean", opt["mean"]),
            std=_parse_triple("std", opt["std"]),
            interpolation=opt["interpolation"],
            resize_mode=opt["resize_mode"],
            fill_color=opt["fill_color"],
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict with open_clip's key names; ``PreprocessCfg(**d)`` accepts it."""
        return {
            "size": [self.height, self.width],
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
            "fill_color": self.fill_color,
        }


def _is_pair(v: object) -> bool:
    return isinstance(v, Sequence) and not isinstance(v, str) and len(v) == 2


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool)


def _parse_size(size: Any) -> tuple[int, int]:
    # open_clip treats an int, [s] and [s, s] the same in every resize mode.
    if _is_int(size):
        return (int(size), int(size))
    if isinstance(size, Sequence) and not isinstance(size, str) and len(size) in (1, 2) \
            and all(_is_int(v) for v in size):
        return (int(size[0]), int(size[-1]))
    raise ValueError(f"size must be an int or [height, width], got {size!r}")


def _parse_triple(name: str, values: Any) -> tuple[float, float, float]:
    if _is_number(values):  # open_clip broadcasts a scalar mean/std to three channels
        return (float(values),) * 3
    if isinstance(values, Sequence) and not isinstance(values, str) and len(values) == 3 \
            and all(_is_number(v) for v in values):
        return (float(values[0]), float(values[1]), float(values[2]))
    raise ValueError(f"{name} must be a number or three numbers, got {values!r}")


# --- the eval transform, step by step -------------------------------------------------------


def preprocess(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """Return the float32 [3, H, W] model input open_clip's eval transform makes from ``img``.

    Resize and crop happen in the image's own mode and only then is it converted to
    RGB, as in open_clip (so PIL resizes RGBA premultiplied, P and 1 with NEAREST...).
    """
    (width, height), resample = resize_plan(img.width, img.height, cfg)
    if cfg.resize_mode == "shortest" and width * height > MAX_RESIZED_PIXELS:
        img = _resize_only_the_crop(img, (width, height), resample, cfg.size)
    else:
        img = _resize(img, (width, height), resample)
    if cfg.resize_mode == "longest":
        img = _center_crop_or_pad(img, cfg.size, fill=cfg.fill_color)  # open_clip CenterCropOrPad
    elif cfg.resize_mode == "shortest":
        img = _center_crop_or_pad(img, cfg.size, fill=0)  # torchvision CenterCrop always pads with 0
    return _normalize(_to_rgb(img), cfg)


def resize_plan(width: int, height: int, cfg: PreprocessConfig) -> tuple[tuple[int, int], Image.Resampling]:
    """(width, height) the resize step produces for an image of this size, and its filter.

    Mirrors the branch open_clip's ``image_transform`` picks for ``is_train=False``.
    """
    resample = _FILTERS[cfg.interpolation]
    if cfg.resize_mode == "squash":
        return (cfg.width, cfg.height), resample  # torchvision Resize((h, w))
    if cfg.resize_mode == "longest":
        return _keep_ratio_size(width, height, cfg.size, longest=1.0), resample
    if cfg.height == cfg.width:
        return _shortest_edge_size(width, height, cfg.height), resample  # torchvision Resize(int)
    # Non-square shortest: open_clip builds ResizeKeepRatio(size) without passing the
    # interpolation, so it is always bicubic there, whatever the config says.
    return _keep_ratio_size(width, height, cfg.size, longest=0.0), Image.Resampling.BICUBIC


def _shortest_edge_size(width: int, height: int, size: int) -> tuple[int, int]:
    # torchvision.transforms.functional._compute_resized_output_size with size=[s]:
    # the long edge is truncated with int(), computed as (s * long) / short.
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def _keep_ratio_size(width: int, height: int, target: tuple[int, int], longest: float) -> tuple[int, int]:
    # open_clip ResizeKeepRatio.get_params without the random parts: Python round()
    # (half to even) of each edge over the shortest (longest=0) or longest (=1) ratio.
    ratio_h = height / target[0]
    ratio_w = width / target[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    new_h, new_w = (round(x * 1.0 / ratio) for x in (height, width))
    return (new_w, new_h)


def _resize(img: Image.Image, size: tuple[int, int], resample: Image.Resampling) -> Image.Image:
    # torchvision F.resize returns the image untouched when the size already matches.
    if img.size == size:
        return img
    return img.resize(size, resample)


def _resize_only_the_crop(img: Image.Image, size: tuple[int, int], resample: Image.Resampling,
                          crop: tuple[int, int]) -> Image.Image:
    """``_resize`` to ``size`` then the centre ``crop``, computing only the pixels the crop keeps.

    The crop window, mapped back onto the source, is resized straight to the crop size; the
    intermediate image never exists. Then ``_center_crop_or_pad`` has nothing left to do.
    """
    (new_w, new_h), (crop_h, crop_w) = size, crop
    if new_w < crop_w or new_h < crop_h:  # padding needed: the plain steps (no huge image either)
        return _resize(img, size, resample)
    left, top = _crop_offset(new_w, crop_w), _crop_offset(new_h, crop_h)
    # Multiply before dividing: the right and bottom edges come out exactly at the image's
    # edges when the crop reaches them (PIL refuses a box beyond the image by one ulp).
    box = (left * img.width / new_w, top * img.height / new_h,
           (left + crop_w) * img.width / new_w, (top + crop_h) * img.height / new_h)
    return img.resize((crop_w, crop_h), resample, box=box)


def _crop_offset(size: int, crop: int) -> int:
    return round((size - crop) / 2.0)


def _center_crop_or_pad(img: Image.Image, size: tuple[int, int], fill: int) -> Image.Image:
    # torchvision F.center_crop / open_clip center_crop_or_pad: pad to at least the crop
    # size (extra pixel on the right/bottom), then crop with int(round()) offsets.
    crop_h, crop_w = size
    if crop_w > img.width or crop_h > img.height:
        dw, dh = max(crop_w - img.width, 0), max(crop_h - img.height, 0)
        img = _pad(img, (dw // 2, dh // 2, (dw + 1) // 2, (dh + 1) // 2), fill)
        if img.size == (crop_w, crop_h):
            return img
    top, left = _crop_offset(img.height, crop_h), _crop_offset(img.width, crop_w)
    return img.crop((left, top, left + crop_w, top + crop_h))


def _pad(img: Image.Image, ltrb: tuple[int, int, int, int], fill: int) -> Image.Image:
    # torchvision _functional_pil.pad, constant mode: the fill is repeated per band (so
    # it is in the image's own mode: 0 is white in CMYK, transparent in RGBA) and P
    # images get their palette put back afterwards.
    bands = len(img.getbands())
    color: int | tuple[int, ...] = (int(fill),) * bands if bands > 1 else int(fill)
    if img.mode == "P":
        palette = img.getpalette()
        out = ImageOps.expand(img, border=ltrb, fill=color)
        if palette is not None:
            out.putpalette(palette)
        return out
    return ImageOps.expand(img, border=ltrb, fill=color)


def _to_rgb(img: Image.Image) -> Image.Image:
    # open_clip MaybeConvertMode: plain convert("RGB"), alpha dropped, not composited.
    # P images with bytes transparency make PIL warn about the transparency it drops;
    # that is expected here, so silence exactly that warning, only around this call.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Palette images with Transparency", category=UserWarning)
        return img.convert("RGB")


def _normalize(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    # torchvision to_tensor (uint8 / 255 in float32) then Normalize ((x - mean) / std,
    # mean and std cast to float32 first): same IEEE float32 operations, same bits.
    x = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32)
    x /= np.float32(255)
    x -= np.asarray(cfg.mean, dtype=np.float32)[:, None, None]
    x /= np.asarray(cfg.std, dtype=np.float32)[:, None, None]
    return x


# --- loading files -------------------------------------------------------------------------


class ImageTooLarge(ValueError):
    """An image with more pixels than a caller's limit; the message is the short reason."""

    def __init__(self, pixels: int, limit: int, what: str = "too many pixels") -> None:
        super().__init__(f"{what} ({pixels / 1e6:.3g} MP > {limit / 1e6:.3g} MP)")


def load_image(
    source: str | os.PathLike[str] | BinaryIO, cfg: PreprocessConfig, *, draft: bool = True,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Open an image, apply its EXIF orientation and return ``preprocess``'s array.

    With ``draft`` JPEGs are decoded at a reduced scale when that still leaves enough
    pixels for the resize; ``draft=False`` is exactly open_clip's transform on the
    opened, EXIF-transposed image. ``max_pixels`` bounds the pixels actually decoded (after
    the draft), and so the memory: PIL holds 4 bytes a pixel in RGB, twice over while
    turning an image upright. Raises ``ImageTooLarge`` over it, ``formats.UnsupportedImageFormat``
    for a format clipgrep does not open; other PIL errors propagate.
    """
    with open_image(source) as im:  # closes the file we opened; a caller's handle stays theirs
        if draft and im.format in _DRAFT_FORMATS:
            _draft(im, cfg)
        if max_pixels is not None and im.width * im.height > max_pixels:
            raise ImageTooLarge(im.width * im.height, max_pixels, "too many pixels to decode")
        return preprocess(_upright(im), cfg)


def _orientation(im: Image.Image) -> int:
    value = im.getexif().get(ExifTags.Base.Orientation, 1)
    return value if isinstance(value, int) else 1


def _upright(im: Image.Image) -> Image.Image:
    # ImageOps.exif_transpose, minus the full copy it makes of an image that needs no
    # turning. Load first, as it does: some formats (PNG) only know their EXIF after decoding.
    im.load()
    if _orientation(im) in range(2, 9):
        return ImageOps.exif_transpose(im)
    return im


def _draft(im: Image.Image, cfg: PreprocessConfig) -> None:
    """Ask the JPEG decoder for a 1/2, 1/4 or 1/8 scale when the resize allows it."""
    # A JPEG's EXIF is parsed at open, so reading it here leaves the pixels undecoded.
    turned = _orientation(im) in _TRANSPOSING_ORIENTATIONS
    width, height = (im.height, im.width) if turned else im.size  # plan in display orientation...
    (out_w, out_h), _ = resize_plan(width, height, cfg)
    need_w, need_h = (max(1, math.ceil(v * DRAFT_OVERSAMPLE)) for v in (out_w, out_h))
    if turned:  # ...but request in the stored one
        need_w, need_h = need_h, need_w
    # PIL picks the largest scale s in {8, 4, 2, 1} with s <= min(W // need_w, H // need_h)
    # and decodes ceil(W / s) x ceil(H / s), never below the request. Skip it when no
    # reduction is possible: draft then only costs a decoder reconfiguration.
    if min(im.width // need_w, im.height // need_h) >= 2:
        im.draft("RGB", (need_w, need_h))  # "RGB" leaves the decoded mode alone (only L/YCbCr change it)
