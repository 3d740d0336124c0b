"""clipgrep installs on Windows and macOS too, so no module may need a POSIX-only one.

An import inside a ``try`` that catches ImportError is a fallback, not a need (the terminal
preview reads the cell size in pixels through ``fcntl``/``termios`` where they exist).
"""
from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import clipgrep

POSIX_ONLY = {"fcntl", "resource", "pwd", "grp", "termios", "posix"}


def _catches_import_error(node: ast.Try) -> bool:
    for handler in node.handlers:
        types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        if any(isinstance(t, ast.Name) and t.id in ("ImportError", "ModuleNotFoundError") for t in types):
            return True
    return False


def _unguarded_imports(node: ast.AST, guarded: bool = False) -> Iterator[str]:
    if isinstance(node, ast.Import) and not guarded:
        yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and not guarded:
        yield node.module or ""
    for field, value in ast.iter_fields(node):
        children = value if isinstance(value, list) else [value]
        inner = guarded or (isinstance(node, ast.Try) and field == "body" and _catches_import_error(node))
        for child in children:
            if isinstance(child, ast.AST):
                yield from _unguarded_imports(child, inner)


def test_no_module_imports_a_posix_only_module() -> None:
    offenders = []
    for source in sorted(Path(clipgrep.__file__).parent.rglob("*.py")):
        names = _unguarded_imports(ast.parse(source.read_text(encoding="utf-8")))
        offenders += [f"{source.name}: {name}" for name in names if name.split(".")[0] in POSIX_ONLY]
    assert offenders == []


def test_only_an_import_error_guard_counts() -> None:
    code = ("import fcntl\n"
            "try:\n    import termios\nexcept ImportError:\n    pass\n"
            "try:\n    import pwd\nexcept OSError:\n    pass\n"
            "def f():\n    try:\n        import grp\n    except (OSError, ImportError):\n        return\n")
    assert list(_unguarded_imports(ast.parse(code))) == ["fcntl", "pwd"]
