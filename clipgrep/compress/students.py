"""Student architectures for ``clipgrep compress``: what to build and how to initialise it.

A student is an open_clip CLIP whose config is derived from the teacher's: the
same joint ``embed_dim`` (so student and teacher embeddings are comparable, which
stage 1 needs), a smaller image tower, a shallower text tower. Towers that keep
the teacher's architecture start from the teacher's weights by layer selection
(docs/paper.md §3 "Student initialisation").

Presets, with the CPU speed-ups measured in docs/stack.md §5 (onnxruntime, 2
threads, fp32, against the ViT-B/32 teacher's tower):

- ``image=b32-6l``: the teacher's ViT keeping 6 of its 12 blocks, initialised
  from them. 1.9x (1.6x int8); matches the paper's 1.6x image speed-up.
- ``image=s32``: ViT-S/32 (timm ``vit_small_patch32_224``: width 384, 12 blocks,
  6 heads, patch 32) plus a linear 384->embed_dim projection. 3.4x (measured on
  open_clip's own ViT-S-32, the same shape). Random init, or ``init=PATH`` of a
  timm checkpoint (the paper's best student started from ImageNet-21K weights).
  ViT-S/16 (``image=timm:vit_small_patch16_224``, the paper's student) is *not*
  faster on CPU at batch 16 (0.77x): 197 tokens against 50.
- ``text=4`` (alias ``text-4l``; also 6, 2): the teacher's text transformer keeping
  k blocks, with its token and positional embeddings, ``ln_final`` and
  ``text_projection``. 4 blocks: 2.95x (6: 1.97x, 2: 4.89x); the paper's 2.9x.

CLI syntax (``--student``), comma-separated ``key=value`` items, each key at most once::

    image=teacher | N | b32-6l | s32 | timm:NAME | ARCH[:N]   (default teacher)
    text=teacher | N | text-Nl                                (default teacher)
    text_width=W                                              (default: the teacher's)
    map=uniform | first                                       (default uniform)
    init=teacher | random | PATH                              (default teacher)

``N`` keeps N of the teacher's blocks; ``ARCH`` borrows the vision tower of an
open_clip architecture (``ARCH:N`` with N blocks). ``init`` applies to the towers
that change: ``teacher`` copies every tower whose shape fits the teacher (a tower
of another width starts random), ``random`` starts them random, ``PATH`` loads
the image tower from a timm or open_clip checkpoint (the text tower then comes
from the teacher). A tower left as ``teacher`` is always an exact copy. A PATH
cannot contain a comma. Example: ``--student image=b32-6l,text=4``.

``text_width=W`` narrows the text tower to width W (heads of the teacher's head
width where W allows, else one head), which starts random. It is what a small
teacher needs: the 49,408-token embedding table is ``vocab x width`` parameters,
which dominates a narrow text tower however few blocks it keeps (a 64-wide
teacher: 3.2M of its ~4M), so only a narrower table gets the student under the
paper's 39 % of the teacher's size. Stage 1 distils the narrow tower from scratch.

Parsing needs no torch; building imports it.
"""
from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..convert import local_dir
from ..convert.onnx_export import count_params
from ..convert.source import ModelSource
from ..convert.torch_env import import_open_clip
from ..errors import ClipgrepError
from .checkpoint import strip_compile_prefix

__all__ = ["StudentPlan", "StudentSpec", "build_student", "count_params", "first_layers", "parse_student",
           "plan_student", "teacher_model_cfg", "uniform_layers"]

IMAGE_PRESETS = {"b32-6l": ("teacher", 6), "s32": ("timm:vit_small_patch32_224", None)}
_SYNTAX_HINT = ("use comma-separated key=value items: image=teacher|N|b32-6l|s32|timm:NAME|ARCH[:N], "
                "text=teacher|N, text_width=W, map=uniform|first, init=teacher|random|PATH; "
                "e.g. image=b32-6l,text=4")
_VISION_BLOCK = re.compile(r"^(visual\.transformer\.resblocks\.)(\d+)(\..*)$")
_TEXT_BLOCK = re.compile(r"^((?:text\.)?transformer\.resblocks\.)(\d+)(\..*)$")


