"""clipgrep installs on Windows and macOS too, so no module may need a POSIX-only one."""
from __future__ import annotations

import ast
from pathlib import Path

import clipgrep

POSIX_ONLY = {"fcntl", "resource", "pwd", "grp", "termios", "posix"}


def test_no_module_imports_a_posix_only_module() -> None:
    offenders = []
    for source in sorted(Path(clipgrep.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{source.name}: {name}" for name in names if name.split(".")[0] in POSIX_ONLY]
    assert offenders == []
