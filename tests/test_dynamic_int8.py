"""clipgrep's own int8 quantiser (no onnx package at run time) against onnxruntime.quantization's.

The graphs here hold every pattern it handles: MatMul on activations, a weight shared by
two MatMuls, Gemm (transB, bias), a Gather from a float table read by float ops and by a
MatMul, and a Conv that must stay fp32. onnxruntime's quantize_dynamic with clipgrep's
settings is the reference: same nodes, same tensor names, same quantised numbers, same outputs.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")  # the reference side only (the test extra has it)
from onnx import TensorProto, helper, numpy_helper

from clipgrep.convert.dynamic_int8 import quantize_model, quantize_table, quantize_weight_per_column

from .factories import write_image_onnx

RNG = np.random.default_rng(0)


def _init(name: str, *shape: int, scale: float = 1.0) -> TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def write_mixed_model(path: Path) -> Path:
    nodes = [
        helper.make_node("Conv", ["image", "K"], ["conv"], name="patch_embed", strides=[4, 4]),
        helper.make_node("Flatten", ["conv"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "G", "Gb"], ["gemm"], name="fc", transB=1),
        helper.make_node("Relu", ["gemm"], ["h"]),
        helper.make_node("MatMul", ["h", "W"], ["m1"], name="proj1"),
        helper.make_node("Tanh", ["h"], ["h2"]),
        helper.make_node("MatMul", ["h2", "W"], ["m2"], name="proj2"),   # the same weight again
        helper.make_node("MatMul", ["h", "V"], ["m3"]),                 # an unnamed node
        helper.make_node("Gather", ["E", "ids"], ["tokens"], name="embed", axis=0),
        helper.make_node("ReduceMean", ["tokens"], ["pooled"], keepdims=0, axes=[1]),
        helper.make_node("MatMul", ["tokens", "T"], ["t_proj"], name="tok_proj"),  # reads the uint8 gather
        helper.make_node("ReduceMean", ["t_proj"], ["t_pooled"], keepdims=0, axes=[1]),
        helper.make_node("Add", ["m1", "m2"], ["s"]),
        helper.make_node("Add", ["s", "m3"], ["image_out"]),
        helper.make_node("Add", ["pooled", "t_pooled"], ["text_out"]),
    ]
    graph = helper.make_graph(
        nodes, "mixed",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 5])],
        [helper.make_tensor_value_info("image_out", TensorProto.FLOAT, ["batch", 6]),
         helper.make_tensor_value_info("text_out", TensorProto.FLOAT, ["batch", 7])],
        [_init("K", 4, 3, 4, 4), _init("G", 16, 16), _init("Gb", 16), _init("W", 16, 6, scale=0.3),
         _init("V", 16, 6), _init("E", 30, 7, scale=2.0), _init("T", 7, 7),
         numpy_helper.from_array(np.zeros((16, 6), np.float32), "unused")],
    )
    graph.initializer[3].CopyFrom(numpy_helper.from_array(  # one all-zero column: scale 1.0
        np.concatenate([numpy_helper.to_array(graph.initializer[3])[:, :5], np.zeros((16, 1), np.float32)], 1), "W"))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def reference(src: Path, dst: Path) -> Path:
    """onnxruntime's quantize_dynamic with the settings clipgrep used before it had its own."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, reduce_range=True, per_channel=True,
                     op_types_to_quantize=["MatMul", "Gemm", "Attention", "Gather", "EmbedLayerNormalization",
                                           "LSTM"])
    return dst


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_same_graph_and_numbers_as_onnxruntime_quantize_dynamic(tmp_path: Path) -> None:
    src = write_mixed_model(tmp_path / "fp32.onnx")
    ours, theirs = tmp_path / "ours.onnx", reference(src, tmp_path / "ort.onnx")
    quantize_model(src, ours)
    a, b = onnx.load(str(ours)), onnx.load(str(theirs))
    onnx.checker.check_model(a)

    def nodes(model) -> list[tuple]:
        return sorted((n.op_type, n.name, tuple(n.input), tuple(n.output)) for n in model.graph.node)

    assert nodes(a) == nodes(b)
    assert {n.op_type for n in a.graph.node} >= {"DynamicQuantizeLinear", "MatMulInteger", "DequantizeLinear", "Conv"}
    assert "ConvInteger" not in {n.op_type for n in a.graph.node}
    mine = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    ref = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    assert sorted(mine) == sorted(ref)
    for name, value in ref.items():
        assert mine[name].dtype == value.dtype and np.array_equal(mine[name].reshape(value.shape), value), name

    feeds = {"image": RNG.standard_normal((3, 3, 8, 8)).astype(np.float32),
             "ids": RNG.integers(0, 30, (3, 5)).astype(np.int64)}
    for x, y in zip(_run(ours, feeds), _run(theirs, feeds)):
        assert np.array_equal(x, y)


