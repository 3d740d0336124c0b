"""The per-machine cache of optimised ONNX graphs: where it lives, and that it never changes a score."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clipgrep.bundle import load_bundle

from .factories import make_contract_bundle


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_contract_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture
def bundle(pristine: Path, tmp_path: Path):
    return load_bundle(shutil.copytree(pristine, tmp_path / "tiny"))


def encode(bundle) -> np.ndarray:
    return bundle.text_encoder().encode(["a red bicycle", "two dogs"])


def entries(clipgrep_home: Path) -> list[Path]:
    return sorted((clipgrep_home / "cache" / "onnx").iterdir())


def test_the_cache_is_in_the_platform_cache_dir_not_with_the_data(bundle, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLIPGREP_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    encode(bundle)
    assert len(list((tmp_path / "cache" / "clipgrep" / "onnx").iterdir())) == 1
    assert not (tmp_path / "data").exists()


def test_a_tampered_cache_is_rebuilt_not_used(bundle, clipgrep_home: Path) -> None:
    first = encode(bundle)
    (entry,) = entries(clipgrep_home)
    weights = entry / "model.onnx.data"
    before = weights.stat()
    data = bytearray(weights.read_bytes())
    data[len(data) // 2: len(data) // 2 + 4096] = bytes(4096)  # same size, and the mtime is put back
    weights.write_bytes(data)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    np.testing.assert_array_equal(encode(bundle), first)
    assert weights.read_bytes() != bytes(data)  # rebuilt


def test_a_build_killed_mid_way_leaves_no_temporary_files(bundle, clipgrep_home: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)
    abandoned = clipgrep_home / "cache" / "onnx" / f".tmp-{int(dead.stdout)}-x1y2"
    abandoned.mkdir(parents=True)
    (abandoned / "model.onnx").write_bytes(b"half written")
    first = encode(bundle)
    assert [p.name.startswith(".tmp-") for p in entries(clipgrep_home)] == [False]
    np.testing.assert_array_equal(encode(bundle), first)


def test_ctrl_c_during_a_build_leaves_no_temporary_files(bundle, clipgrep_home: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    real = ort.InferenceSession

    def interrupted(path, sess_options=None, **kwargs):
        if sess_options is not None and sess_options.optimized_model_filepath:
            Path(sess_options.optimized_model_filepath).write_bytes(b"half written")
            raise KeyboardInterrupt
        return real(path, sess_options=sess_options, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", interrupted)
    with pytest.raises(KeyboardInterrupt):
        encode(bundle)
    assert entries(clipgrep_home) == []


def test_without_a_writable_cache_encoding_still_works(bundle, clipgrep_home: Path) -> None:
    (clipgrep_home / "cache").write_text("a file where the cache dir should be")
    first = encode(bundle)
    assert first.shape == (2, 8)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1, rtol=1e-5)
