"""A dynamic batch axis for an encoder graph that was traced with batch 1 (Immich's exports).

torch.onnx's tracer writes the batch size it saw (1) into the graph's constants: Reshape
targets such as ``[L, 1*H, hd]`` and ``[L*1, E]`` (nn.MultiheadAttention's heads),
``[1, H, L, hd]``, ``[1, W, -1]`` (the patches), and the class token's ``Expand`` to
``[1, 1, W]``. Such a graph runs one image per call, and at batch 16 the same model in a
graph with a batch axis encodes ~1.5x faster here (benchmarks/bench_import.py).

This module follows where the batch lies in every tensor, from the input to the output,
with the shapes of one batch-1 run: which axis holds it, and how many elements of that
axis lie outside it when the tracer merged it with another dimension (``L*B`` or ``B*H``).

- A Reshape to a constant shape gets the batch-1 run's output shape with -1 on the
  batch's axis.
- A Concat of a batched tensor with a constant one (the class token) gets an Expand of
  the constant one to the batch.
- Every other op must keep the batch where the tracker can follow it (elementwise ops,
  MatMul, Transpose, Gather, Slice, normalisations...), or the graph is left as it is.

Where a Reshape may put the batch on either side of an axis boundary (``[L, 1, E]`` to
``[L, 1*H, hd]`` or to ``[L*1, H, hd]`` are the same tensor at batch 1), the choices are
tried in turn. A rewrite is kept only when it gives the original graph's outputs, row for
row, on a batch of 3; otherwise the batch-1 graph stays: slower, never wrong.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from math import prod
from typing import Any

import numpy as np

from .. import onnx_proto as pb

BATCH_DIM = "batch"
CHECK_BATCH = 3  # rows in the check against the batch-1 graph (odd: no accidental symmetry)
MAX_TRIES = 16  # rewrites checked against the batch-1 graph before giving up
MAX_PLANS = 256  # combinations of ambiguous Reshape choices followed through the graph
TOLERANCE = 1e-4  # max |difference| allowed, relative to the largest output value
_RECORD_CHUNK = 128  # intermediate tensors fetched per batch-1 run (all at once costs GBs for ViT-L)
_SMALL = 64  # integer tensors up to this size are kept by value (axes, shapes, indices)

# Ops that apply elementwise with numpy broadcasting, and ops of one input (others constant).
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Where", "Equal", "Less", "Greater", "LessOrEqual",
                "GreaterOrEqual", "And", "Or", "Xor", "Max", "Min", "Mod", "PRelu", "Sum", "Mean", "Clip", "BitShift"}
_UNARY = {"Cast", "Erf", "Sqrt", "Relu", "Sigmoid", "Tanh", "Gelu", "Neg", "Exp", "Log", "Abs", "Identity",
          "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Not", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu",
          "Selu", "Softplus", "Softsign", "Dropout", "Celu", "Mish", "Sin", "Cos", "IsNaN", "CastLike"}
# Ops whose axis 0 is the batch and stays so (image ops).
_BATCH_FIRST = {"Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool",
                "BatchNormalization", "InstanceNormalization", "GroupNormalization", "LRN"}
_REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceProd",
           "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp"}


class Unbatchable(Exception):
    """The graph has something the tracker cannot follow the batch through."""


@dataclass(frozen=True)
class BatchAt:
    """Where the batch lies in a tensor: its axis, and the elements of that axis outside it."""

    axis: int
    outer: int = 1


@dataclass
class Plan:
    """The edits of one rewrite, and the ambiguous Reshapes met (signature -> number of choices)."""

    reshapes: dict[int, list[int]] = field(default_factory=dict)  # node index -> new constant shape
    # node index, input slot, a batched input of that node, the batch axis, the input's rank
    expands: list[tuple[int, int, str, int, int]] = field(default_factory=list)
    choices: dict[tuple[Any, ...], int] = field(default_factory=dict)


@dataclass(frozen=True)
class Result:
    model: Any | None  # the rewritten ModelProto, or None
    reason: str  # "dynamic", or why the graph keeps batch 1


def make_batch_dynamic(model: Any, feeds: dict[str, np.ndarray]) -> Result:
    """``model`` (a batch-1 ModelProto, weights loaded) with a dynamic batch axis, checked; or why not.

    ``feeds`` is one batch-1 input of every graph input, for the recording run.
    """
    graph = model.graph
    if len(graph.output) != 1 or any(value.shape[0] != 1 for value in feeds.values()):
        return Result(None, "not a one-output graph fed with batch 1")
    if any(value.dtype.kind != "f" for value in feeds.values()):
        # The check needs rows that differ; random token ids would not be a text the graph expects.
        return Result(None, "only graphs of float inputs (images) are rewritten")
    rng = np.random.default_rng(0)
    rows = {name: rng.standard_normal((CHECK_BATCH, *value.shape[1:])).astype(value.dtype)
            for name, value in feeds.items()}
    try:
        shapes, values, reference = _run_batch_1(model, feeds, rows)
    except Exception as e:  # noqa: BLE001 - any onnxruntime failure means: keep the graph as it is
        return Result(None, f"the batch-1 run failed: {e}")

    # Breadth first from the preferred choices: each plan (or its failure) names the ambiguous
    # Reshapes it met, and every single change of one of them is queued.
    queue: deque[dict[tuple[Any, ...], int]] = deque([{}])
    queued: set[frozenset[tuple[tuple[Any, ...], int]]] = {frozenset()}
    reason, checks, plans = "", 0, 0
    while queue and checks < MAX_TRIES and plans < MAX_PLANS:
        choices = queue.popleft()
        plans += 1
        tracker = _Tracker(model, shapes, values, set(feeds), choices)
        try:
            plan: Plan | None = tracker.run()
        except Unbatchable as e:
            plan, reason = None, reason or str(e)
        for signature, count in tracker.plan.choices.items():
            for alternative in range(count):
                changed = {**choices, signature: alternative}
                if frozenset(changed.items()) not in queued:
                    queued.add(frozenset(changed.items()))
                    queue.append(changed)
        if plan is not None:
            checks += 1
            candidate = _apply(model, plan)
            if _matches(candidate, rows, reference):
                return Result(candidate, "dynamic")
            reason = "no choice of the ambiguous reshapes gave the batch-1 graph's outputs"
    return Result(None, reason)


def _session(model: Any, *, optimize: bool = True) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the library does not write to stderr
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _matches(candidate: Any, rows: dict[str, np.ndarray], reference: np.ndarray) -> bool:
    try:
        out = _session(candidate).run(None, rows)[0]
    except Exception:  # noqa: BLE001 - a wrong choice may well make an invalid graph
        return False
    if out.shape != reference.shape:
        return False
    scale = max(float(np.abs(reference).max()), 1e-12)
    return bool(np.abs(out - reference).max() <= TOLERANCE * scale)


def _run_batch_1(model: Any, feeds: dict[str, np.ndarray], rows: dict[str, np.ndarray]
                 ) -> tuple[dict[str, tuple[int, ...]], dict[str, np.ndarray], np.ndarray]:
    """From one session of the batch-1 graph: the shape of every tensor in a run of ``feeds``, the
    values of the small integer ones, and the graph's output for each of ``rows`` run one by one
    (the reference a rewrite must give)."""
    # Every tensor a graph output for this one session; added in place and taken out again (a copy
    # of the model would hold its weights twice).
    outputs = model.graph.output
    kept = len(outputs)
    output = outputs[0].name
    declared = {o.name for o in outputs}
    names = [o for node in model.graph.node for o in node.output if o]
    outputs.extend(pb.ValueInfoProto(name=n) for n in names if n not in declared)
    try:
        session = _session(model, optimize=False)  # every tensor as written
    finally:
        del outputs[kept:]
    shapes: dict[str, tuple[int, ...]] = {n: tuple(v.shape) for n, v in feeds.items()}
    values: dict[str, np.ndarray] = {}
    for start in range(0, len(names), _RECORD_CHUNK):
        chunk = names[start:start + _RECORD_CHUNK]
        for name, array in zip(chunk, session.run(chunk, feeds)):
            array = np.asarray(array)
            shapes[name] = tuple(array.shape)
            if array.dtype.kind in "iub" and array.size <= _SMALL:
                values[name] = array
    for tensor in model.graph.initializer:
        shapes[tensor.name] = tuple(tensor.dims)
        if tensor.data_type in (6, 7) and prod(tensor.dims) <= _SMALL:  # int32, int64
            values[tensor.name] = _int_array(tensor)
    reference = np.concatenate([session.run([output], {k: v[i:i + 1] for k, v in rows.items()})[0]
                                for i in range(CHECK_BATCH)])
    return shapes, values, reference


def _int_array(tensor: Any) -> np.ndarray:
    dtype = "<i4" if tensor.data_type == 6 else "<i8"
    data = np.frombuffer(tensor.raw_data, dtype) if tensor.raw_data else \
        np.array(tensor.int32_data if tensor.data_type == 6 else tensor.int64_data, dtype)
    return data.reshape(tuple(tensor.dims))


def _apply(model: Any, plan: Plan) -> Any:
    """A copy of ``model`` with the plan's edits and a symbolic batch on its input and output."""
    out = pb.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    taken = {o for n in graph.node for o in n.output} | {t.name for t in graph.initializer} | \
        {i.name for i in graph.input}

    def fresh(base: str) -> str:
        name, n = base, 0
        while name in taken:
            n += 1
            name = f"{base}_{n}"
        taken.add(name)
        return name

    def constant(base: str, array: list[int]) -> str:
        name = fresh(base)
        tensor = pb.TensorProto(name=name, data_type=7, dims=[len(array)])  # int64
        tensor.raw_data = np.array(array, "<i8").tobytes()
        graph.initializer.append(tensor)
        return name

    for index, shape in plan.reshapes.items():
        node = graph.node[index]
        node.input[1] = constant(f"{node.name or node.output[0]}/batch_shape", shape)
    inserted: dict[int, list[Any]] = {}
    for index, slot, batched, axis, rank in plan.expands:
        # x -> Expand(x, [1]*axis + [batched's batch dim] + [1]*(rank-axis-1)): x has 1 on that axis.
        node = graph.node[index]
        base = f"{node.name or node.output[0]}/batch_expand{slot}"
        dims, batch, target, expanded = (fresh(f"{base}/{part}") for part in ("shape", "batch", "target", "out"))
        pieces = [constant(f"{base}/ones", [1] * axis)] if axis else []
        pieces.append(batch)
        if rank - axis - 1:
            pieces.append(constant(f"{base}/ones", [1] * (rank - axis - 1)))
        inserted.setdefault(index, []).extend([
            pb.NodeProto(op_type="Shape", input=[batched], output=[dims], name=fresh(f"{base}/Shape")),
            pb.NodeProto(op_type="Slice", input=[dims, constant(f"{base}/start", [axis]),
                                                 constant(f"{base}/end", [axis + 1])],
                         output=[batch], name=fresh(f"{base}/Slice")),
            _node_with_axis("Concat", pieces, target, fresh(f"{base}/Concat"), 0),
            pb.NodeProto(op_type="Expand", input=[node.input[slot], target], output=[expanded],
                         name=fresh(f"{base}/Expand")),
        ])
        node.input[slot] = expanded
    if inserted:
        nodes = list(graph.node)
        del graph.node[:]
        for index, node in enumerate(nodes):
            graph.node.extend(inserted.get(index, []))
            graph.node.append(node)
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_param = BATCH_DIM
    del graph.value_info[:]  # the tracer's batch-1 shapes of intermediate tensors
    _drop_unused(graph)
    return out


