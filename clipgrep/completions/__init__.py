"""Shell completion scripts, shipped in the wheel.

They are generated from the app (``make golden`` rewrites them and the tests compare
them), and ``clipgrep completions SHELL`` prints one.
"""
from __future__ import annotations

from importlib.resources import files

SHELLS = ("bash", "zsh", "fish")


def completion_script(shell: str) -> str:
    """The completion script for ``shell``, one of SHELLS."""
    if shell not in SHELLS:
        raise ValueError(f"no completion script for {shell!r}; shells: {', '.join(SHELLS)}")
    return files(__name__).joinpath(f"clipgrep.{shell}").read_text(encoding="utf-8")
