"""open_clip model -> clipgrep bundle: export, quantise, parity gate, atomic install.

Used by ``clipgrep models add`` and by ``clipgrep compress export``.
"""
from __future__ import annotations

import datetime
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..bundle import Bundle, load_bundle, write_manifest
from ..embed.preprocess import PreprocessConfig
from ..embed.tokenizer import VOCAB_FILENAME
from ..errors import ConversionError
from .onnx_export import IMAGE_INPUT, OUTPUT, TEXT_INPUT, OnnxTowers, export_towers
from .parity import check_parity, measure_parity
from .quantize import quantize_tower
from .source import LoadedModel, ModelSource, load_model
from .tokenizer_export import clip_tokenizer_settings, write_clip_tokenizer

Progress = Callable[[str], None]
STEPS = ("load model", "export ONNX", "quantize", "check parity", "install")


def convert_model(source: ModelSource, dest: Path, *, name: str, precision: str = "int8",
                  on_progress: Progress | None = None) -> Bundle:
    """Convert ``source`` into a bundle at ``dest`` (which must not exist yet).

    >>> convert_model(ModelSource("ViT-B-32", "laion2b_s34b_b79k"), Path("b32"), name="b32")  # doctest: +SKIP
    """
    return convert_models(source, {precision: (dest, name)}, on_progress=on_progress)[0]


def convert_models(source: ModelSource, targets: dict[str, tuple[Path, str]], *,
                   on_progress: Progress | None = None) -> list[Bundle]:
    """Convert ``source`` into one bundle per precision, ``{precision: (dest, name)}``: the model is
    loaded and exported to ONNX once, then each precision is quantised (or copied) and gated."""
    step = on_progress or (lambda _: None)
    step("load model")
    loaded = load_model(source)
    first_dest = next(iter(targets.values()))[0]
    with tempfile.TemporaryDirectory(prefix=".clipgrep-export-", dir=_existing_parent(first_dest)) as work:
        step("export ONNX")
        towers = export_onnx(loaded, Path(work))
        return [assemble_bundle(loaded, towers, dest, name=name, precision=precision, on_progress=step)
                for precision, (dest, name) in targets.items()]


def export_onnx(loaded: LoadedModel, workdir: Path) -> OnnxTowers:
    """fp32 ONNX towers of ``loaded`` in ``workdir``; feed them to ``assemble_bundle`` once per precision."""
    settings = clip_tokenizer_settings(loaded.tokenizer)
    config = PreprocessConfig.from_dict(loaded.preprocess)
    return export_towers(loaded.model, config.size, settings["context_length"], workdir)


def assemble_bundle(loaded: LoadedModel, towers: OnnxTowers, dest: Path, *, name: str, precision: str,
                    on_progress: Progress | None = None) -> Bundle:
    """Build a bundle of ``precision`` from fp32 ``towers``, gate it on parity, move it to ``dest``."""
    step = on_progress or (lambda _: None)
    if dest.exists():
        raise ConversionError(f"{dest} already exists", "remove it first or choose another name")
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=_existing_parent(dest)))
    try:
        fields = _manifest_fields(loaded, towers, name, precision)
        if precision == "int8":
            step("quantize")
            fields["quantization"] = _quantize(towers, staging, PreprocessConfig.from_dict(loaded.preprocess),
                                               fields["tokenizer"]["context_length"])
        else:
            shutil.copyfile(towers.image, staging / "image.onnx")
            shutil.copyfile(towers.text, staging / "text.onnx")
        write_clip_tokenizer(staging / VOCAB_FILENAME)
        write_manifest(staging, fields)
        step("check parity")
        figures = measure_parity(loaded, load_bundle(staging, verify="full"))
        check_parity(figures, precision, what=f"{name} ({precision})")
        write_manifest(staging, {**fields, "parity": figures})
        step("install")
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return load_bundle(dest)


def _manifest_fields(loaded: LoadedModel, towers: OnnxTowers, name: str, precision: str) -> dict[str, Any]:
    settings = clip_tokenizer_settings(loaded.tokenizer)
    return {
        "name": name,
        "embed_dim": towers.embed_dim,
        "precision": precision,
        "preprocess": PreprocessConfig.from_dict(loaded.preprocess).to_dict(),
        "tokenizer": {**settings, "file": VOCAB_FILENAME},
        "encoders": {
            "image": {"file": "image.onnx", "input": IMAGE_INPUT, "output": OUTPUT},
            "text": {"file": "text.onnx", "input": TEXT_INPUT, "output": OUTPUT},
        },
        "params": towers.params,
        "provenance": {
            **loaded.provenance,
            "clipgrep_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    }


def _quantize(towers: OnnxTowers, staging: Path, preprocess: PreprocessConfig,
              context_length: int) -> dict[str, Any]:
    # Timing inputs: batch 4 is near the measured CPU sweet spot (8-16) and quick to run.
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((4, 3, *preprocess.size), dtype=np.float32)
    ids = np.zeros((4, context_length), np.int64)
    ids[:, :12] = rng.integers(1, 49000, (4, 12))
    return {
        "image": quantize_tower(towers.image, staging / "image.onnx", pixels, IMAGE_INPUT),
        "text": quantize_tower(towers.text, staging / "text.onnx", ids, TEXT_INPUT),
    }


def _existing_parent(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest.parent
