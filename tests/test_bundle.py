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


# --- hostile manifests: always a BundleError, never another exception ------------------------------


def test_a_deeply_nested_manifest_is_refused(bundle_dir: Path) -> None:
    edit_manifest(bundle_dir, provenance=json.loads("[" * 50 + "]" * 50))  # parses, but is no manifest
    with pytest.raises(BundleError, match="nested more than 16 levels"):
        load_bundle(bundle_dir)
    (bundle_dir / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)  # a RecursionError before
    with pytest.raises(BundleError, match="nested too deeply"):
        load_bundle(bundle_dir)


def test_a_huge_manifest_is_refused_without_reading_it(bundle_dir: Path) -> None:
    with open(bundle_dir / MANIFEST, "ab") as f:
        f.truncate(1 << 30)  # 1 GB, sparse: cost 2 GB of RAM in `models list` before
    with pytest.raises(BundleError, match="larger than 1024 KiB"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("path, value", [
    (("encoders",), []),
    (("encoders", "image"), "image.onnx"),
    (("encoders", "text", "extra"), 1),
    (("encoders", "text", "input"), 5),
    (("tokenizer",), "clip-bpe"),
    (("tokenizer", "context_length"), "77"),
    (("tokenizer", "kind"), ["clip-bpe"]),
    (("files",), ["image.onnx"]),
    (("files", "image.onnx"), "abc"),
    (("files", "image.onnx", "bytes"), "10"),
    (("files", "image.onnx", "sha256"), None),
    (("preprocess",), None),
    (("preprocess", "size"), "32"),
    (("preprocess", "size"), [32, True]),
    (("preprocess", "mean"), {"r": 1}),
    (("preprocess", "interpolation"), 3),
    (("embed_dim",), "8"),
    (("embed_dim",), True),
    (("bundle_id",), "../../escape"),
    (("name",), {"x": 1}),
    (("provenance",), ["arch"]),
    (("params",), {"image": "1M", "text": 2}),
    (("parity",), {"image": {"min_cos": "high", "mean_cos": 1, "n": 3}}),
    (("quantization",), {"image": {"chosen": "x", "ms_per_item": {"a": "fast"}}}),
    # fields of imported exports (clipgrep.imports)
    (("encoders", "text", "input_dtype"), "complex1024"),
    (("encoders", "text", "batch"), "1"),
    (("encoders", "text", "batch"), 0),
    (("encoders", "text", "mask_input"), 3),
    (("tokenizer", "pad_id"), "0"),
    (("tokenizer", "special_texts"), ["<s>"]),
    (("tokenizer", "kind"), "hf-tokenizers"),  # without its pad_token
    (("provenance",), {"repo": ["immich-app/x"]}),
    (("provenance",), {"source_files": ["config.json"]}),
    (("parity",), {"token_reference": 1}),
    (("quantization",), {"image": {"chosen": "x", "ms_per_item": {}, "reused_from": 3}}),
])
def test_wrong_json_types_are_refused_with_the_field_named(bundle_dir: Path, path: tuple[str, ...],
                                                           value: object) -> None:
    """These raised AttributeError, TypeError or KeyError (an "internal error") in models list/info."""
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="manifest field|unknown|unsupported|no hash") as info:
        load_bundle(bundle_dir)
    assert path[0] in info.value.message or "hash" in info.value.message


def test_preprocess_values_the_runtime_cannot_use_are_a_bundle_error(bundle_dir: Path) -> None:
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    fields = {k: manifest[k] for k in ("name", "embed_dim", "precision", "preprocess", "tokenizer", "encoders")}
    write_manifest(bundle_dir, {**fields, "preprocess": {**fields["preprocess"], "interpolation": "sinc"}})
    with pytest.raises(BundleError, match="bad preprocess config: unknown interpolation 'sinc'"):
        load_bundle(bundle_dir).image_encoder()


# --- files the manifest does not hash: external ONNX weights, links ---------------------------------


def move_weights_outside(bundle_dir: Path, location: str) -> None:
    """Re-save image.onnx with its weights in a side file ``location`` (as models over 2 GB must be)."""
    import onnx

    model = onnx.load(str(bundle_dir / "image.onnx"))
    onnx.save(model, str(bundle_dir / "image.onnx"), save_as_external_data=True, location=location,
              size_threshold=0)


def rewrite_manifest(bundle_dir: Path) -> None:
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    write_manifest(bundle_dir, {k: manifest[k] for k in ("name", "embed_dim", "precision", "preprocess",
                                                        "tokenizer", "encoders")})


def rehash_by_hand(bundle_dir: Path, name: str) -> None:
    """Update the manifest's hash of ``name`` as a hand-made (or older writer's) bundle would."""
    from clipgrep.bundle import compute_bundle_id, sha256_file

    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    manifest["files"][name] = {"sha256": sha256_file(bundle_dir / name), "bytes": (bundle_dir / name).stat().st_size}
    manifest["bundle_id"] = compute_bundle_id(manifest)
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest))


def test_external_weights_the_manifest_hashes_are_verified(bundle_dir: Path, tmp_path: Path) -> None:
    move_weights_outside(bundle_dir, "image.weights")
    rewrite_manifest(bundle_dir)
    bundle = load_bundle(bundle_dir, verify="full")
    assert "image.weights" in bundle.manifest["files"]
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(image)
    assert bundle.image_encoder().encode_files([image]).shape == (1, 8)
    weights = bundle_dir / "image.weights"
    weights.write_bytes(bytes(reversed(weights.read_bytes())))  # swapped: same size, other weights
    with pytest.raises(BundleError, match="image.weights does not match its sha256"):
        load_bundle(bundle_dir, verify="full")


def test_external_weights_the_manifest_does_not_hash_are_refused(bundle_dir: Path) -> None:
    """Before: the manifest hashed image.onnx, which names the side file; the file itself could be swapped."""
    move_weights_outside(bundle_dir, "image.weights")
    rehash_by_hand(bundle_dir, "image.onnx")
    with pytest.raises(BundleError, match="image.onnx loads weights from 'image.weights', which the manifest "
                                          "does not hash"):
        load_bundle(bundle_dir, verify="full")


def test_a_malformed_onnx_file_is_a_bundle_error(bundle_dir: Path) -> None:
    (bundle_dir / "image.onnx").write_bytes(b"\x0a\xff\xff\xff\xff\x0f")  # a field longer than the file
    rehash_by_hand(bundle_dir, "image.onnx")
    with pytest.raises(BundleError, match="not a readable ONNX file"):
        load_bundle(bundle_dir, verify="full")


def test_bundle_files_must_be_regular_files(bundle_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.onnx"
    shutil.move(bundle_dir / "text.onnx", outside)
    (bundle_dir / "text.onnx").symlink_to(outside)
    with pytest.raises(BundleError, match="text.onnx is not a regular file"):
        load_bundle(bundle_dir)
