"""int8 dynamic quantisation of an ONNX tower: one rule for every model, converted or imported.

Quantising MatMul/Gemm weights is what makes transformer towers 2-2.4x faster
on CPU, and the token-embedding Gather makes text towers 4x smaller.
Convolutions are never quantised: onnxruntime's ConvInteger runs about 10x
slower than fp32 on x86 (measured on MobileCLIP here), and for a ViT's single
patch-embedding conv it was a wash. An earlier version timed both variants at
conversion and kept the faster; under load that choice flipped between runs,
so the same model converted and imported (or converted twice) could get
different graphs and speeds. The rule gives one graph per model.

Weights are per-channel with a 7-bit range (reduce_range). Measured here on
ViT-B-32 (random weights, min cosine to fp32 over the parity samples):
plain s8 weights 0.983 image (the u8*s8 multiply-add saturates int16
intermediates on x86); reduce_range 0.9994 image / 0.9953 text; plus
per-channel 0.9997 / 0.9977 at the same speed; u8 weights 0.9998 / 0.9985 but
~1.5x slower.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from .dynamic_int8 import quantize_model

# What dynamic_int8 quantises (Gemm as MatMul); recorded in the manifest.
QUANTIZED_OPS = ["MatMul", "Gemm", "Gather"]


def quantize_tower(src: Path, dst: Path, sample: np.ndarray | dict[str, np.ndarray],
                   input_name: str | None = None) -> dict[str, Any]:
    """Write an int8 version of ``src`` to ``dst``; return what was quantised and the timings (ms/item).

    ``sample`` is the timing input of ``input_name``, or all the inputs by name; the
    timings are shown by ``models info`` and decide nothing. Torch- and onnx-free:
    imported exports (clipgrep.imports) use it too.
    """
    quantize_model(src, dst)
    timings = {"fp32": _time_model(src, sample, input_name), "matmul": _time_model(dst, sample, input_name)}
    return {"op_types": QUANTIZED_OPS, "chosen": "matmul", "ms_per_item": timings}


def _time_model(path: Path, sample: np.ndarray | dict[str, np.ndarray], input_name: str | None, *,
                repeats: int = 3) -> float:
    """Median ms per item over a few runs of ``sample``, after one warm-up."""
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
    return round(statistics.median(runs), 3)
