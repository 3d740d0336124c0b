"""int8 dynamic quantisation of an ONNX graph, written on the protobuf itself (no onnx package).

It produces the graph that onnxruntime's ``quantize_dynamic(weight_type=QInt8,
per_channel=True, reduce_range=True, op_types_to_quantize=["MatMul", "Gather"])``
produces (its IntegerOps mode, onnxruntime 1.32), with the same tensor names and
the same numbers (tests/test_dynamic_int8.py checks that against
onnxruntime.quantization):

- ``MatMul`` with a constant float B (a ``Gemm`` with one, alpha = beta = 1 and
  no transA, first becomes MatMul + Add, B transposed for transB, as onnxruntime
  does): ``DynamicQuantizeLinear(A)`` -> ``MatMulInteger(A_q, B_q, A_zp, B_zp)``
  -> ``Cast`` to float -> ``Mul`` by ``A_scale * B_scale``. B is int8 per output
  column, symmetric, 7-bit (reduce_range: the u8*s8 multiply-add of x86 cannot
  saturate). onnxruntime fuses the chain into DynamicQuantizeMatMul when it loads it.
- ``Gather`` from a constant float table (token embeddings): the table as uint8
  (one scale and zero point), the Gather on it, then ``DequantizeLinear``.

Convolutions are never quantised (clipgrep.convert.quantize says why), so there
is no ConvInteger here. Subgraphs (If/Loop bodies) are left as they are.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .. import onnx_proto as pb
from ..errors import ClipgrepError

FLOAT, UINT8, INT8 = 1, 2, 3  # TensorProto.DataType
_QUANT = "_quantized"


def read_model(path: Path, *, with_weights: bool = True) -> Any:
    """The ModelProto at ``path``; with ``with_weights``, external weights are read into it."""
    model = pb.ModelProto.FromString(Path(path).read_bytes())
    if with_weights:
        load_external_weights(model, Path(path).parent)
    return model


def external_tensors(model: Any) -> set[str]:
    """The names of the initializers whose data lies in a file beside the model (not yet loaded)."""
    return {t.name for t in model.graph.initializer if t.data_location == pb.TensorProto.EXTERNAL}


def load_external_weights(model: Any, base: Path) -> None:
    """Read the external initializers of ``model`` (read without weights) from ``base`` into it."""
    for tensor in model.graph.initializer:
        if tensor.data_location == pb.TensorProto.EXTERNAL:
            _load_external(tensor, base)


def _load_external(tensor: Any, base: Path) -> None:
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = Path(info["location"])
    if location.is_absolute() or ".." in location.parts:
        raise ClipgrepError(f"{base}: the weights of {tensor.name} point outside the model's folder ({location})",
                            "use a model whose external data files lie beside it")
    with open(base / location, "rb") as f:
        f.seek(int(info.get("offset", 0)))
        tensor.raw_data = f.read(int(info["length"])) if "length" in info else f.read()
    del tensor.external_data[:]
    tensor.ClearField("data_location")


def tensor_array(tensor: Any) -> np.ndarray:
    """A float tensor's values (raw_data or float_data)."""
    if tensor.data_type != FLOAT:
        raise ValueError(f"{tensor.name}: expected a float tensor, found data type {tensor.data_type}")
    data = np.frombuffer(tensor.raw_data, "<f4") if tensor.raw_data else np.array(tensor.float_data, np.float32)
    return data.astype(np.float32).reshape(tuple(tensor.dims))


def _tensor(name: str, array: np.ndarray, data_type: int) -> Any:
    t = pb.TensorProto(name=name, data_type=data_type, dims=array.shape)
    t.raw_data = np.ascontiguousarray(array).tobytes()
    return t


def _node(op: str, inputs: list[str], outputs: list[str], name: str, **attributes: int) -> Any:
    node = pb.NodeProto(op_type=op, input=inputs, output=outputs, name=name)
    for key, value in attributes.items():
        node.attribute.append(pb.AttributeProto(name=key, type=pb.AttributeProto.INT, i=value))
    return node


