"""int8 dynamic quantisation of an ONNX tower, choosing what to quantise by measured speed.

Quantising MatMul/Gemm is what makes transformer towers 2-2.4x faster on CPU.
Quantising convolutions turns them into ConvInteger, which onnxruntime's CPU
kernels run about 10x slower than fp32 (measured on MobileCLIP here), but a
single patch-embedding conv may still be a wash. So when a graph has Conv
nodes, both variants are built and timed on this machine and the faster wins.

Weights are per-channel with a 7-bit range (reduce_range). Measured here on
ViT-B-32 (random weights, min cosine to fp32 over the parity samples):
plain s8 weights 0.983 image (the u8*s8 multiply-add saturates int16
intermediates on x86); reduce_range 0.9994 image / 0.9953 text; plus
per-channel 0.9997 / 0.9977 at the same speed; u8 weights 0.9998 / 0.9985 but
~1.5x slower.
"""
from __future__ import annotations

import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# Everything onnxruntime can quantise dynamically, except Conv.
_BASE_OPS = ["MatMul", "Gemm", "Attention", "Gather", "EmbedLayerNormalization", "LSTM"]
_WITH_CONV = _BASE_OPS + ["Conv"]


def quantize_tower(src: Path, dst: Path, sample: np.ndarray | dict[str, np.ndarray],
                   input_name: str | None = None) -> dict[str, Any]:
    """Write an int8 version of ``src`` to ``dst``; return what was chosen and the timings (ms/item).

    ``sample`` is the timing input of ``input_name``, or all the inputs by name.
    Torch-free: imported exports (clipgrep.imports) use it too.
    """
    import onnx

    has_conv = any(node.op_type == "Conv" for node in onnx.load(str(src), load_external_data=False).graph.node)
    variants = {"matmul": _BASE_OPS, "matmul+conv": _WITH_CONV} if has_conv else {"matmul": _BASE_OPS}
    timings = {"fp32": _time_model(src, sample, input_name)}
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        built = {}
        for label, ops in variants.items():
            path = Path(tmp) / f"{label}.onnx"
            _quantize(src, path, ops)
            timings[label] = _time_model(path, sample, input_name, give_up_ms=3 * timings["fp32"])
            built[label] = path
        chosen = min(built, key=lambda label: timings[label])
        shutil.move(str(built[chosen]), dst)
    return {"op_types": variants[chosen], "chosen": chosen, "ms_per_item": timings}


def _quantize(src: Path, dst: Path, op_types: list[str]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantiser logs a "run pre-processing first" warning on every call; the
    # parity gate that follows is the real check.
    quant_logger = logging.getLogger()
    level = quant_logger.level
    quant_logger.setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=op_types,
                         reduce_range=True, per_channel=True)
    finally:
        quant_logger.setLevel(level)


def _time_model(path: Path, sample: np.ndarray | dict[str, np.ndarray], input_name: str | None, *, repeats: int = 3,
                give_up_ms: float | None = None) -> float:
    """Median ms per item over a few runs of ``sample``, after one warm-up.

    A variant slower than ``give_up_ms`` on its first timed run (ConvInteger
    is ~10x slower) cannot win, so it is not timed further: that saves seconds.
    """
    from ..embed.onnx import create_session

    feeds = sample if isinstance(sample, dict) else {str(input_name): sample}
    items = len(next(iter(feeds.values())))
    session = create_session(path)
    session.run(None, feeds)
    runs: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        runs.append((time.perf_counter() - start) * 1000 / items)
        if give_up_ms is not None and runs[0] > give_up_ms:
            break
    return round(statistics.median(runs), 3)
