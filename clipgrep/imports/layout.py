"""Reading a published ONNX export (Immich's layout) without torch.

What Immich publishes (immich-app/immich, ``machine-learning/``, read 2026-12:
exporter ``export/immich_model_exporter/exporters/onnx/models/openclip.py`` and
``mclip.py``; runtime ``immich_ml/models/clip/visual.py`` and ``textual.py``),
one Hugging Face repo per model (``immich-app/ViT-B-32__openai``...)::

    config.json                  open_clip's model config: embed_dim, vision_cfg, text_cfg
                                 (text_cfg.context_length, default 77; tokenizer_kwargs.clean;
                                 hf_tokenizer_name)
    visual/model.onnx            input "image" float32 [1,3,S,S] -> "embedding" float32 [1,D]
    visual/preprocess_cfg.json   open_clip's preprocess cfg: size, mode, mean, std,
                                 interpolation, resize_mode, fill_color
    textual/model.onnx           open_clip models: input "text" int32 [1,L]
                                 M-CLIP (XLM-R...): "input_ids", "attention_mask" int32 [1,77]
                                 -> "embedding" float32 [1,D]
    textual/tokenizer.json       HF tokenizers file; textual/tokenizer_config.json has pad_token
    visual|textual/fp16, rknpu/  other runtimes' variants (not used here)

Both graphs are traced with batch 1 and *no* dynamic axes (``dynamic_axes`` is
commented out in the exporter) and their outputs are already L2-normalised.
The tracer bakes that batch size into Reshape/Expand constants (marking the
input's batch axis symbolic alone makes onnxruntime fail in the class embedding
and the attention Reshapes). The import gives the image graph a batch axis again
(clipgrep.imports.batching, checked against the batch-1 graph); a graph it cannot
rewrite, and the text graphs (a query is one row), run row by row. Tensor names,
dtypes and batch dims are read from the graphs themselves, not assumed, so a
re-export with dynamic axes is run batched as it is.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..embed.preprocess import PreprocessConfig
from ..errors import ClipgrepError

LAYOUT_IMMICH = "immich"
# Files a model needs from an Immich repo: the root config and each tower's own
# directory (not its fp16/rknpu subdirectories).
TOWER_DIRS = ("visual", "textual")

# ONNX TensorProto element types -> numpy dtype names.
_ONNX_DTYPES = {1: "float32", 6: "int32", 7: "int64", 10: "float16"}


@dataclass(frozen=True)
class TowerGraph:
    """One encoder graph of an export and how to feed it."""

    path: Path
    input: str
    input_dtype: str
    output: str
    mask_input: str | None
    batch: int | None  # fixed batch size, or None when the batch axis is dynamic
    shape: tuple[int | str, ...]

    def encoder_spec(self, file: str) -> dict[str, Any]:
        spec: dict[str, Any] = {"file": file, "input": self.input, "output": self.output,
                                "input_dtype": self.input_dtype}
        if self.mask_input:
            spec["mask_input"] = self.mask_input
        if self.batch is not None:
            spec["batch"] = self.batch
        return spec


@dataclass(frozen=True)
class PublishedExport:
    """A published export on disk, understood well enough to become a bundle."""

    layout: str
    root: Path
    image: TowerGraph
    text: TowerGraph
    embed_dim: int
    preprocess: PreprocessConfig
    tokenizer_path: Path
    tokenizer: dict[str, Any]  # the bundle manifest's tokenizer settings (hf-tokenizers), without "file"
    model_config: dict[str, Any]
    # For a CLIP BPE tokenizer.json: the merges and settings of clipgrep's own (faster) tokenizer.
    clip_bpe: ClipBpe | None = None


@dataclass(frozen=True)
class ClipBpe:
    merges: list[str]
    settings: dict[str, Any]  # the manifest's clip-bpe tokenizer settings, without "file"


def _bad(root: Path, what: str) -> ClipgrepError:
    return ClipgrepError(f"{root}: {what}",
                         "pass a directory in Immich's layout (config.json, visual/, textual/), "
                         "e.g. a download of https://huggingface.co/immich-app/ViT-B-32__openai")


def _read_json(root: Path, relative: str) -> dict[str, Any]:
    path = root / relative
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _bad(root, f"{relative} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(root, f"cannot read {relative}: {e}") from None
    if not isinstance(data, dict):
        raise _bad(root, f"{relative} is not a JSON object")
    return data


def read_export(root: Path, *, source_name: str = "") -> PublishedExport:
    """Understand the export in ``root`` (Immich's layout); ``source_name`` is its repo or dir name."""
    if not (root / "visual" / "model.onnx").is_file() or not (root / "textual" / "model.onnx").is_file():
        raise _bad(root, "no visual/model.onnx and textual/model.onnx (not an export in Immich's layout)")
    config = _read_json(root, "config.json")
    text_cfg = config.get("text_cfg") or {}
    try:
        preprocess = PreprocessConfig.from_dict(_read_json(root, "visual/preprocess_cfg.json"))
    except ValueError as e:
        raise _bad(root, f"visual/preprocess_cfg.json: {e}") from None
    image = inspect_graph(root / "visual" / "model.onnx")
    text = inspect_graph(root / "textual" / "model.onnx")
    embed_dim = config.get("embed_dim")
    if not isinstance(embed_dim, int) or embed_dim <= 0:
        raise _bad(root, "config.json has no positive integer embed_dim")
    context_length = int(text_cfg.get("context_length", 77))
    if isinstance(text.shape[-1], int) and text.shape[-1] != context_length:
        context_length = text.shape[-1]  # the traced graph fixes it (M-CLIP: 77)
    if image.input_dtype != "float32" or text.input_dtype not in ("int32", "int64"):
        raise _bad(root, f"unexpected input types: image {image.input_dtype}, text {text.input_dtype}")
    tokenizer_config = _read_json(root, "textual/tokenizer_config.json")
    pad_token = tokenizer_config.get("pad_token")
    if isinstance(pad_token, dict):  # an AddedToken serialised by transformers
        pad_token = pad_token.get("content")
    if not isinstance(pad_token, str):
        raise _bad(root, "textual/tokenizer_config.json has no pad_token")
    tokenizer_path = root / "textual" / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise _bad(root, "textual/tokenizer.json is missing")
    kwargs = text_cfg.get("tokenizer_kwargs") or {}
    is_nllb = "nllb" in str(text_cfg.get("hf_tokenizer_name", "")).lower() or \
        source_name.rsplit("/", 1)[-1].lower().startswith("nllb")
    tokenizer = {
        "kind": "hf-tokenizers",
        "context_length": context_length,
        "pad_token": pad_token,
        "clean": "canonicalize" if kwargs.get("clean") == "canonicalize" else "whitespace",
        "language_prefix": "flores200" if is_nllb else None,
    }
    return PublishedExport(LAYOUT_IMMICH, root, image, text, embed_dim, preprocess, tokenizer_path, tokenizer, config,
                           clip_bpe(tokenizer_path, tokenizer))


def clip_bpe(tokenizer_path: Path, settings: dict[str, Any]) -> ClipBpe | None:
    """clipgrep's CLIP tokenizer settings when ``tokenizer.json`` is OpenAI's CLIP BPE, else None.

    Whether the two really give the same ids is checked when the bundle is built.
    """
    from ..embed.tokenizer import MERGE_COUNT

    try:
        data = json.loads(tokenizer_path.read_text(encoding="utf-8"))
        model = data["model"]
        vocab, merges = model["vocab"], model["merges"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    sot, eot = vocab.get("<|startoftext|>"), vocab.get("<|endoftext|>")
    if model.get("type") != "BPE" or sot is None or eot is None or len(merges) < MERGE_COUNT \
            or settings["clean"] != "whitespace" or settings["language_prefix"]:
        return None
    lines = [m if isinstance(m, str) else " ".join(m) for m in merges[:MERGE_COUNT]]
    return ClipBpe(lines, {"kind": "clip-bpe", "context_length": settings["context_length"], "sot_id": sot,
                           "eot_id": eot, "pad_id": vocab.get(settings["pad_token"], 0), "clean": "lower",
                           "special_texts": ["<|startoftext|>", "<|endoftext|>"]})


def inspect_graph(path: Path) -> TowerGraph:
    """Input/output names, dtypes and batch dim of an encoder graph (weights are not loaded)."""
    from ..convert.dynamic_int8 import read_model

    try:
        graph = read_model(path, with_weights=False).graph
    except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError and friends
        raise ClipgrepError(f"{path} is not a readable ONNX model: {e}", "re-download the export") from None
    initializers = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(graph.output) != 1 or not 1 <= len(inputs) <= 2:
        raise ClipgrepError(f"{path}: expected one or two inputs and one output, found "
                            f"{[i.name for i in inputs]} -> {[o.name for o in graph.output]}",
                            "this export layout is not supported")
    names = [i.name for i in inputs]
    main = inputs[0]
    mask = None
    if len(inputs) == 2:
        if "attention_mask" not in names:
            raise ClipgrepError(f"{path}: two inputs but none is attention_mask: {names}",
                                "this export layout is not supported")
        main = next(i for i in inputs if i.name != "attention_mask")
        mask = "attention_mask"
    tensor = main.type.tensor_type
    dtype = _ONNX_DTYPES.get(tensor.elem_type)
    if dtype is None:
        raise ClipgrepError(f"{path}: input {main.name} has unsupported element type {tensor.elem_type}",
                            "this export layout is not supported")
    shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim)
    batch = shape[0] if shape and isinstance(shape[0], int) else None
    return TowerGraph(path, main.name, dtype, graph.output[0].name, mask, batch, shape)