def quantize_weight_per_column(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int8 weights, float32 scales and int8 zero points (all 0) per column of ``w`` (last axis), 7-bit range.

    onnxruntime's arithmetic exactly: scale = 2 * max|w| / 128 computed in float64 and stored
    as float32 (1.0 for an all-zero column), q = clip(round(w / scale), -128, 127).
    """
    w = w.astype(np.float32)
    columns = np.moveaxis(w, -1, 0).reshape(w.shape[-1], -1)
    absmax = np.maximum(np.abs(np.minimum(columns.min(axis=1), 0)), np.maximum(columns.max(axis=1), 0))
    scale64 = (absmax.astype(np.float64) * 2) / 128.0
    scale = scale64.astype(np.float32)
    scale[scale64 < np.finfo(np.float32).tiny] = 1.0
    q = np.clip(np.round(w / scale), -128, 127).astype(np.int8)
    return q, scale, np.zeros(len(scale), np.int8)


def quantize_table(table: np.ndarray) -> tuple[np.ndarray, np.float32, np.uint8]:
    """uint8 values, scale and zero point of a whole tensor (asymmetric, full 0..255 range), as onnxruntime."""
    table = table.astype(np.float32)
    rmin, rmax = min(table.min(), np.float32(0)), max(table.max(), np.float32(0))
    scale64 = (np.float64(rmax) - np.float64(rmin)) / 255.0
    if scale64 < np.finfo(np.float32).tiny:
        scale, zero_point = np.float32(1.0), np.uint8(0)
    else:
        zero_point = np.uint8(np.round(0 - rmin / scale64))
        scale = np.float32(scale64)
    q = np.clip(np.round(table / scale) + zero_point, 0, 255).astype(np.uint8)
    return q, scale, zero_point


class _Quantizer:
    def __init__(self, graph: Any) -> None:
        self.graph = graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.activations: dict[str, tuple[str, str, str]] = {}  # float name -> (quantized, scale, zero point)
        self.weights: dict[str, tuple[str, str, str]] = {}
        self.tables: dict[str, tuple[str, str, str]] = {}
        self.gathered: dict[str, tuple[str, str, str]] = {}  # Gather outputs still in uint8
        self.produced: set[str] = set()
        self.nodes: list[Any] = []
        self.new_initializers: list[Any] = []

    def _float_constant(self, name: str) -> bool:
        tensor = self.initializers.get(name)
        return tensor is not None and tensor.data_type == FLOAT

    def run(self) -> None:
        for node in list(self.graph.node):
            if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and self._float_constant(node.input[1]):
                self._matmul(node)
            elif node.op_type == "Gather" and node.domain in ("", "ai.onnx") and self._float_constant(node.input[0]):
                self._gather(node)
            else:
                for name in node.input:
                    self._dequantize(name)
                self._emit(node)
        for output in self.graph.output:
            self._dequantize(output.name)
        del self.graph.node[:]
        self.graph.node.extend(self.nodes)
        self.graph.initializer.extend(self.new_initializers)
        # The float weights that were quantised are dropped (unless something else still reads them).
        used = _referenced_names(self.graph)
        for i in reversed(range(len(self.graph.initializer))):
            if self.graph.initializer[i].name not in used:
                del self.graph.initializer[i]

    def _emit(self, node: Any) -> None:
        self.nodes.append(node)
        self.produced.update(node.output)

    def _activation(self, name: str) -> tuple[str, str, str]:
        if name in self.gathered:
            return self.gathered[name]
        if name not in self.activations:
            names = (name + _QUANT, name + "_scale", name + "_zero_point")
            self._emit(_node("DynamicQuantizeLinear", [name], list(names), name + "_QuantizeLinear"))
            self.activations[name] = names
        return self.activations[name]

    def _weight(self, name: str) -> tuple[str, str, str]:
        if name not in self.weights:
            q, scale, zero_point = quantize_weight_per_column(tensor_array(self.initializers[name]))
            names = (name + _QUANT, name + "_scale", name + "_zero_point")
            self.new_initializers += [_tensor(names[0], q, INT8), _tensor(names[1], scale, FLOAT),
                                      _tensor(names[2], zero_point, INT8)]
            self.weights[name] = names
        return self.weights[name]

    def _matmul(self, node: Any) -> None:
        a_q, a_scale, a_zp = self._activation(node.input[0])
        w_q, w_scale, w_zp = self._weight(node.input[1])
        out = node.output[0]
        base = node.name + "_quant" if node.name else ""
        integer = out + "_output_quantized"
        self._emit(_node("MatMulInteger", [a_q, w_q, a_zp, w_zp], [integer], base))
        self._emit(_node("Cast", [integer], [integer + "_cast_output"], integer + "_cast", to=FLOAT))
        scales = base + "_scales_mul" if base else f"{a_scale}_{w_scale}_mul"
        self._emit(_node("Mul", [a_scale, w_scale], [scales + ":0"], scales))
        self._emit(_node("Mul", [integer + "_cast_output", scales + ":0"], [out],
                         base + "_output_scale_mul" if base else ""))

    def _gather(self, node: Any) -> None:
        table = node.input[0]
        if table not in self.tables:
            q, scale, zero_point = quantize_table(tensor_array(self.initializers[table]))
            names = (table + _QUANT, table + "_scale", table + "_zero_point")
            self.new_initializers += [_tensor(names[0], q, UINT8), _tensor(names[1], np.array(scale), FLOAT),
                                      _tensor(names[2], np.array(zero_point), UINT8)]
            self.tables[table] = names
        q_name, scale_name, zp_name = self.tables[table]
        out = node.output[0]
        gathered = pb.NodeProto()
        gathered.CopyFrom(node)
        gathered.input[0] = q_name
        gathered.output[0] = out + _QUANT
        self._emit(gathered)
        self.gathered[out] = (out + _QUANT, scale_name, zp_name)

    def _dequantize(self, name: str) -> None:
        """A float consumer of a uint8 Gather output gets it dequantized, once, just before it."""
        if name in self.gathered and name not in self.produced:
            q_name, scale_name, zp_name = self.gathered[name]
            self._emit(_node("DequantizeLinear", [q_name, scale_name, zp_name], [name], name + "_DequantizeLinear"))


def _referenced_names(graph: Any) -> set[str]:
    """Every tensor name the nodes of ``graph`` and of its subgraphs read, and its outputs."""
    names = {o.name for o in graph.output}
    stack = [graph]
    while stack:
        g = stack.pop()
        for node in g.node:
            names.update(node.input)
            for a in node.attribute:
                stack.extend([a.g] if a.type == pb.AttributeProto.GRAPH else a.graphs)
    return names


def _replace_gemm_with_matmul(graph: Any) -> None:
    """Gemm(A, constant B, C) with alpha = beta = 1, transA = 0 -> MatMul(A, B or B^T) [+ Add C]."""
    initializers = {t.name: t for t in graph.initializer}
    nodes: list[Any] = []
    transposed: dict[str, str] = {}
    for node in graph.node:
        attrs = {a.name: (a.f if a.type == pb.AttributeProto.FLOAT else a.i) for a in node.attribute}
        b = node.input[1] if node.op_type == "Gemm" and len(node.input) > 1 else ""
        if not (node.op_type == "Gemm" and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
                and attrs.get("transA", 0) == 0 and b in initializers and initializers[b].data_type == FLOAT):
            nodes.append(node)
            continue
        if attrs.get("transB", 0) == 1:
            if b not in transposed:
                transposed[b] = _free_name(b + "_Transposed", initializers)
                weights = _tensor(transposed[b], tensor_array(initializers[b]).T, FLOAT)
                graph.initializer.append(weights)
                initializers[transposed[b]] = weights
            b = transposed[b]
        has_bias = len(node.input) > 2 and node.input[2]
        out = node.output[0]
        nodes.append(_node("MatMul", [node.input[0], b], [out + "_MatMul" if has_bias else out],
                           node.name + "_MatMul" if node.name else ""))
        if has_bias:
            nodes.append(_node("Add", [out + "_MatMul", node.input[2]], [out], node.name + "_Add" if node.name else ""))
    del graph.node[:]
    graph.node.extend(nodes)


def _free_name(name: str, taken: dict[str, Any]) -> str:
    suffixes = ("", _QUANT, "_scale", "_zero_point")
    candidate, n = name, 0
    while any(candidate + s in taken for s in suffixes):
        n += 1
        candidate = f"{name}_{n}"
    return candidate


def quantize_model(src: Path, dst: Path) -> None:
    """Write the int8 version of the fp32 model ``src`` to ``dst`` (weights inline: int8 graphs stay under 2 GB)."""
    model = read_model(src)
    if not any(op.domain in ("", "ai.onnx") and op.version >= 11 for op in model.opset_import):
        raise ClipgrepError(f"{src}: int8 quantisation needs ONNX opset 11 or newer (DynamicQuantizeLinear)",
                            "install it with --precision fp32, or re-export it with a newer opset")
    _replace_gemm_with_matmul(model.graph)
    _Quantizer(model.graph).run()
    model.producer_name, model.producer_version = "clipgrep", ""
    Path(dst).write_bytes(model.SerializeToString())


def op_types(path: Path) -> set[str]:
    """The operator types of a model's main graph (weights are not read)."""
    return {node.op_type for node in read_model(path, with_weights=False).graph.node}
