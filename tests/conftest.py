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


def pytest_unconfigure(config: pytest.Config) -> None:
    """Exit as soon as pytest has reported, with its status.

    A safety net for CI: a process-pool worker left behind by some test (a decoder
    that hangs by design in the timeout tests) would make interpreter exit wait
    for it forever, after every test has already passed or failed.
    """
    import os
    import sys

    status = getattr(config, "_clipgrep_exitstatus", None)
    if status is not None and not os.environ.get("CLIPGREP_TEST_NORMAL_EXIT"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(status))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config._clipgrep_exitstatus = exitstatus  # type: ignore[attr-defined]


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
