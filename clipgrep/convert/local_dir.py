"""open_clip's ``local-dir`` format, the one layout that stage outputs, teachers and conversion share.

A directory with ``open_clip_config.json`` (``{"model_cfg": ..., "preprocess_cfg": ...}``)
and ``open_clip_model.safetensors``; ``open_clip.create_model("local-dir:DIR")``
loads it. This module owns the file names and the torch-free reads; writing and
loading the weights (torch) is ``compress.checkpoint``'s.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import ClipgrepError

CONFIG = "open_clip_config.json"
WEIGHTS = "open_clip_model.safetensors"
# A stage's --out directory holds its student as this local dir.
STAGE_STUDENT = "student"


def is_local_dir(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / CONFIG).is_file()


def find_local_dir(path: str | os.PathLike[str]) -> Path | None:
    """``path`` itself, or the student local dir of a stage output at ``path``; None if neither."""
    path = Path(path).expanduser()
    for candidate in (path / STAGE_STUDENT, path):
        if is_local_dir(candidate):
            return candidate
    return None


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``open_clip_config.json`` of a local dir; one line naming the file if unreadable."""
    directory = Path(path).expanduser()
    try:
        config = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise ClipgrepError(f"{directory} is not an open_clip local dir (no readable {CONFIG} with model_cfg)",
                            "pass a directory written by clipgrep compress, or an open_clip local dir")
    return config


def model_cfg(path: str | os.PathLike[str]) -> dict[str, Any]:
    return dict(read_config(path)["model_cfg"])


def arch_name(path: str | os.PathLike[str] | None) -> str | None:
    """The architecture name a local dir records, if any (for provenance only)."""
    if path is None:
        return None
    try:
        config = read_config(path)
    except ClipgrepError:
        return None
    return config.get("model_name") or config["model_cfg"].get("name")
