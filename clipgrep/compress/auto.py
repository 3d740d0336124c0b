"""``clipgrep compress auto``: a student distilled for the user's own library, in one command.

Stage 1 on the indexed photos (the index's stored teacher embeddings are the
image targets, generic captions the text set), export as an int8 bundle, then a
label-free fidelity report (``fidelity.py``) against the teacher on the same
library. Then ``clipgrep index --model NAME`` re-indexes with the student.

Output directory::

    stage1/          the stage-1 run (checkpoints; rerunning resumes it)
    fidelity.json    the report

The teacher is named as a teacher SPEC, or as the installed model the photos are
indexed with, whose provenance then says which open_clip weights to load.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ClipgrepError
from .generic_texts import BUILTIN_GENERIC

REPORT = "fidelity.json"


@dataclass(frozen=True)
class AutoConfig:
    """``teacher``: a teacher SPEC or an installed model; ``model``: the model the library is
    indexed with (default: ``teacher`` when that is an installed model, else the default model);
    ``student``: a student SPEC (default: ``default_student`` of the teacher)."""

    teacher: str
    out: str
    name: str
    model: str | None = None
    student: str | None = None
    texts: str = BUILTIN_GENERIC
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-4
    seed: int = 0
    device: str = "auto"
    max_steps: int | None = None
    replace: bool = False
    fidelity_sample: int = 2000


@dataclass(frozen=True)
class AutoResult:
    student_dir: Path
    model: str
    report: dict[str, Any]


def run_auto(config: AutoConfig, on_training: Callable[[Any], None] | None = None,
             on_step: Callable[[str], None] | None = None) -> AutoResult:
    """Distil, export and report; rerunning resumes stage 1 where it stopped."""
    from ..models import default_model_name
    from .export import export_student
    from .fidelity import fidelity
    from .stage1 import Stage1Config, run

    step = on_step or (lambda _: None)
    teacher, named_model = resolve_teacher(config.teacher)
    indexed = config.model or named_model or default_model_name()
    student = config.student or default_student(teacher)
    out = Path(config.out).expanduser()
    step(f"stage 1: distilling {student} from {teacher} on the photos indexed with {indexed}")
    student_dir = run(Stage1Config(teacher, student, None, config.texts, str(out / "stage1"), epochs=config.epochs,
                                   batch_size=config.batch_size, lr=config.lr, seed=config.seed,
                                   device=config.device, max_steps=config.max_steps, images_from_index=indexed),
                      on_progress=on_training)
    export_student(out / "stage1", config.name, "int8", replace=config.replace, on_progress=step)
    report = fidelity(indexed, config.name, sample=config.fidelity_sample, on_progress=step).figures()
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return AutoResult(student_dir, config.name, report)


def resolve_teacher(teacher: str) -> tuple[str, str | None]:
    """(teacher SPEC, installed model name or None) for a SPEC or an installed model's name."""
    from ..models import load_model
    from ..paths import models_dir

    if not (models_dir() / teacher).is_dir():
        return teacher, None
    provenance = load_model(teacher, auto_install=False).manifest.get("provenance") or {}
    arch, weights = str(provenance.get("arch") or ""), str(provenance.get("weights") or "")
    if weights.startswith("open_clip pretrained tag ") and arch:
        return f"{arch}:{weights.removeprefix('open_clip pretrained tag ')}", teacher
    if weights.startswith("local-dir ") and os.path.isdir(weights.removeprefix("local-dir ")):
        return weights.removeprefix("local-dir "), teacher
    raise ClipgrepError(f"model {teacher} does not record torch weights to distil from ({weights or 'unknown'})",
                        f"name its weights as a teacher SPEC, e.g. --teacher {arch or 'ARCH'}@FILE "
                        f"--model {teacher}")


def default_student(teacher: str) -> str:
    """Half the teacher's image layers and a third of its text layers: for ViT-B/32, the paper's
    CPU-fast shape (image 1.6x, text 2.9x faster; ../docs/stack.md §5)."""
    from ..convert.source import ModelSource
    from .students import source_model_cfg

    source = ModelSource.parse(teacher)
    cfg = source_model_cfg(source)
    image_layers, text_layers = cfg["vision_cfg"].get("layers"), cfg["text_cfg"].get("layers", 12)
    parts = [f"image={max(1, image_layers // 2)}"] if isinstance(image_layers, int) else []
    return ",".join([*parts, f"text={max(1, text_layers // 3)}"])
