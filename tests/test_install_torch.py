"""tools/install_torch.py: CPU torch from PyTorch's CPU index, or pip's own sources when it does not answer."""
from __future__ import annotations

import http.server
import importlib.util
import shlex
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).parent.parent
CONSTRAINTS = str(REPO_ROOT / "constraints.txt")


@pytest.fixture(scope="module")
def tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("install_torch", REPO_ROOT / "tools" / "install_torch.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dry_run(tool: ModuleType, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[list[str], str]:
    assert tool.main(["--python", "venv/bin/python", "--dry-run", *args]) == 0
    out, err = capsys.readouterr()
    return shlex.split(out), err


@pytest.fixture
def index_url(tmp_path: Path) -> Iterator[str]:
    """A local simple index that has a torch page, as PyTorch's CPU index does."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "index.html").write_text("<a href='torch-2.13.0+cpu.whl'>torch</a>")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_default_is_the_pytorch_cpu_index(tool, capsys, monkeypatch) -> None:
    monkeypatch.delenv("TORCH_INDEX_URL", raising=False)
    probed = []
    monkeypatch.setattr(tool, "index_answers", lambda url, timeout: probed.append(url) or True)
    command, _ = dry_run(tool, capsys)
    assert probed == ["https://download.pytorch.org/whl/cpu"]
    assert command == ["venv/bin/python", "-m", "pip", "install", "-q", "-c", CONSTRAINTS,
                       "--index-url", "https://download.pytorch.org/whl/cpu", "torch", "torchvision"]


def test_an_index_that_answers_is_used_for_torch_and_torchvision(tool, capsys, index_url: str) -> None:
    command, err = dry_run(tool, capsys, "--index-url", index_url)
    assert command[-4:] == ["--index-url", index_url, "torch", "torchvision"]
    assert err == ""


def test_an_unreachable_index_falls_back_to_pips_own_sources(tool, capsys) -> None:
    with socket.socket() as s:  # a port nothing listens on: refused at once
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    command, err = dry_run(tool, capsys, "--index-url", url)
    assert command == ["venv/bin/python", "-m", "pip", "install", "-q", "-c", CONSTRAINTS, "torch", "torchvision"]
    assert f"{url} could not be reached" in err and "TORCH_INDEX_URL" in err


def test_an_index_that_never_answers_falls_back_after_the_timeout(tool, capsys) -> None:
    with socket.socket() as s:  # accepts connections (backlog) but never replies
        s.bind(("127.0.0.1", 0))
        s.listen()
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        command, err = dry_run(tool, capsys, "--index-url", url, "--timeout", "0.5")
    assert "--index-url" not in command
    assert "waited at most 0.5 s" in err


def test_an_empty_index_url_skips_the_probe(tool, capsys, monkeypatch) -> None:
    monkeypatch.setattr(tool, "index_answers", lambda url, timeout: pytest.fail("probed"))
    monkeypatch.setenv("TORCH_INDEX_URL", "")
    command, err = dry_run(tool, capsys)
    assert "--index-url" not in command and err == ""


def test_the_tool_runs_on_the_bare_interpreter() -> None:
    # The Makefile runs it before the venv exists: standard library only.
    source = (REPO_ROOT / "tools" / "install_torch.py").read_text(encoding="utf-8")
    imported = {line.split()[1].split(".")[0] for line in source.splitlines()
                if line.startswith(("import ", "from ")) and not line.startswith("from __future__")}
    assert imported <= set(sys.stdlib_module_names)
