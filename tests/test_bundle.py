"""Bundle validation: the contract between conversion and runtime."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipgrep.bundle import FORMAT_VERSION, MANIFEST, load_bundle, write_manifest
from clipgrep.errors import BundleError

from .factories import make_contract_bundle


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_contract_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture
def bundle_dir(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "tiny"
    shutil.copytree(pristine, copy, ignore=shutil.ignore_patterns(".verified.json"))
    return copy


def edit_manifest(directory: Path, **changes) -> None:
    path = directory / MANIFEST
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def test_valid_bundle_loads_with_its_fields(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir, verify="full")
    assert bundle.name == "tiny"
    assert bundle.embed_dim == 8
    assert len(bundle.bundle_id) == 16
    assert bundle.text.input == "input_ids"
    assert bundle.size_bytes() == sum((bundle_dir / f).stat().st_size for f in bundle.manifest["files"])


def test_missing_file_is_refused(bundle_dir: Path) -> None:
    (bundle_dir / "text.onnx").unlink()
    with pytest.raises(BundleError, match="missing text.onnx"):
        load_bundle(bundle_dir)


def test_modified_file_is_refused_even_with_cached_verification(bundle_dir: Path) -> None:
    load_bundle(bundle_dir)  # leaves a verification stamp
    path = bundle_dir / "image.onnx"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    stat = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    with pytest.raises(BundleError, match="does not match its sha256"):
        load_bundle(bundle_dir)


def test_same_size_tamper_detected_by_full_verification(bundle_dir: Path) -> None:
    load_bundle(bundle_dir)
    path = bundle_dir / "bpe_simple_vocab_16e6.txt.gz"
    stat = path.stat()
    text = path.read_bytes()
    path.write_bytes(text[:-2] + b"  ")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: only a re-hash sees it
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(bundle_dir, verify="full")


def test_newer_format_version_asks_for_upgrade(bundle_dir: Path) -> None:
    edit_manifest(bundle_dir, format_version=FORMAT_VERSION + 1)
    with pytest.raises(BundleError, match="newer than this clipgrep supports") as info:
        load_bundle(bundle_dir)
    assert "pip install -U clipgrep" in info.value.hint


@pytest.mark.parametrize("changes, message", [
    ({"format": "something-else"}, "not a clipgrep bundle"),
    ({"format_version": "1"}, "no integer format_version"),
    ({"precision": "fp16"}, "unknown precision"),
    ({"embed_dim": None, "encoders": None}, None),
])
def test_bad_manifest_fields_are_refused(bundle_dir: Path, changes: dict, message: str | None) -> None:
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    for key, value in changes.items():
        if value is None:
            del manifest[key]
        else:
            manifest[key] = value
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message or "lacks"):
        load_bundle(bundle_dir)


def test_editing_preprocessing_without_rehashing_breaks_the_bundle_id(bundle_dir: Path) -> None:
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    edit_manifest(bundle_dir, preprocess={**manifest["preprocess"], "mean": [0.1, 0.1, 0.1]})
    with pytest.raises(BundleError, match="inconsistent bundle_id"):
        load_bundle(bundle_dir)


def test_file_outside_the_bundle_is_refused(bundle_dir: Path) -> None:
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    manifest["files"]["../escape"] = {"sha256": "0" * 64, "bytes": 1}
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle(bundle_dir)


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a clipgrep bundle"):
        load_bundle(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="cannot read"):
        load_bundle(tmp_path)


def test_bundle_id_tracks_what_changes_vectors(bundle_dir: Path) -> None:
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    original = manifest["bundle_id"]
    fields = {k: manifest[k] for k in ("name", "embed_dim", "precision", "preprocess", "tokenizer", "encoders")}
    assert write_manifest(bundle_dir, {**fields, "name": "renamed"})["bundle_id"] == original
    changed = write_manifest(bundle_dir, {**fields, "preprocess": {**fields["preprocess"], "mean": [0, 0, 0]}})
    assert changed["bundle_id"] != original


def test_preprocessing_comes_from_the_manifest(bundle_dir: Path, tmp_path: Path) -> None:
    """Editing mean in the manifest (and re-hashing) changes the pixels the runtime produces."""
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (200, 100, 50)).save(image)
    before = load_bundle(bundle_dir).image_encoder().load(image)
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    fields = {k: manifest[k] for k in ("name", "embed_dim", "precision", "preprocess", "tokenizer", "encoders")}
    write_manifest(bundle_dir, {**fields, "preprocess": {**fields["preprocess"], "mean": [0, 0, 0]}})
    after = load_bundle(bundle_dir).image_encoder().load(image)
    assert before.shape == after.shape == (3, 32, 32)
    np.testing.assert_allclose(after - before, 0.5 / 0.25, rtol=1e-5)


def test_encoders_return_unit_vectors(bundle_dir: Path, tmp_path: Path) -> None:
    bundle = load_bundle(bundle_dir)
    texts = bundle.text_encoder().encode(["a red bicycle", "", "東京"])
    paths = []
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0)]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (64, 48), colour).save(paths[-1])
    images = bundle.image_encoder().encode_files(paths)
    for vectors, n in ((texts, 3), (images, 2)):
        assert vectors.shape == (n, 8) and vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, rtol=1e-5)
    assert not np.allclose(images[0], images[1])


def test_text_sessions_load_from_a_per_machine_optimised_cache(bundle_dir: Path, clipgrep_home: Path) -> None:
    bundle = load_bundle(bundle_dir)
    first = bundle.text_encoder().encode(["a red bicycle"])
    entries = list((clipgrep_home / "cache" / "onnx").iterdir())
    assert len(entries) == 1 and (entries[0] / "model.onnx").is_file()
    np.testing.assert_array_equal(bundle.text_encoder().encode(["a red bicycle"]), first)
    (entries[0] / "model.onnx").write_bytes(b"damaged")
    np.testing.assert_array_equal(bundle.text_encoder().encode(["a red bicycle"]), first)  # rebuilt
    assert (entries[0] / "model.onnx").stat().st_size > 100
