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


def register_tiny_arch(directory: Path) -> str:
    """Make ``TINY_ARCH`` known to open_clip in this process."""
    open_clip = require_open_clip()
    if open_clip.get_model_config(TINY_ARCH) is None:
        path = directory / f"{TINY_ARCH}.json"
        path.write_text(json.dumps(TINY_CONFIG))
        open_clip.add_model_config(path)
    return TINY_ARCH


def tiny_model(seed: int = 0) -> Any:
    import torch

    open_clip = require_open_clip()
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_ARCH, pretrained=None)
    return model.eval()
