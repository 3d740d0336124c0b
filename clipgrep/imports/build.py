"""Published export -> clipgrep bundle, without torch: give a batch-1 image graph its batch axis back
(batching.py), quantise, gate against the fp32 export, write.

The gate is the conversion gate's, with the fp32 export as the reference
(there is no open_clip model here): the bundle runs the real runtime path
(file bytes -> Pillow/numpy preprocessing -> onnxruntime; text -> tokenizer ->
onnxruntime) and must match the fp32 graphs fed with the same inputs, min
cosine >= 0.995 for int8; token ids must equal those of the export's
tokenizer.json run with the export's own padding/truncation.
"""
from __future__ import annotations

import datetime
import io
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..bundle import EncoderSpec, load_bundle, sha256_file, write_manifest
from ..convert.parity import THRESHOLDS, _summary, check_parity  # the conversion gate (torch-free module)
from .layout import PublishedExport, TowerGraph

Progress = Callable[[str], None]
TOKENIZER_FILE = "tokenizer.json"


def build_bundle(export: PublishedExport, staging: Path, *, name: str, precision: str,
                 provenance: dict[str, Any], on_progress: Progress | None = None) -> None:
    """Write a gated bundle of ``export`` into the empty directory ``staging``."""
    step = on_progress or (lambda _: None)
    staging.mkdir(parents=True, exist_ok=True)
    image, batching = export.image, "dynamic in the export"
    if image.batch is not None:
        step("add a batch axis")
        image, batching = batched_image_tower(export, staging)
    fields: dict[str, Any] = {
        "name": name,
        "embed_dim": export.embed_dim,
        "precision": precision,
        "preprocess": export.preprocess.to_dict(),
        "tokenizer": install_tokenizer(export, staging),
        "encoders": {"image": image.encoder_spec("image.onnx"),
                     "text": export.text.encoder_spec("text.onnx")},
        "provenance": {
            **provenance,
            "layout": export.layout,
            "image_batch": batching,
            "source_files": source_hashes(export.root),
            "clipgrep_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    }
    if precision == "int8":
        step("quantize")
        fields["quantization"] = _quantize(export, image, staging, shared_image_tower(export, fields))
    else:
        # write_manifest finds and hashes external weights itself (bundle.py).
        _copy_fp32(image.path, staging / "image.onnx")
        _copy_fp32(export.text.path, staging / "text.onnx")
    if image is not export.image:
        for path in (image.path, _weights_file(image.path)):
            path.unlink(missing_ok=True)
    write_manifest(staging, fields)
    step("check parity")
    figures = measure_parity(export, staging)
    check_parity(figures, precision, what=f"{name} ({precision})", reference="the fp32 export")
    write_manifest(staging, {**fields, "parity": figures})


def install_tokenizer(export: PublishedExport, staging: Path) -> dict[str, Any]:
    """Put the tokenizer in ``staging``; return its manifest settings.

    A CLIP BPE tokenizer.json runs on clipgrep's own CLIP tokenizer when that
    gives the very same ids on the parity strings (it loads in ~70 ms against
    ~200-330 ms for ``tokenizers`` with CLIP's 49k-entry vocabulary, measured
    here, and a search has ~0.5 s in all); anything else runs through
    ``tokenizers`` with the export's own settings.
    """
    from ..convert.parity_samples import SAMPLE_TEXTS
    from ..embed.tokenizer import VOCAB_FILENAME, ClipTokenizer, clean_lower

    if export.clip_bpe is not None:
        path = staging / VOCAB_FILENAME
        write_clip_vocab(path, export.clip_bpe.merges)
        ours = ClipTokenizer.from_spec(path, export.clip_bpe.settings).encode(SAMPLE_TEXTS)
        if np.array_equal(ours, reference_token_ids(export, [clean_lower(t) for t in SAMPLE_TEXTS])[0]):
            return {**export.clip_bpe.settings, "file": VOCAB_FILENAME}
        path.unlink()
    shutil.copyfile(export.tokenizer_path, staging / TOKENIZER_FILE)
    return {**export.tokenizer, "file": TOKENIZER_FILE}


def write_clip_vocab(path: Path, merges: list[str]) -> None:
    """The merges as open_clip's vocabulary file (a header line, one merge per line), gzip without a
    timestamp so that the same export always gives the same bytes (and bundle id)."""
    import gzip

    text = "#version: 0.2\n" + "\n".join(merges) + "\n"
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
        f.write(text.encode("utf-8"))


def source_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file of the export that the bundle was made from (relative path -> hash)."""
    files = [root / "config.json"] + [p for d in ("visual", "textual") for p in sorted((root / d).iterdir())
                                      if p.is_file()]
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in files if p.is_file()}


# A graph is rewritten in memory, and protobuf cannot serialise a message of 2 GiB or more.
_REWRITE_MAX_BYTES = 1_800_000_000


def batched_image_tower(export: PublishedExport, staging: Path) -> tuple[TowerGraph, str]:
    """The export's batch-1 image graph with a dynamic batch axis (clipgrep.imports.batching), written
    to ``staging``, and what was done; or the graph as it is, and why."""
    from dataclasses import replace

    from ..convert.dynamic_int8 import external_tensors, load_external_weights, read_model
    from .batching import BATCH_DIM, make_batch_dynamic

    graph = export.image
    size = sum(p.stat().st_size for p in graph.path.parent.iterdir() if p.is_file())
    if size > _REWRITE_MAX_BYTES:
        return graph, f"batch {graph.batch}: the graph is too large to rewrite ({size / 1e9:.1f} GB)"
    model = read_model(graph.path, with_weights=False)
    external = external_tensors(model)  # the rewrite keeps them in a file beside it
    load_external_weights(model, graph.path.parent)
    result = make_batch_dynamic(model, _timing_feeds(graph, export))
    if result.model is None:
        return graph, f"batch {graph.batch}: {result.reason}"
    path = staging / "image-batched.onnx"
    _save_fp32(result.model, path, external)
    return replace(graph, path=path, batch=None, shape=(BATCH_DIM, *graph.shape[1:])), \
        f"dynamic (rewritten from batch {graph.batch}, checked against it)"


def _copy_fp32(src: Path, dst: Path) -> None:
    """Copy an fp32 graph; one with external weights is re-saved with them beside its new name."""
    from ..convert.dynamic_int8 import external_tensors, load_external_weights, read_model

    model = read_model(src, with_weights=False)
    external = external_tensors(model)
    if not external:
        shutil.copyfile(src, dst)
        return
    load_external_weights(model, src.parent)
    _save_fp32(model, dst, external)


def _weights_file(model_file: Path) -> Path:
    return model_file.with_name(model_file.name + ".data")


def _save_fp32(model: Any, dst: Path, external: set[str]) -> None:
    """Write ``model`` (weights loaded) to ``dst``, the ``external`` tensors in ``_weights_file(dst)``."""
    from ..onnx_proto import StringStringEntryProto, TensorProto

    if not external:
        dst.write_bytes(model.SerializeToString())
        return
    location, offset = _weights_file(dst).name, 0
    with open(dst.parent / location, "wb") as data:
        for tensor in (t for t in model.graph.initializer if t.name in external):
            data.write(tensor.raw_data)
            tensor.external_data.extend([StringStringEntryProto(key="location", value=location),
                                         StringStringEntryProto(key="offset", value=str(offset)),
                                         StringStringEntryProto(key="length", value=str(len(tensor.raw_data)))])
            offset += len(tensor.raw_data)
            tensor.ClearField("raw_data")
            tensor.data_location = TensorProto.EXTERNAL
    dst.write_bytes(model.SerializeToString())


def _timing_feeds(graph: TowerGraph, export: PublishedExport) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    batch = graph.batch or 4
    if graph.input_dtype.startswith("float"):  # the image tower
        return {graph.input: rng.standard_normal((batch, 3, *export.preprocess.size), dtype=np.float32)}
    length = export.tokenizer["context_length"]
    ids = np.ones((batch, length), np.dtype(graph.input_dtype))
    ids[:, :12] = rng.integers(5, 1000, (batch, 12))
    feeds = {graph.input: ids}
    if graph.mask_input:
        mask = np.zeros_like(ids)
        mask[:, :12] = 1
        feeds[graph.mask_input] = mask
    return feeds


def shared_image_tower(export: PublishedExport, fields: dict[str, Any]) -> Any:
    """An installed int8 bundle quantised from the very same published image graph, or None.

    Its image.onnx is reused as is: quantising again would give the same bytes
    (the rule is deterministic) but take the time. The two bundles then share an
    ``image_id`` (and an index: a text-only swap, e.g. M-CLIP's text towers for
    OpenAI's ViT-B/32, needs no re-indexing).
    """
    from ..models import list_models

    source = fields["provenance"]["source_files"].get("visual/model.onnx")
    for entry in list_models():
        bundle = entry.bundle
        if bundle is not None and bundle.precision == "int8" and \
                bundle.manifest.get("provenance", {}).get("source_files", {}).get("visual/model.onnx") == source and \
                bundle.manifest["encoders"]["image"] == fields["encoders"]["image"] and \
                (bundle.preprocess_config, bundle.embed_dim) == (fields["preprocess"], fields["embed_dim"]):
            return bundle
    return None


def _quantize(export: PublishedExport, image_graph: TowerGraph, staging: Path, shared: Any) -> dict[str, Any]:
    from ..convert.quantize import quantize_tower

    if shared is not None:
        shutil.copyfile(shared.file(shared.image.file), staging / "image.onnx")
        image = {**shared.manifest["quantization"]["image"], "reused_from": shared.name}
    else:
        image = quantize_tower(image_graph.path, staging / "image.onnx", _timing_feeds(image_graph, export))
    return {"image": image,
            "text": quantize_tower(export.text.path, staging / "text.onnx", _timing_feeds(export.text, export))}


# --- the gate -----------------------------------------------------------------------------------


def measure_parity(export: PublishedExport, staging: Path) -> dict[str, Any]:
    """Compare the bundle in ``staging`` with the fp32 export on the parity samples."""
    from ..convert.parity_samples import SAMPLE_TEXTS, sample_images
    from ..embed.onnx import _LazySession
    from ..embed.preprocess import load_image
    from ..embed.tokenizer import clean_lower

    bundle = load_bundle(staging, verify="full")
    text_encoder = bundle.text_encoder()
    ours, mask = text_encoder._tokenize(SAMPLE_TEXTS)
    clip_bpe = bundle.tokenizer.kind == "clip-bpe"
    # clipgrep's CLIP tokenizer cleans text as open_clip does (ftfy, HTML unescaping), which is what
    # the model was trained with; its BPE must then give exactly the ids of the export's tokenizer.json.
    texts = [clean_lower(t) for t in SAMPLE_TEXTS] if clip_bpe else SAMPLE_TEXTS
    reference_ids, reference_mask = reference_token_ids(export, texts)
    text_ref = _LazySession(export.text.path, EncoderSpec(**export.text.encoder_spec("")), None)
    image_ref = _LazySession(export.image.path, EncoderSpec(**export.image.encoder_spec("")), None)

    samples = sample_images()
    pixels = np.stack([load_image(io.BytesIO(d), export.preprocess, draft=False) for d in samples.values()])
    image_ours = bundle.image_encoder(draft=False).encode_files(io.BytesIO(d) for d in samples.values())
    return {
        "reference": "fp32 export",
        "threshold_min_cos": THRESHOLDS[bundle.precision],
        "token_ids_identical": bool(np.array_equal(ours, reference_ids)
                                    and (mask is None or np.array_equal(mask, reference_mask))),
        "token_strings": len(SAMPLE_TEXTS),
        "token_reference": "tokenizer.json" + (" on open_clip-cleaned text" if clip_bpe else ""),
        "text": _summary(text_encoder.encode(SAMPLE_TEXTS), text_ref.run(reference_ids, reference_mask)),
        "image": _summary(image_ours, image_ref.run(pixels)),
    }


def reference_token_ids(export: PublishedExport, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Ids straight from the export's tokenizer.json, set up as Immich's runtime sets it up."""
    from tokenizers import Tokenizer

    from ..embed.hf_tokenizer import clean_text

    settings = export.tokenizer
    tokenizer = Tokenizer.from_file(str(export.tokenizer_path))
    length = settings["context_length"]
    tokenizer.enable_padding(length=length, pad_token=settings["pad_token"],
                             pad_id=tokenizer.token_to_id(settings["pad_token"]))
    tokenizer.enable_truncation(max_length=length)
    encodings = [tokenizer.encode(clean_text(t, canonicalize=settings["clean"] == "canonicalize")) for t in texts]
    return (np.array([e.ids for e in encodings], np.int64).reshape(len(texts), length),
            np.array([e.attention_mask for e in encodings], np.int64).reshape(len(texts), length))
