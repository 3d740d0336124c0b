"""Giving batch-1 traced graphs a batch axis (clipgrep.imports.batching), on small graphs built here.

The attention graph has the shapes torch's tracer writes for nn.MultiheadAttention at batch 1:
[L, 1*H, hd] heads, [1, H, L, hd], [L*1, E]: at batch 1 each Reshape could put the batch on
either side of an axis boundary, and only the right choices give the batch-1 graph's results.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from clipgrep.convert.dynamic_int8 import read_model
from clipgrep.imports import batching
from clipgrep.imports.batching import make_batch_dynamic

onnx = pytest.importorskip("onnx")  # builds the graphs (the test extra has it)
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper

L, H, HD = 4, 2, 3
E = H * HD


def _const(name: str, values: list[int]) -> Any:
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name + "_v", TensorProto.INT64,
                                                                              [len(values)], values))


def _attention_graph(path) -> None:
    """x [1, L, E] -> self-attention over L with H heads, output projection -> mean over L -> [1, E].

    The first Reshape's preferred reading of [L, 1*H, hd] (batch with the heads) is right; that
    of [L*1, E] (batch at the start of E) is not, and the Gemm after it refuses it.
    """
    rng = np.random.default_rng(0)
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [E], rng.uniform(0.5, 1.5, E).astype(np.float32))
    proj = helper.make_tensor("proj", TensorProto.FLOAT, [E, E], rng.standard_normal((E, E)).astype(np.float32))
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["xs"]),
        helper.make_node("Transpose", ["xs"], ["lbe"], perm=[1, 0, 2]),  # [L, B, E]
        _const("s_heads", [L, 1 * H, HD]), helper.make_node("Reshape", ["lbe", "s_heads"], ["heads"]),
        helper.make_node("Transpose", ["heads"], ["q"], perm=[1, 0, 2]),  # [B*H, L, hd]
        helper.make_node("Transpose", ["q"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["weights"], axis=-1),
        helper.make_node("MatMul", ["weights", "q"], ["attended"]),  # [B*H, L, hd]
        _const("s_bhld", [1, H, L, HD]), helper.make_node("Reshape", ["attended", "s_bhld"], ["bhld"]),
        helper.make_node("Transpose", ["bhld"], ["lbhd"], perm=[2, 0, 1, 3]),  # [L, B, H, hd]
        _const("s_rows", [L * 1, E]), helper.make_node("Reshape", ["lbhd", "s_rows"], ["rows"]),  # [L*B, E]
        helper.make_node("Gemm", ["rows", "proj"], ["projected"]),  # the output projection: rows must be L*B
        _const("s_lbe", [L, 1, E]), helper.make_node("Reshape", ["projected", "s_lbe"], ["back"]),
        helper.make_node("Transpose", ["back"], ["ble"], perm=[1, 0, 2]),
        helper.make_node("ReduceMean", ["ble"], ["y"], axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, L, E])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, E])], [scale, proj])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _rows(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])


def test_a_traced_attention_graph_gets_a_batch_axis_that_gives_the_same_rows(tmp_path) -> None:
    path = tmp_path / "attention.onnx"
    _attention_graph(path)
    x = np.random.default_rng(1).standard_normal((5, L, E)).astype(np.float32)
    with pytest.raises(Exception, match="(?i)dimension"):  # the traced graph takes one row
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})

    result = make_batch_dynamic(read_model(path), {"x": x[:1]})

    assert result.reason == "dynamic" and result.model is not None
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], _rows(path, x), rtol=1e-5, atol=1e-6)
    assert session.get_inputs()[0].shape[0] == "batch" and session.get_outputs()[0].shape[0] == "batch"


def test_a_graph_that_mixes_rows_keeps_batch_1_and_says_why(tmp_path) -> None:
    # [1, 4] -> [2, 2] -> sum over the first axis: at batch B the rows would be summed together.
    nodes = [_const("s", [2, 2]), helper.make_node("Reshape", ["x", "s"], ["m"]),
             helper.make_node("ReduceSum", ["m", "axes"], ["r"], keepdims=1),
             _const("s2", [1, 2]), helper.make_node("Reshape", ["r", "s2"], ["y"])]
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [0])
    graph = helper.make_graph(nodes, "mix", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [axes])
    path = tmp_path / "mix.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))

    result = make_batch_dynamic(read_model(path), {"x": np.ones((1, 4), np.float32)})

    assert result.model is None and "ReduceSum" in result.reason


def test_a_rewrite_that_does_not_give_the_same_rows_is_not_kept(tmp_path, monkeypatch) -> None:
    path = tmp_path / "attention.onnx"
    _attention_graph(path)
    monkeypatch.setattr(batching, "TOLERANCE", -1.0)  # no rewrite can pass the check

    result = make_batch_dynamic(read_model(path), {"x": np.ones((1, L, E), np.float32)})

    assert result.model is None and "outputs" in result.reason


def test_a_graph_of_token_ids_is_not_rewritten(tmp_path) -> None:
    # Random rows of token ids are no text the graph expects, so the check could prove nothing.
    nodes = [helper.make_node("Cast", ["ids"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "ids", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "ids.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))

    result = make_batch_dynamic(read_model(path), {"ids": np.ones((1, 4), np.int64)})

    assert result.model is None and "float" in result.reason


def test_an_old_opset_softmax_that_spans_the_batch_is_seen(tmp_path) -> None:
    # Before opset 13 Softmax normalises over every axis from `axis` (default 1) on: here [L, B, C].
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]), helper.make_node("Softmax", ["t"], ["s"]),
             helper.make_node("Transpose", ["s"], ["y"], perm=[1, 0, 2])]
    graph = helper.make_graph(nodes, "softmax", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 3])])
    path = tmp_path / "softmax.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]), str(path))

    result = make_batch_dynamic(read_model(path), {"x": np.ones((1, 4, 3), np.float32)})

    assert result.model is None and "Softmax" in result.reason
