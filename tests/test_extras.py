"""Without the convert extra (no torch, no open_clip), converting fails with one line that names it."""
from __future__ import annotations

import subprocess
import sys

import pytest

_WITHOUT_TORCH = ("import sys\n"
                  "for m in ('torch', 'torchvision', 'open_clip'): sys.modules[m] = None\n"
                  "from clipgrep.cli import main\n"
                  "sys.argv = ['clipgrep', *sys.argv[1:]]\n"
                  "main()\n")


@pytest.mark.parametrize("argv", [["models", "add", "b32", "--arch", "ViT-B-32", "--random-init"],
                                  ["compress", "--help"]])
def test_conversion_without_torch_names_the_extra(argv: list[str]) -> None:
    result = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH, *argv], capture_output=True, text=True,
                            check=False)
    if argv[-1] == "--help":  # help never needs torch
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("clipgrep: error:")]
    assert len(errors) == 1 and "clipgrep[convert]" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
