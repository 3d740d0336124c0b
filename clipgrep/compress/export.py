"""``clipgrep compress export``: a trained student -> installed bundle(s), through the parity gate.

A stage writes its student as an open_clip local-dir; model conversion
(``models.add_model``) already turns a local-dir into a parity-checked bundle,
so export is that conversion: one ONNX export, then per precision a quantisation (or copy) and
the gate (``models.add_models``).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..bundle import Bundle
from ..convert import local_dir
from ..errors import ClipgrepError
from ..models import Progress, add_models


def student_dir(checkpoint: str | os.PathLike[str]) -> Path:
    """The open_clip local-dir inside a stage output (``OUT/student``), or ``checkpoint`` itself."""
    found = local_dir.find_local_dir(checkpoint)
    if found is not None:
        return found
    path = Path(checkpoint).expanduser()
    raise ClipgrepError(f"{path} holds no trained student ({local_dir.CONFIG} not found)",
                        "pass the --out directory of clipgrep compress stage1/stage2, or an open_clip local-dir")


def export_student(checkpoint: str | os.PathLike[str], name: str, precision: str = "both", *,
                   replace: bool = False, on_progress: Progress | None = None) -> list[Bundle]:
    """Install the student as ``name`` (int8) and/or ``name-fp32``; returns the bundles.

    >>> export_student("runs/stage2", "tiny-student")  # doctest: +SKIP
    """
    if precision not in ("both", "int8", "fp32"):
        raise ClipgrepError(f"unknown precision {precision!r}", "use both, int8 or fp32")
    source = student_dir(checkpoint)
    names = {"int8": name, "fp32": f"{name}-fp32"} if precision == "both" else {precision: name}
    return add_models(names, checkpoint=source, replace=replace, on_progress=on_progress)
