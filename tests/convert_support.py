"""Helpers for tests that need torch and open_clip (the convert extra)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

TINY_ARCH = "clipgrep-tiny-test"
# Small enough to export in a second, real enough to exercise every code path.
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def require_open_clip() -> Any:
    """open_clip, or skip the test when the convert extra is missing."""
    pytest.importorskip("torch")
    from clipgrep.convert.torch_env import import_open_clip
    from clipgrep.errors import NeedsExtra

    try:
        return import_open_clip()
    except NeedsExtra as e:
        pytest.skip(str(e))


def register_arch(name: str, config: dict[str, Any], directory: Path) -> str:
    """Make architecture ``name`` with open_clip model ``config`` known to open_clip in this process."""
    open_clip = require_open_clip()
    if open_clip.get_model_config(name) is None:
        path = directory / f"{name}.json"
        path.write_text(json.dumps(config))
        open_clip.add_model_config(path)
    return name


def register_tiny_arch(directory: Path) -> str:
    """Make ``TINY_ARCH`` known to open_clip in this process."""
    return register_arch(TINY_ARCH, TINY_CONFIG, directory)


# The teacher of the stage 1 and stage 2 tests: 4 + 4 blocks, 32 px, so a 2-block student differs.
TEACHER_ARCH = "clipgrep-tiny-teacher-4x4"
TEACHER_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 4},
}


def random_teacher_dir(arch_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """A random ``TEACHER_ARCH`` teacher saved as a local dir, so its weights do not depend on any seed
    after it is written (another ``seed``: another teacher)."""
    import torch

    from clipgrep.compress.checkpoint import save_local_dir
    from clipgrep.compress.teacher import load_teacher

    register_arch(TEACHER_ARCH, TEACHER_CONFIG, arch_dir)
    torch.manual_seed(seed)
    teacher = load_teacher(f"{TEACHER_ARCH}:random")
    return save_local_dir(teacher.model, teacher.model_cfg, teacher.preprocess, out_dir)


def tiny_model(seed: int = 0) -> Any:
    import torch

    open_clip = require_open_clip()
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_ARCH, pretrained=None)
    return model.eval()
