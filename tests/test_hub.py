"""``clipgrep models add NAME --from OWNER/REPO`` against a local stand-in for the hub (no network).

The CLI runs in a subprocess with ``HF_ENDPOINT`` pointed at tests/hub_fixture.py,
so huggingface_hub does its real transfer, caching and resuming.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .convert_support import TINY_CONFIG, register_tiny_arch, require_open_clip, tiny_model
from .export_support import write_openclip_export
from .hub_fixture import COMMIT, FakeHub, running

pytestmark = pytest.mark.convert
pytest.importorskip("tokenizers")
pytest.importorskip("huggingface_hub")

REPO = "immich-app/ViT-Tiny__test"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    open_clip = require_open_clip()
    register_tiny_arch(tmp_path_factory.mktemp("arch"))
    model = tiny_model(seed=0)
    root = write_openclip_export(model, TINY_CONFIG, dict(open_clip.get_model_preprocess_cfg(model)),
                                 tmp_path_factory.mktemp("export") / "ViT-Tiny__test")
    (root / "visual" / "fp16").mkdir()  # a variant for other runtimes, which must not be downloaded
    (root / "visual" / "fp16" / "model.armnn").write_bytes(b"x" * 5000)
    return root


# huggingface_hub writes a transfer in 10 MB chunks, so a cut inside a smaller file leaves nothing to
# resume from; the tiny test files need small chunks for the resume to be observable.
_SMALL_CHUNKS = ("import sys, huggingface_hub.constants as c; c.DOWNLOAD_CHUNK_SIZE = 4096; "
                 "from clipgrep.cli import main; sys.argv[0] = 'clipgrep'; main()")


def _add(name: str, hub_url: str, home: Path, hf_home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _SMALL_CHUNKS, "models", "add", name, "--from", REPO],
                          capture_output=True, text=True, check=False, timeout=300,
                          env={**os.environ, "CLIPGREP_HOME": str(home), "HF_HOME": str(hf_home),
                               "HF_ENDPOINT": hub_url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                               **env})


def _error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("clipgrep: error:")]


def _manifest(home: Path, name: str) -> dict[str, Any]:
    return json.loads((home / "models" / name / "manifest.json").read_text())


def test_download_records_repo_revision_and_hashes_then_uses_the_cache(export_dir: Path, tmp_path: Path,
                                                                       clipgrep_home: Path) -> None:
    hf_home = tmp_path / "hf"
    with running(FakeHub(REPO, export_dir)) as hub:
        result = _add("hubbed", hub.url, clipgrep_home, hf_home)
        assert result.returncode == 0, result.stderr
        fetched = {path.split("/resolve/")[1].split("/", 1)[1] for method, path, _ in hub.requests if method == "GET"}
        assert "visual/fp16/model.armnn" not in fetched and "visual/model.onnx" in fetched
        provenance = _manifest(clipgrep_home, "hubbed")["provenance"]
        assert provenance["repo"] == REPO and provenance["revision"] == COMMIT
        assert provenance["hub_hashes_verified"] is True
        assert provenance["source_files"]["textual/model.onnx"] == \
            hashlib.sha256((export_dir / "textual" / "model.onnx").read_bytes()).hexdigest()
        hub.requests.clear()
        again = _add("hubbed2", hub.url, clipgrep_home, hf_home)
        assert again.returncode == 0, again.stderr
        assert not [r for r in hub.requests if r[0] == "GET"]  # everything came from the hub cache


def test_interrupted_download_is_resumed(export_dir: Path, tmp_path: Path, clipgrep_home: Path) -> None:
    size = (export_dir / "visual" / "model.onnx").stat().st_size
    with running(FakeHub(REPO, export_dir, drop_after={"visual/model.onnx": size // 3})) as hub:
        result = _add("resumed", hub.url, clipgrep_home, tmp_path / "hf")
        assert result.returncode == 0, result.stderr
        ranges = [r for method, path, r in hub.requests if method == "GET" and path.endswith("visual/model.onnx")]
        assert len(ranges) == 2 and ranges[0] is None
        resumed_at = int(ranges[1].removeprefix("bytes=").removesuffix("-"))
        assert 0 < resumed_at <= size // 3  # the bytes received before the cut were kept
    assert _manifest(clipgrep_home, "resumed")["provenance"]["source_files"]["visual/model.onnx"] == \
        hashlib.sha256((export_dir / "visual" / "model.onnx").read_bytes()).hexdigest()


@pytest.mark.parametrize("name, kind", [("textual/model.onnx", "sha256"), ("visual/preprocess_cfg.json", "git blob")])
def test_file_with_a_wrong_hash_is_refused_with_one_line(export_dir: Path, tmp_path: Path, clipgrep_home: Path,
                                                         name: str, kind: str) -> None:
    with running(FakeHub(REPO, export_dir, corrupt={name})) as hub:
        result = _add("bad", hub.url, clipgrep_home, tmp_path / "hf")
    assert result.returncode == 2
    (line,) = _error_lines(result)
    assert f"downloaded {name} does not match its {kind}" in line
    assert not (clipgrep_home / "models" / "bad").exists()


def test_repo_missing_a_file_is_refused_with_one_line(export_dir: Path, tmp_path: Path, clipgrep_home: Path) -> None:
    with running(FakeHub(REPO, export_dir, hidden={"textual/tokenizer.json"})) as hub:
        result = _add("partial", hub.url, clipgrep_home, tmp_path / "hf")
    assert result.returncode == 2
    (line,) = _error_lines(result)
    assert "has no textual/tokenizer.json" in line


def test_unknown_repo_is_refused_with_one_line(export_dir: Path, tmp_path: Path, clipgrep_home: Path) -> None:
    with running(FakeHub("someone/else", export_dir)) as hub:
        result = _add("nope", hub.url, clipgrep_home, tmp_path / "hf")
    assert result.returncode == 2
    (line,) = _error_lines(result)
    assert "is not on the hub" in line and "models available" in line


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {}])
def test_offline_says_to_use_from_dir(tmp_path: Path, clipgrep_home: Path, env: dict[str, str]) -> None:
    result = _add("off", _closed_port_url(), clipgrep_home, tmp_path / "hf", **env)
    assert result.returncode == 2
    (line,) = _error_lines(result)
    assert f"cannot download {REPO}" in line and "--from DIR" in line


def test_offline_with_a_cached_download_installs_from_the_cache(export_dir: Path, tmp_path: Path,
                                                                clipgrep_home: Path) -> None:
    hf_home = tmp_path / "hf"
    with running(FakeHub(REPO, export_dir)) as hub:
        assert _add("first", hub.url, clipgrep_home, hf_home).returncode == 0
    result = _add("cached", _closed_port_url(), clipgrep_home, hf_home, HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr
    provenance = _manifest(clipgrep_home, "cached")["provenance"]
    assert provenance["revision"] == COMMIT and provenance["hub_hashes_verified"] is False


def test_default_model_is_fetched_and_offline_says_to_use_from_dir(tmp_path: Path, clipgrep_home: Path) -> None:
    """The default model comes from the catalogue's hub repo; offline, one line says what to do instead."""
    from clipgrep.catalogue import DEFAULT

    (tmp_path / "pics").mkdir()
    result = subprocess.run([sys.executable, "-m", "clipgrep", "index", str(tmp_path / "pics")],
                            capture_output=True, text=True, check=False, timeout=120,
                            env={**os.environ, "CLIPGREP_HOME": str(clipgrep_home), "HF_HOME": str(tmp_path / "hf"),
                                 "HF_ENDPOINT": _closed_port_url(), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    (line,) = _error_lines(result)
    # the hint names the model to install, so it can be pasted as it is
    assert f"cannot download {DEFAULT.repo}" in line and f"clipgrep models add {DEFAULT.name} --from DIR" in line


def test_catalogue_name_alone_fetches_its_repo(export_dir: Path, tmp_path: Path, clipgrep_home: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from clipgrep.catalogue import find

    entry = find("vit-b-32-openai")
    assert entry is not None
    with running(FakeHub(entry.repo, export_dir)) as hub:
        result = subprocess.run([sys.executable, "-m", "clipgrep", "models", "add", entry.name],
                                capture_output=True, text=True, check=False, timeout=300,
                                env={**os.environ, "CLIPGREP_HOME": str(clipgrep_home),
                                     "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": hub.url})
    assert result.returncode == 0, result.stderr
    assert _manifest(clipgrep_home, entry.name)["provenance"]["repo"] == entry.repo
