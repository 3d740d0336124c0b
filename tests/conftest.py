"""Shared fixtures: an isolated CLIPGREP_HOME and golden-file checks."""
from __future__ import annotations

import difflib
from pathlib import Path

import pytest

GOLDEN_DIR = Path(__file__).parent / "golden"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        help="rewrite golden files from the current output instead of comparing (make golden)",
    )


@pytest.fixture(autouse=True)
def clipgrep_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty state dir; nothing touches the real home."""
    home = tmp_path_factory.mktemp("clipgrep-home")
    monkeypatch.setenv("CLIPGREP_HOME", str(home))
    return home


class Golden:
    """Compare text with ``tests/golden/NAME``; a missing golden fails, never written silently."""

    def __init__(self, update: bool) -> None:
        self.update = update

    def check(self, name: str, actual: str) -> None:
        """``name`` is relative to tests/golden, or an absolute path for goldens that ship (completions/)."""
        path = GOLDEN_DIR / name
        if self.update:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(actual, encoding="utf-8")
            return
        if not path.exists():
            pytest.fail(f"golden file {path} is missing; run `make golden` and review the diff")
        expected = path.read_text(encoding="utf-8")
        if actual != expected:
            diff = "".join(
                difflib.unified_diff(
                    expected.splitlines(keepends=True),
                    actual.splitlines(keepends=True),
                    fromfile=f"golden/{name}",
                    tofile="actual",
                )
            )
            pytest.fail(f"output differs from golden/{name} (run `make golden` if intended):\n{diff}")


@pytest.fixture
def golden(request: pytest.FixtureRequest) -> Golden:
    return Golden(update=request.config.getoption("--update-golden"))
