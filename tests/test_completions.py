"""Shell completion scripts: generated from the app into completions/, and completion itself stays light."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .factories import make_contract_bundle

COMPLETIONS = Path(__file__).parent.parent / "completions"


def run_completion(env: dict[str, str]) -> str:
    result = subprocess.run([sys.executable, "-m", "clipgrep"], capture_output=True, text=True,
                            env={**os.environ, **env}, check=True)
    return result.stdout


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts_match_the_app(shell: str, golden) -> None:
    script = run_completion({"_CLIPGREP_COMPLETE": f"source_{shell}"})
    assert "_CLIPGREP_COMPLETE" in script
    golden.check(str(COMPLETIONS / f"clipgrep.{shell}"), script)


def test_bash_completion_lists_commands() -> None:
    out = run_completion({"_CLIPGREP_COMPLETE": "complete_bash", "COMP_WORDS": "clipgrep se", "COMP_CWORD": "1"})
    assert out.split() == ["search"]


def test_model_names_complete_from_installed_models(tmp_path: Path, clipgrep_home: Path) -> None:
    from clipgrep.models import add_model

    add_model("tiny-one", checkpoint=make_contract_bundle(tmp_path / "b"))
    out = run_completion({"_CLIPGREP_COMPLETE": "complete_bash", "COMP_WORDS": "clipgrep search --model ti",
                          "COMP_CWORD": "3", "CLIPGREP_HOME": str(clipgrep_home)})
    assert out.split() == ["tiny-one"]