def test_weight_and_table_arithmetic_matches_onnxruntime() -> None:
    from onnxruntime.quantization.quant_utils import quantize_data

    w = (RNG.standard_normal((40, 9)) * np.array([1e-3, 1, 5, 0, 1e-30, 2, 3, 0.1, 7])).astype(np.float32)
    q, scale, zero_point = quantize_weight_per_column(w)
    for column in range(w.shape[1]):
        zp, s, qc = quantize_data(w[:, column], TensorProto.INT8, True, reduce_range=True)
        assert (zero_point[column], scale[column]) == (zp, s) and np.array_equal(q[:, column], qc), column
    table = (RNG.standard_normal((50, 4)) + 0.7).astype(np.float32)
    zp, s, qt = quantize_data(table.flatten(), TensorProto.UINT8, False)
    assert quantize_table(table)[1:] == (s, zp) and np.array_equal(quantize_table(table)[0].flatten(), qt)


def test_external_weights_are_read(tmp_path: Path) -> None:
    src = write_mixed_model(tmp_path / "inline.onnx")
    model = onnx.load(str(src))
    onnx.save_model(model, str(tmp_path / "external.onnx"), save_as_external_data=True, location="weights.bin",
                    size_threshold=0)
    quantize_model(tmp_path / "external.onnx", tmp_path / "a.onnx")
    quantize_model(src, tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_quantising_and_reading_exports_never_import_onnx(tmp_path: Path) -> None:
    """The base install has no onnx package: quantisation, graph inspection and fp32 copies do without it."""
    import subprocess
    import sys

    src = write_mixed_model(tmp_path / "fp32.onnx")
    onnx.save_model(onnx.load(str(src)), str(tmp_path / "external.onnx"), save_as_external_data=True,
                    location="external.onnx.data", size_threshold=0)
    write_image_onnx(tmp_path / "image.onnx", RNG.standard_normal((3, 8)))
    (tmp_path / "copy").mkdir()
    script = f"""
import sys
sys.modules["onnx"] = None  # any import of onnx now fails
from pathlib import Path
from clipgrep.convert.dynamic_int8 import quantize_model
from clipgrep.imports.build import _copy_fp32
from clipgrep.imports.layout import inspect_graph
tmp = Path({str(tmp_path)!r})
quantize_model(tmp / "fp32.onnx", tmp / "int8.onnx")
_copy_fp32(tmp / "external.onnx", tmp / "copy" / "text.onnx")
print(inspect_graph(tmp / "image.onnx").input)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "pixel_values"
    feeds = {"image": RNG.standard_normal((2, 3, 8, 8)).astype(np.float32),
             "ids": RNG.integers(0, 30, (2, 5)).astype(np.int64)}
    assert (tmp_path / "copy" / "text.onnx.data").is_file()
    for x, y in zip(_run(tmp_path / "copy" / "text.onnx", feeds), _run(src, feeds)):
        assert np.array_equal(x, y)
    assert "MatMulInteger" in {n.op_type for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node}