@dataclass(frozen=True)
class StudentSpec:
    """Which student to build, as explicit values (presets are expanded by ``parse_student``).

    ``image``: "teacher" (the teacher's tower, ``image_layers`` of its blocks or all),
    "timm:NAME" (a timm trunk plus a linear projection), or an open_clip architecture
    name (its vision tower). ``text_layers``: blocks of the teacher's text tower to
    keep (None: all, an exact copy). ``layer_map``: which blocks ("uniform" or
    "first"). ``init``: "teacher", "random" or a checkpoint path (see the module doc).
    ``text_width``: a narrower (random-init) text tower; None keeps the teacher's width.

    >>> StudentSpec(image="teacher", image_layers=6, text_layers=4)  # image=b32-6l,text=4
    StudentSpec(image='teacher', image_layers=6, text_layers=4, layer_map='uniform', init='teacher', text_width=None)
    """

    image: str = "teacher"
    image_layers: int | None = None
    text_layers: int | None = None
    layer_map: str = "uniform"
    init: str = "teacher"
    text_width: int | None = None

    def __post_init__(self) -> None:
        if self.layer_map not in ("uniform", "first"):
            raise ClipgrepError(f"unknown layer map {self.layer_map!r}", "use map=uniform or map=first")
        for name in ("image_layers", "text_layers", "text_width"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ClipgrepError(f"{name} must be a positive whole number, not {value!r}", _SYNTAX_HINT)
        if not self.image or not self.init:
            raise ClipgrepError("image and init must not be empty", _SYNTAX_HINT)
        if self.image.startswith("timm:") and self.image_layers is not None:
            raise ClipgrepError(f"cannot choose the number of blocks of a timm tower ({self.image})",
                                "drop the :N suffix, or pick a timm model of the depth you want")
        if self.init not in ("teacher", "random") and self.image == "teacher" and self.image_layers is None:
            raise ClipgrepError(f"init={self.init} would load the image tower, but image=teacher keeps "
                                "the teacher's", "choose a student image tower too, e.g. image=s32")

    def __str__(self) -> str:
        """The canonical ``--student`` string; ``parse_student(str(spec)) == spec``."""
        if self.image == "teacher":
            image = "teacher" if self.image_layers is None else str(self.image_layers)
        else:
            image = self.image if self.image_layers is None else f"{self.image}:{self.image_layers}"
        text = "teacher" if self.text_layers is None else str(self.text_layers)
        width = "" if self.text_width is None else f",text_width={self.text_width}"
        return f"image={image},text={text}{width},map={self.layer_map},init={self.init}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudentSpec:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def parse_student(text: str) -> StudentSpec:
    """Parse a ``--student`` value (syntax in the module doc) into a ``StudentSpec``.

    >>> parse_student("image=b32-6l,text=4")
    StudentSpec(image='teacher', image_layers=6, text_layers=4, layer_map='uniform', init='teacher', text_width=None)
    """
    items: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not key or not value:
            raise ClipgrepError(f"invalid --student {text!r}: {item!r} is not key=value", _SYNTAX_HINT)
        if key not in ("image", "text", "text_width", "map", "init"):
            raise ClipgrepError(f"invalid --student {text!r}: unknown key {key!r}", _SYNTAX_HINT)
        if key in items:
            raise ClipgrepError(f"invalid --student {text!r}: {key} given twice", _SYNTAX_HINT)
        items[key] = value
    image, image_layers = _parse_image(items.get("image", "teacher"), text)
    text_layers = _parse_text(items.get("text", "teacher"), text)
    layer_map, init = items.get("map", "uniform"), items.get("init", "teacher")
    width = items.get("text_width")
    if width is not None and not (width.isdigit() and int(width) > 0):
        raise ClipgrepError(f"invalid --student {text!r}: text_width={width} is not a width",
                            "give a positive number of channels, e.g. text_width=256")
    return StudentSpec(image, image_layers, text_layers, layer_map, init, None if width is None else int(width))


def _parse_image(value: str, text: str) -> tuple[str, int | None]:
    if value in IMAGE_PRESETS:
        return IMAGE_PRESETS[value]
    if value.isdigit():
        return "teacher", _positive(value, text)
    arch, sep, layers = value.rpartition(":")
    if sep and layers.isdigit() and arch:
        return arch, _positive(layers, text)  # StudentSpec refuses a block count for timm:NAME
    return value, None  # teacher, timm:NAME or an open_clip architecture; checked when built


def _parse_text(value: str, text: str) -> int | None:
    if value == "teacher":
        return None
    match = re.fullmatch(r"text-(\d+)l|(\d+)", value)
    if match is None:
        raise ClipgrepError(f"invalid --student {text!r}: text={value} is not a number of blocks",
                            "use text=teacher, text=N or text=text-Nl, e.g. text=4")
    return _positive(match[1] or match[2], text)


def _positive(digits: str, text: str) -> int:
    if int(digits) < 1:
        raise ClipgrepError(f"invalid --student {text!r}: a tower needs at least one block", _SYNTAX_HINT)
    return int(digits)


def uniform_layers(total: int, keep: int) -> list[int]:
    """``keep`` of ``total`` block indices, evenly spaced from the first to the last, rounding up.

    Index i is ceil(i * (total - 1) / (keep - 1)); keeping one block keeps block 0.
    The first block still sees raw embeddings and the last still feeds ``ln_final``
    / ``ln_post``, so both ends are kept. Which blocks the paper kept is unknown
    (docs/paper.md §3); 12 -> 4 gives its [REC] default.

    >>> uniform_layers(12, 4), uniform_layers(12, 6)
    ([0, 4, 8, 11], [0, 3, 5, 7, 9, 11])
    """
    _check_keep(total, keep)
    if keep == 1:
        return [0]
    return [-(-i * (total - 1) // (keep - 1)) for i in range(keep)]


def first_layers(total: int, keep: int) -> list[int]:
    """The first ``keep`` of ``total`` blocks (``map=first``). ``first_layers(12, 4) == [0, 1, 2, 3]``."""
    _check_keep(total, keep)
    return list(range(keep))


def _check_keep(total: int, keep: int) -> None:
    if not 1 <= keep <= total:
        raise ClipgrepError(f"cannot keep {keep} of the teacher's {total} blocks",
                            f"choose between 1 and {total} blocks")


@dataclass(frozen=True)
class StudentPlan:
    """The student's open_clip config and where each tower's weights come from.

    ``image_init`` is "teacher", "random" or a checkpoint path; ``text_init`` is
    "teacher" or "random". ``*_layers`` list the teacher blocks copied, in order
    (None when the tower does not start from the teacher, or when a non-ViT
    teacher tower is copied whole). Record ``to_dict()`` in the stage's config.json.
    """

    model_cfg: dict[str, Any]
    image_init: str
    image_layers: list[int] | None
    text_init: str
    text_layers: list[int] | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_student(teacher_cfg: dict[str, Any], spec: StudentSpec) -> StudentPlan:
    """Derive the student's config from the teacher's and decide how to initialise each tower."""
    select = uniform_layers if spec.layer_map == "uniform" else first_layers
    cfg = copy.deepcopy(teacher_cfg)
    teacher_vision, teacher_text = teacher_cfg["vision_cfg"], teacher_cfg["text_cfg"]
    cfg["vision_cfg"], fits_teacher = _student_vision_cfg(teacher_vision, spec)
    if spec.image == "teacher" and spec.image_layers is None:
        image_init = "teacher"  # kept as is, whatever ``init`` says
    elif spec.init == "random" or (spec.init == "teacher" and not fits_teacher):
        image_init = "random"
    else:
        image_init = spec.init
    image_layers = None
    if image_init == "teacher" and _is_vit(teacher_vision):
        image_layers = select(teacher_vision.get("layers", 12), cfg["vision_cfg"].get("layers", 12))

    text_init, text_layers = "teacher", None
    if spec.text_layers is not None or spec.text_width is not None:
        if "hf_model_name" in teacher_text:
            raise ClipgrepError("cannot shrink the teacher's Hugging Face text tower "
                                f"({teacher_text['hf_model_name']})", "use text=teacher with this teacher")
        cfg["text_cfg"]["layers"] = spec.text_layers or teacher_text.get("layers", 12)
        text_init = "random" if spec.init == "random" else "teacher"
        if spec.text_width is not None and spec.text_width != teacher_text.get("width", 512):
            cfg["text_cfg"].update(width=spec.text_width, heads=_text_heads(teacher_text, spec.text_width))
            text_init = "random"  # no teacher weight fits a narrower tower
    if text_init == "teacher" and "hf_model_name" not in teacher_text:
        total = teacher_text.get("layers", 12)
        text_layers = select(total, spec.text_layers or total)
    return StudentPlan(cfg, image_init, image_layers, text_init, text_layers)


def _text_heads(teacher_text: dict[str, Any], width: int) -> int:
    """Attention heads for a ``width``-wide text tower: the teacher's head width where it divides."""
    head_width = teacher_text.get("width", 512) // teacher_text.get("heads", 8)
    return width // head_width if width % head_width == 0 else 1


def _student_vision_cfg(teacher_vision: dict[str, Any], spec: StudentSpec) -> tuple[dict[str, Any], bool]:
    """The student's vision_cfg, and whether the teacher's weights fit it (blocks aside)."""
    image_size = teacher_vision.get("image_size", 224)
    if spec.image.startswith("timm:"):
        return {"timm_model_name": spec.image[5:], "timm_model_pretrained": False, "timm_pool": "",
                "timm_proj": "linear", "image_size": image_size}, False
    if spec.image == "teacher":
        vision = copy.deepcopy(teacher_vision)
        if spec.image_layers is not None:
            if not _is_vit(vision):
                raise ClipgrepError("cannot drop blocks from the teacher's image tower: it is not an "
                                    "open_clip ViT", "use image=teacher, image=s32 or image=timm:NAME")
            _check_keep(vision.get("layers", 12), spec.image_layers)
            vision["layers"] = spec.image_layers
        return vision, True
    open_clip = import_open_clip()
    other = open_clip.get_model_config(spec.image)
    if other is None:
        raise ClipgrepError(f"open_clip has no architecture {spec.image!r} for the student's image tower",
                            "use image=teacher, N, b32-6l, s32, timm:NAME or an open_clip name like ViT-S-32")
    # Teacher and student see the same preprocessed pixels in distillation.
    vision = {**other["vision_cfg"], "image_size": image_size}
    if spec.image_layers is not None:
        vision["layers"] = spec.image_layers
    return vision, _same_vit(open_clip, vision, teacher_vision)


def _same_vit(open_clip: Any, student: dict[str, Any], teacher: dict[str, Any]) -> bool:
    if not (_is_vit(student) and _is_vit(teacher)):
        return False
    a, b = (asdict(open_clip.model.CLIPVisionCfg(**c)) for c in (student, teacher))
    layers_fit = a.pop("layers") <= b.pop("layers")
    return layers_fit and a == b


def _is_vit(vision_cfg: dict[str, Any]) -> bool:
    """An open_clip VisionTransformer (not a timm trunk, not a ModifiedResNet with a tuple of layers)."""
    return not vision_cfg.get("timm_model_name") and isinstance(vision_cfg.get("layers", 12), int)


def build_student(teacher_model: Any, teacher_model_cfg: dict[str, Any],
                  spec: StudentSpec) -> tuple[Any, dict[str, Any]]:
    """Build the student for ``spec`` and initialise it; returns ``(model, model_cfg)``.

    ``teacher_model_cfg`` must be the config ``teacher_model`` was built from (see
    ``teacher_model_cfg()``). The student is built on the current default device
    in fp32, in eval mode, with the teacher's logit scale and preprocessing config;
    save it with ``checkpoint.save_local_dir(model, model_cfg, preprocess, ...)``.

    >>> spec = parse_student("image=b32-6l,text=4")
    >>> student, cfg = build_student(teacher, teacher_model_cfg("ViT-B-32"), spec)  # doctest: +SKIP
    """
    import torch

    open_clip = import_open_clip()
    plan = plan_student(teacher_model_cfg, spec)
    student = _instantiate(open_clip, plan.model_cfg)
    with torch.no_grad():
        _copy_from_teacher(student, teacher_model, plan)
        if plan.image_init not in ("teacher", "random"):
            _load_image_checkpoint(student, Path(plan.image_init).expanduser())
    preprocess = getattr(teacher_model.visual, "preprocess_cfg", None)
    if preprocess is not None:
        open_clip.set_model_preprocess_cfg(student, copy.deepcopy(dict(preprocess)))
    return student.eval(), plan.model_cfg


def _instantiate(open_clip: Any, model_cfg: dict[str, Any]) -> Any:
    """What ``open_clip.create_model`` instantiates for ``model_cfg``, without its registry."""
    cfg = copy.deepcopy(model_cfg)
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg["text_cfg"]
    cls = open_clip.model.CustomTextCLIP if custom_text else open_clip.model.CLIP
    try:
        model = cls(**cfg)
    except (RuntimeError, ValueError, KeyError, TypeError, AssertionError) as e:
        raise ClipgrepError(f"open_clip cannot build the student: {e}",
                            "check the --student image tower") from None
    _check_timm_size(model, cfg["vision_cfg"])
    return model


def _check_timm_size(model: Any, vision_cfg: dict[str, Any]) -> None:
    """open_clip builds a timm trunk at the trunk's own resolution, ignoring image_size."""
    patch_embed = getattr(getattr(model.visual, "trunk", None), "patch_embed", None)
    trunk_size = tuple(getattr(patch_embed, "img_size", None) or ())
    size = vision_cfg.get("image_size", 224)
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    if trunk_size and trunk_size != size:
        raise ClipgrepError(f"{vision_cfg['timm_model_name']} takes {trunk_size[0]}px images but the teacher "
                            f"takes {size[0]}px", "pick a timm model made for the teacher's image size")


def _copy_from_teacher(student: Any, teacher: Any, plan: StudentPlan) -> None:
    """Copy the logit scale/bias and every teacher-initialised tower, remapping block indices."""
    unwrap = strip_compile_prefix
    source, teacher_buffers = unwrap(teacher.state_dict()), unwrap(dict(teacher.named_buffers()))
    student_state = student.state_dict()  # detached views: copying into them sets the parameters
    # Non-persistent buffers (CLIP's causal attn_mask) are not in state_dict.
    targets = {**dict(student.named_buffers()), **student_state}
    for key, target in targets.items():
        src_key = _teacher_key(key, plan)
        if src_key is None:
            continue
        src = source.get(src_key, teacher_buffers.get(src_key))
        if src is None and key not in student_state:
            continue  # a buffer the teacher does not have; the student's own is fine
        if src is None or src.shape != target.shape:
            raise ClipgrepError(f"the teacher's weights do not match its config at {src_key}",
                                "pass the model_cfg the teacher was built from")
        target.copy_(src)


def _teacher_key(key: str, plan: StudentPlan) -> str | None:
    """The teacher parameter that initialises student parameter ``key``, or None."""
    if key.startswith("logit_"):
        return key
    if key.startswith("visual."):
        return _remap(key, _VISION_BLOCK, plan.image_layers) if plan.image_init == "teacher" else None
    return _remap(key, _TEXT_BLOCK, plan.text_layers) if plan.text_init == "teacher" else None


def _remap(key: str, pattern: re.Pattern[str], layers: list[int] | None) -> str:
    match = pattern.match(key)
    if match is None or layers is None:
        return key
    return f"{match[1]}{layers[int(match[2])]}{match[3]}"


def _load_image_checkpoint(student: Any, path: Path) -> None:
    """Load a timm trunk checkpoint, or an open_clip image tower (keys with or without ``visual.``)."""
    if not path.is_file():
        raise ClipgrepError(f"init checkpoint {path} does not exist",
                            "pass init=teacher, init=random or the path of a timm or open_clip checkpoint")
    import pickle

    from open_clip.factory import load_state_dict
    from safetensors import SafetensorError

    try:
        state = load_state_dict(str(path), weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError) as e:
        raise ClipgrepError(f"cannot read init checkpoint {path}: {type(e).__name__}",
                            "use a .safetensors file or a torch state dict") from None
    state = strip_compile_prefix(state)
    if any(k.startswith("visual.") for k in state):
        state, target = {k[7:]: v for k, v in state.items() if k.startswith("visual.")}, student.visual
    else:
        target = getattr(student.visual, "trunk", student.visual)
    misfit = f"init checkpoint {path.name} does not fit the student's image tower"
    try:
        missing, unexpected = target.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        detail = str(e).strip().splitlines()[-1].strip()
        raise ClipgrepError(f"{misfit}: {detail}", "check that it is for the same model") from None
    unexpected = [k for k in unexpected if not k.startswith("head.")]  # timm's ImageNet classifier
    if missing or unexpected:
        raise ClipgrepError(f"{misfit} (missing {missing[:3]}, unexpected {unexpected[:3]})",
                            "check that it is for the same model")


def source_model_cfg(source: ModelSource) -> dict[str, Any]:
    """The open_clip model_cfg of a model source: its local dir's, or its architecture's."""
    if source.arch is None:
        assert source.checkpoint is not None  # ModelSource.parse gives a local dir or an arch
        return teacher_model_cfg(source.checkpoint)
    return teacher_model_cfg(source.arch)


def teacher_model_cfg(model: str | Path) -> dict[str, Any]:
    """The open_clip model_cfg of an architecture name or of a local dir ("local-dir:PATH", a Path or a dir).

    >>> teacher_model_cfg("ViT-B-32")["vision_cfg"]["layers"]  # doctest: +SKIP
    12
    """
    name = str(model)
    local = Path(name.removeprefix("local-dir:")).expanduser()
    if isinstance(model, Path) or name.startswith("local-dir:") or local.is_dir():
        return local_dir.model_cfg(local)
    cfg = import_open_clip().get_model_config(name)
    if cfg is None:
        raise ClipgrepError(f"open_clip has no architecture {name!r}", "pass e.g. ViT-B-32, or a local dir path")
    return cfg
