"""Shell completion scripts: generated from the app into clipgrep/completions/, and completion stays light."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .factories import make_contract_bundle

COMPLETIONS = Path(__file__).parent.parent / "clipgrep" / "completions"


def run_completion(env: dict[str, str]) -> str:
    result = subprocess.run([sys.executable, "-m", "clipgrep"], capture_output=True, text=True,
                            env={**os.environ, **env}, check=True)
    return result.stdout


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts_match_the_app(shell: str, golden) -> None:
    script = run_completion({"_CLIPGREP_COMPLETE": f"source_{shell}"})
    assert "_CLIPGREP_COMPLETE" in script
    golden.check(str(COMPLETIONS / f"clipgrep.{shell}"), script)


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completions_command_prints_the_shipped_script(shell: str) -> None:
    result = subprocess.run([sys.executable, "-m", "clipgrep", "completions", shell], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (COMPLETIONS / f"clipgrep.{shell}").read_text(encoding="utf-8")


def test_bash_completion_lists_commands() -> None:
    out = run_completion({"_CLIPGREP_COMPLETE": "complete_bash", "COMP_WORDS": "clipgrep se", "COMP_CWORD": "1"})
    assert out.split() == ["search"]


def test_model_names_complete_from_installed_models(tmp_path: Path, clipgrep_home: Path) -> None:
    from clipgrep.models import add_model

    add_model("tiny-one", checkpoint=make_contract_bundle(tmp_path / "b"))
    out = run_completion({"_CLIPGREP_COMPLETE": "complete_bash", "COMP_WORDS": "clipgrep search --model ti",
                          "COMP_CWORD": "3", "CLIPGREP_HOME": str(clipgrep_home)})
    assert out.split() == ["tiny-one"]
