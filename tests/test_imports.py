"""Import discipline, checked in fresh interpreters.

``--help`` and completion must not load the heavy runtime (onnxruntime,
lancedb) and nothing at runtime may load torch or open_clip.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .factories import make_contract_bundle

HEAVY = ("torch", "torchvision", "open_clip", "onnxruntime", "lancedb", "numpy", "PIL")
TRAINING = ("torch", "torchvision", "open_clip", "timm")


def imported_modules(args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> set[str]:
    """Top-level modules a fresh interpreter imported while running ``args``."""
    result = subprocess.run([sys.executable, "-X", "importtime", *args], check=False, capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    names = set()
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    assert "clipgrep" in names
    return names


@pytest.mark.parametrize("argv", [["--help"], ["models", "--help"], ["models", "add", "--help"], ["models", "list"],
                                  ["models", "available"]])
def test_cli_paths_import_nothing_heavy(argv: list[str]) -> None:
    loaded = imported_modules(["-m", "clipgrep", *argv])
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))


def test_completion_imports_nothing_heavy() -> None:
    loaded = imported_modules(["-m", "clipgrep"], env={"_CLIPGREP_COMPLETE": "complete_bash",
                                                       "COMP_WORDS": "clipgrep models a", "COMP_CWORD": "2"})
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))


def test_encoding_with_a_bundle_imports_neither_torch_nor_open_clip(tmp_path: Path) -> None:
    bundle = make_contract_bundle(tmp_path / "b")
    image = tmp_path / "x.jpg"
    script = (
        "import sys\n"
        "from PIL import Image\n"
        f"Image.new('RGB', (50, 40), 'red').save({str(image)!r})\n"
        "from clipgrep.bundle import load_bundle\n"
        f"b = load_bundle({str(bundle)!r})\n"
        "assert b.text_encoder().encode(['a cat']).shape == (1, 8)\n"
        f"assert b.image_encoder().encode_files([{str(image)!r}]).shape == (1, 8)\n"
    )
    loaded = imported_modules(["-c", script])
    assert "onnxruntime" in loaded
    assert loaded.isdisjoint(TRAINING), sorted(loaded & set(TRAINING))
