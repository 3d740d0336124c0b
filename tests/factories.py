"""Tiny artefacts built in-process for tests: a contract bundle without torch."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from clipgrep.bundle import write_manifest
from clipgrep.convert.tokenizer_export import write_clip_tokenizer
from clipgrep.embed.tokenizer import VOCAB_FILENAME

VOCAB = 49408
PREPROCESS = {"size": [32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
              "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}


def _save(graph, path: Path) -> None:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def write_image_onnx(path: Path, weight: np.ndarray) -> None:
    """pixel_values [N,3,H,W] -> mean colour per channel -> x @ weight [3,D] -> embeds."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["pixel_values"], ["colour"], axes=[2, 3], keepdims=0),
         helper.make_node("MatMul", ["colour", "W"], ["embeds"])],
        "tiny_image",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, None, None])],
        [helper.make_tensor_value_info("embeds", TensorProto.FLOAT, ["batch", weight.shape[1]])],
        [numpy_helper.from_array(weight.astype(np.float32), "W")],
    )
    _save(graph, path)


def write_text_onnx(path: Path, table: np.ndarray) -> None:
    """input_ids [N,L] -> embedding lookup -> mean over tokens -> embeds."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Gather", ["E", "input_ids"], ["tokens"], axis=0),
         helper.make_node("ReduceMean", ["tokens"], ["embeds"], axes=[1], keepdims=0)],
        "tiny_text",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", None])],
        [helper.make_tensor_value_info("embeds", TensorProto.FLOAT, ["batch", table.shape[1]])],
        [numpy_helper.from_array(table.astype(np.float32), "E")],
    )
    _save(graph, path)


def make_contract_bundle(directory: Path, *, name: str = "tiny", dim: int = 8, seed: int = 0) -> Path:
    """A valid bundle whose encoders are a few numpy weights: fast, torch-free, deterministic."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    write_image_onnx(directory / "image.onnx", rng.standard_normal((3, dim)))
    write_text_onnx(directory / "text.onnx", rng.standard_normal((VOCAB, dim)))
    write_clip_tokenizer(directory / VOCAB_FILENAME)
    write_manifest(directory, {
        "name": name,
        "embed_dim": dim,
        "precision": "fp32",
        "preprocess": PREPROCESS,
        "tokenizer": {"kind": "clip-bpe", "file": VOCAB_FILENAME, "context_length": 77,
                      "sot_id": 49406, "eot_id": 49407, "clean": "lower"},
        "encoders": {"image": {"file": "image.onnx", "input": "pixel_values", "output": "embeds"},
                     "text": {"file": "text.onnx", "input": "input_ids", "output": "embeds"}},
        "provenance": {"arch": "contract-test", "weights": "random numpy"},
    })
    return directory