def _drop_unused(graph: Any) -> None:
    """Remove the Constant nodes and initializers that only the replaced Reshape shapes used."""
    used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
    kept = [n for n in graph.node if n.op_type != "Constant" or n.output[0] in used]
    if len(kept) != len(graph.node):
        del graph.node[:]
        graph.node.extend(kept)
    for index in reversed(range(len(graph.initializer))):
        if graph.initializer[index].name not in used:
            del graph.initializer[index]


def _node_with_axis(op: str, inputs: list[str], output: str, name: str, axis: int) -> Any:
    node = pb.NodeProto(op_type=op, input=inputs, output=[output], name=name)
    node.attribute.append(pb.AttributeProto(name="axis", type=pb.AttributeProto.INT, i=axis))
    return node


def _attribute(node: Any, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return list(a.ints) if a.type == pb.AttributeProto.INTS else a.i
    return default


class _Tracker:
    """One pass over the graph: where the batch lies in each tensor, and the edits that keep it there."""

    def __init__(self, model: Any, shapes: dict[str, tuple[int, ...]], values: dict[str, np.ndarray],
                 inputs: set[str], choices: dict[tuple[Any, ...], int]) -> None:
        self.graph, self.shapes, self.values, self.choices = model.graph, shapes, values, choices
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.batch: dict[str, BatchAt] = {name: BatchAt(0) for name in inputs}
        self.const: set[str] = {t.name for t in model.graph.initializer}
        self.plan = Plan()

    def run(self) -> Plan:
        for index, node in enumerate(self.graph.node):
            present = [i for i in node.input if i]
            if node.op_type == "Constant" or (present and all(i in self.const for i in present)):
                self.const.update(o for o in node.output if o)
                continue
            if not any(i in self.batch for i in present):
                continue  # shape arithmetic (Shape -> Gather -> Concat...) and the like: no batch in it
            at = self._follow(index, node)
            if at is not None:
                outputs = node.output if node.op_type == "Split" else node.output[:1]
                self.batch.update((o, at) for o in outputs if o)
        (output,) = [o.name for o in self.graph.output]
        if self.batch.get(output) != BatchAt(0) or self.shapes[output][0] != 1:
            raise Unbatchable(f"the batch does not end on the output's first axis ({self.batch.get(output)})")
        return self.plan

    # --- helpers ---------------------------------------------------------------------------------

    def _values(self, name: str, what: str) -> list[int]:
        if name not in self.values:
            raise Unbatchable(f"{what} is not a known constant")
        return [int(v) for v in np.asarray(self.values[name]).reshape(-1)]

    def _only_first_batched(self, node: Any) -> BatchAt:
        if any(i in self.batch for i in node.input[1:]) or node.input[0] not in self.batch:
            raise Unbatchable(f"{node.op_type} {node.name}: batch on an input other than the first")
        return self.batch[node.input[0]]

    def _broadcast(self, node: Any) -> BatchAt:
        """Numpy-style broadcasting: inputs aligned on their last axis."""
        rank = len(self.shapes[node.output[0]])
        found: set[BatchAt] = set()
        for name in (i for i in node.input if i in self.batch):
            at = self.batch[name]
            found.add(BatchAt(at.axis + rank - len(self.shapes[name]), at.outer))
        if len(found) != 1:
            raise Unbatchable(f"{node.op_type} {node.name}: inputs batched on different axes")
        (at,) = found
        for name in (i for i in node.input if i and i not in self.batch):
            axis = at.axis - (rank - len(self.shapes[name]))
            if axis >= 0 and self.shapes[name][axis] != 1:
                raise Unbatchable(f"{node.op_type} {node.name}: a constant spans the batch's axis")
        return at

    # --- the ops ---------------------------------------------------------------------------------

    def _follow(self, index: int, node: Any) -> BatchAt | None:
        op = node.op_type
        handler: Callable[[int, Any], BatchAt | None] | None = getattr(self, f"_op_{op}", None)
        if handler is not None:
            return handler(index, node)
        if op in ("Shape", "Size"):
            return None
        if op in _ELEMENTWISE:
            return self._broadcast(node)
        at = self._only_first_batched(node)
        rank = len(self.shapes[node.input[0]])
        if op in _UNARY:
            return at
        if op in ("Softmax", "LogSoftmax", "Hardmax", "LayerNormalization"):
            # Before opset 13 the softmaxes normalise over every axis from `axis` (default 1) on.
            flattening = op == "LayerNormalization" or self.opset < 13
            axis = _attribute(node, "axis", -1 if op == "LayerNormalization" or self.opset >= 13 else 1) % rank
            if (at.axis >= axis) if flattening else (at.axis == axis):
                raise Unbatchable(f"{op} {node.name} normalises over the batch's axis")
            return at
        if op in _BATCH_FIRST:
            if at != BatchAt(0) or self.shapes[node.input[0]][0] != 1:
                raise Unbatchable(f"{op} {node.name}: the batch is not the first axis")
            return at
        if op in _REDUCE or op in ("ArgMax", "ArgMin"):
            return self._reduce(node, at, rank)
        if op == "Transpose":
            perm = _attribute(node, "perm") or list(range(rank))[::-1]
            return BatchAt(perm.index(at.axis), at.outer)
        if op == "Gemm":
            if _attribute(node, "transA", 0) or at.axis != 0:
                raise Unbatchable(f"Gemm {node.name}: the batch is not A's rows")
            return at
        raise Unbatchable(f"{op} ({node.name}) is not followed")

    def _reduce(self, node: Any, at: BatchAt, rank: int) -> BatchAt:
        if node.op_type in ("ArgMax", "ArgMin"):
            axes = [_attribute(node, "axis", 0)]
        elif len(node.input) > 1 and node.input[1]:
            axes = self._values(node.input[1], f"{node.name}'s axes")
        else:
            axes = _attribute(node, "axes") or []
        if not axes:
            raise Unbatchable(f"{node.op_type} {node.name} reduces every axis")
        axes = [a % rank for a in axes]
        if at.axis in axes:
            raise Unbatchable(f"{node.op_type} {node.name} reduces over the batch")
        keep = _attribute(node, "keepdims", 1)
        return at if keep else BatchAt(at.axis - sum(a < at.axis for a in axes), at.outer)

    def _op_MatMul(self, index: int, node: Any) -> BatchAt:
        rank = len(self.shapes[node.output[0]])
        found = set()
        for slot, name in enumerate(node.input[:2]):
            if name not in self.batch:
                continue
            at, own = self.batch[name], len(self.shapes[name])
            contracted = own - 1 if slot == 0 else own - 2
            if own < 2 or at.axis == contracted:
                raise Unbatchable(f"MatMul {node.name}: the batch is on a contracted axis")
            found.add(BatchAt(at.axis + rank - own, at.outer))
        if len(found) != 1:
            raise Unbatchable(f"MatMul {node.name}: inputs batched on different axes")
        (at,) = found
        if at.axis < rank - 2:  # a leading (stacked) axis: the other input must broadcast over it
            for name in (i for i in node.input[:2] if i not in self.batch):
                axis = at.axis - (rank - len(self.shapes[name]))
                if axis >= 0 and self.shapes[name][axis] != 1:
                    raise Unbatchable(f"MatMul {node.name}: a constant spans the batch's axis")
        return at

    def _op_Gather(self, index: int, node: Any) -> BatchAt:
        data, indices = node.input[0], node.input[1]
        axis = _attribute(node, "axis", 0) % len(self.shapes[data])
        if data in self.batch and indices in self.batch:
            raise Unbatchable(f"Gather {node.name}: both inputs batched")
        if indices in self.batch:  # an embedding table looked up with batched ids
            at = self.batch[indices]
            return BatchAt(axis + at.axis, at.outer)
        at = self.batch[data]
        if at.axis == axis:
            raise Unbatchable(f"Gather {node.name} picks along the batch")
        return at if at.axis < axis else BatchAt(at.axis + len(self.shapes[indices]) - 1, at.outer)

    def _axes(self, node: Any, what: str) -> list[int] | None:
        if len(node.input) > 1 and node.input[1]:
            return self._values(node.input[1], f"{node.name}'s {what}")
        return _attribute(node, "axes")

    def _op_Unsqueeze(self, index: int, node: Any) -> BatchAt:
        at = self._only_first_batched(node)
        rank = len(self.shapes[node.output[0]])
        inserted = {a % rank for a in self._axes(node, "axes") or []}
        kept = [i for i in range(rank) if i not in inserted]
        return BatchAt(kept[at.axis], at.outer)

    def _op_Squeeze(self, index: int, node: Any) -> BatchAt:
        at = self._only_first_batched(node)
        shape = self.shapes[node.input[0]]
        axes = self._axes(node, "axes")
        removed = {a % len(shape) for a in axes} if axes else {i for i, d in enumerate(shape) if d == 1}
        if at.axis in removed:
            raise Unbatchable(f"Squeeze {node.name} removes the batch's axis")
        return BatchAt(at.axis - sum(a < at.axis for a in removed), at.outer)

    def _op_Slice(self, index: int, node: Any) -> BatchAt:
        at = self._only_first_batched(node)
        rank = len(self.shapes[node.input[0]])
        inputs = list(node.input) + [""] * 5
        if not inputs[1]:  # opset < 10: attributes
            starts, ends = _attribute(node, "starts"), _attribute(node, "ends")
            axes = _attribute(node, "axes") or list(range(len(starts)))
            steps = [1] * len(starts)
        else:
            starts = self._values(inputs[1], "Slice starts")
            ends = self._values(inputs[2], "Slice ends")
            axes = self._values(inputs[3], "Slice axes") if inputs[3] else list(range(len(starts)))
            steps = self._values(inputs[4], "Slice steps") if inputs[4] else [1] * len(starts)
        for start, end, axis, step in zip(starts, ends, axes, steps):
            # Along the batch only a whole-axis slice keeps every row (traced as [0, INT_MAX)).
            if axis % rank == at.axis and not (start == 0 and end >= 2**31 - 1 and step == 1):
                raise Unbatchable(f"Slice {node.name} cuts the batch's axis")
        return at

    def _op_Split(self, index: int, node: Any) -> BatchAt:
        at = self._only_first_batched(node)
        if _attribute(node, "axis", 0) % len(self.shapes[node.input[0]]) == at.axis:
            raise Unbatchable(f"Split {node.name} splits the batch's axis")
        return at

    def _op_Flatten(self, index: int, node: Any) -> BatchAt:
        at = self._only_first_batched(node)
        shape = self.shapes[node.input[0]]
        k = _attribute(node, "axis", 1) % (len(shape) + 1)
        if at.axis < k:
            return BatchAt(0, prod(shape[:at.axis]) * at.outer)
        return BatchAt(1, prod(shape[k:at.axis]) * at.outer)

    def _op_Concat(self, index: int, node: Any) -> BatchAt:
        rank = len(self.shapes[node.output[0]])
        axis = _attribute(node, "axis", 0) % rank
        batched = [i for i in node.input if i in self.batch]
        found = {self.batch[i] for i in batched}
        if len(found) != 1:
            raise Unbatchable(f"Concat {node.name}: inputs batched on different axes")
        (at,) = found
        if at.axis == axis:
            raise Unbatchable(f"Concat {node.name} joins along the batch")
        pure = at.outer == 1 and self.shapes[batched[0]][at.axis] == 1
        for slot, name in enumerate(node.input):
            if name and name not in self.batch:
                if not pure or self.shapes[name][at.axis] != 1:
                    raise Unbatchable(f"Concat {node.name}: a constant input cannot be spread over the batch")
                self.plan.expands.append((index, slot, batched[0], at.axis, rank))
        return at

    def _op_Expand(self, index: int, node: Any) -> BatchAt:
        at = self._only_first_batched(node)
        out, own = self.shapes[node.output[0]], self.shapes[node.input[0]]
        axis = at.axis + len(out) - len(own)
        # The batch's axis must not be broadcast at batch 1, and a constant target must say 1 there (so
        # that it keeps any batch); a dynamic target is taken as it comes (the check runs it).
        if out[axis] != own[at.axis] or (node.input[1] in self.values
                                         and self._values(node.input[1], "Expand shape")[axis] != 1):
            raise Unbatchable(f"Expand {node.name} spreads over the batch's axis")
        return BatchAt(axis, at.outer)

    def _op_Reshape(self, index: int, node: Any) -> BatchAt:
        at = self._only_first_batched(node)
        shape_in, shape_out = self.shapes[node.input[0]], self.shapes[node.output[0]]
        outside = prod(shape_in[:at.axis]) * at.outer  # elements before the batch, in row-major order
        candidates = []
        for j, size in enumerate(shape_out):
            before = prod(shape_out[:j])
            if size and outside % before == 0 and size % (outside // before or 1) == 0 \
                    and 1 <= outside // before <= size:
                candidates.append(BatchAt(j, outside // before))
        if not candidates:
            raise Unbatchable(f"Reshape {node.name}: no place for the batch")
        # Preferred: a whole axis of 1 (the traced batch itself), then the start of an axis.
        candidates.sort(key=lambda c: (shape_out[c.axis] != 1, c.outer != 1, c.axis))
        signature = ("Reshape", shape_in, shape_out, at)
        self.plan.choices[signature] = len(candidates)
        chosen = candidates[self.choices.get(signature, 0) % len(candidates)]
        if node.input[1] in self.const:
            target = list(shape_out)
            target[chosen.axis] = -1
            self.plan.reshapes[index] = target
        return chosen
