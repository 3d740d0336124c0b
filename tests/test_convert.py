"""open_clip -> bundle conversion: parity per architecture, the gate, every source kind."""
from __future__ import annotations

import copy
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clipgrep.bundle import Bundle
from clipgrep.convert.parity import THRESHOLDS
from clipgrep.errors import ConversionError

from .convert_support import TINY_ARCH, register_tiny_arch, require_open_clip, tiny_model

pytestmark = pytest.mark.convert

# Parity is checked on inputs the export gate never saw: another image seed and other strings.
TEST_TEXTS = [
    "a dog running on the beach", "A RED CAR", "l'été à Paris", "ein Hund im Schnee", "犬と猫",
    "🚲 at night 🌙", "&quot;quoted&quot; &amp; escaped", "tab\tseparated\ttext", "x" * 200,
    "an aerial photograph of a coastal town with white houses, blue doors, narrow streets, " * 3,
]


def _reference(loaded: Any, images: dict[str, bytes], texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import torch
    import torch.nn.functional as F
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    transform = image_transform_v2(PreprocessCfg(**loaded.preprocess), is_train=False)
    pixels = torch.stack([transform(Image.open(io.BytesIO(b))) for b in images.values()])
    ids = loaded.tokenizer(texts)
    with torch.no_grad():
        image = F.normalize(loaded.model.encode_image(pixels), dim=-1).numpy()
        text = F.normalize(loaded.model.encode_text(ids), dim=-1).numpy()
    return image, text, ids.numpy()


def _build(arch: str, workdir: Path) -> dict[str, Any]:
    from clipgrep.convert.pipeline import assemble_bundle, export_onnx
    from clipgrep.convert.source import ModelSource, load_model

    loaded = load_model(ModelSource(arch, random_init=True))
    towers = export_onnx(loaded, workdir)
    bundles = {p: assemble_bundle(loaded, towers, workdir / p, name=f"t-{p}", precision=p) for p in THRESHOLDS}
    return {"loaded": loaded, "towers": towers, **bundles}


@pytest.fixture(scope="module", params=["ViT-B-32", "MobileCLIP-S1"])
def converted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require_open_clip()
    return {"arch": request.param, **_build(request.param, tmp_path_factory.mktemp(request.param))}


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_bundle_embeds_like_open_clip(converted: dict[str, Any], precision: str) -> None:
    from clipgrep.convert.parity_samples import SAMPLE_TEXTS, sample_images

    bundle: Bundle = converted[precision]
    images = sample_images(seed=1)
    texts = SAMPLE_TEXTS + TEST_TEXTS
    ref_image, ref_text, ref_ids = _reference(converted["loaded"], images, texts)
    text_encoder = bundle.text_encoder()
    assert np.array_equal(text_encoder.tokenize(texts), ref_ids)
    image_cos = np.sum(bundle.image_encoder(draft=False).encode_files(io.BytesIO(b) for b in images.values())
                       * ref_image, axis=1)
    text_cos = np.sum(text_encoder.encode(texts) * ref_text, axis=1)
    print(f"\n{converted['arch']} {precision}: image cos min {image_cos.min():.6f} mean {image_cos.mean():.6f}"
          f" (n={len(image_cos)}); text cos min {text_cos.min():.6f} mean {text_cos.mean():.6f} (n={len(text_cos)})")
    assert len(texts) >= 50 and len(images) >= 10
    assert image_cos.min() >= THRESHOLDS[precision]
    assert text_cos.min() >= THRESHOLDS[precision]


def test_manifest_records_parity_provenance_and_sizes(converted: dict[str, Any]) -> None:
    fp32, int8 = converted["fp32"], converted["int8"]
    for bundle in (fp32, int8):
        parity = bundle.manifest["parity"]
        assert parity["token_ids_identical"] is True
        assert parity["image"]["min_cos"] >= THRESHOLDS[bundle.precision]
        assert parity["image_jpeg_draft"]["n"] >= 3
        assert bundle.manifest["provenance"]["arch"] == converted["arch"]
        assert bundle.manifest["provenance"]["weights"] == "random init"
    assert fp32.bundle_id != int8.bundle_id
    assert int8.size_bytes() < 0.45 * fp32.size_bytes()
    assert fp32.manifest["preprocess"] == int8.manifest["preprocess"]


def test_int8_quantizes_by_rule_matmul_and_gather_never_conv(converted: dict[str, Any]) -> None:
    """One rule, not a timing race: the same model always gets the same int8 graph (imported ones too)."""
    from clipgrep.convert.dynamic_int8 import op_types

    int8 = converted["int8"]
    for modality, choice in int8.manifest["quantization"].items():
        assert choice["chosen"] == "matmul" and "Conv" not in choice["op_types"], modality
    image_ops = op_types(int8.file(int8.image.file))
    assert "MatMulInteger" in image_ops and "ConvInteger" not in image_ops
    assert "Conv" in image_ops  # the patch embedding stays fp32
    assert "DequantizeLinear" in op_types(int8.file(int8.text.file))  # the token table is uint8


def test_preprocessing_is_copied_from_open_clip(converted: dict[str, Any]) -> None:
    open_clip = require_open_clip()
    expected = open_clip.get_model_preprocess_cfg(converted["loaded"].model)
    manifest = converted["fp32"].manifest["preprocess"]
    size = expected["size"] if isinstance(expected["size"], (list, tuple)) else [expected["size"]] * 2
    assert manifest["size"] == list(size)
    assert manifest["mean"] == pytest.approx(list(expected["mean"]))
    assert manifest["interpolation"] == expected["interpolation"]


# --- every kind of source, on a tiny architecture -------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return register_tiny_arch(tmp_path_factory.mktemp("arch"))


def _embed_with_model(model: Any, texts: list[str]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    open_clip = require_open_clip()
    with torch.no_grad():
        return F.normalize(model.encode_text(open_clip.get_tokenizer(TINY_ARCH)(texts)), dim=-1).numpy()


def test_broken_model_fails_the_gate_and_writes_nothing(tiny: str, tmp_path: Path) -> None:
    import torch

    from clipgrep.convert.pipeline import assemble_bundle, export_onnx
    from clipgrep.convert.source import ModelSource, load_model

    loaded = load_model(ModelSource(tiny, random_init=True))
    towers = export_onnx(loaded, tmp_path)
    broken = copy.copy(loaded)
    broken.model = copy.deepcopy(loaded.model)
    with torch.no_grad():
        broken.model.visual.proj.add_(torch.randn_like(broken.model.visual.proj))
    with pytest.raises(ConversionError, match="image embeddings differ"):
        assemble_bundle(broken, towers, tmp_path / "bad", name="bad", precision="fp32")
    assert not (tmp_path / "bad").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".bad")] == []
    assemble_bundle(loaded, towers, tmp_path / "good", name="good", precision="fp32")  # the same towers pass


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_file_converts_to_the_same_model(tiny: str, tmp_path: Path, suffix: str) -> None:
    import torch
    from safetensors.torch import save_file

    from clipgrep.models import add_model

    model = tiny_model(seed=3)
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    bundle = add_model("from-file", arch=tiny, checkpoint=path, precision="fp32")
    texts = ["a red bicycle", "two cats"]
    np.testing.assert_allclose(bundle.text_encoder().encode(texts), _embed_with_model(model, texts), atol=1e-5)
    assert bundle.manifest["provenance"]["weights"] == f"checkpoint {path.name}"


def test_local_dir_checkpoint_needs_no_arch(tiny: str, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from clipgrep.convert.tokenizer_export import write_clip_tokenizer  # noqa: F401 (import check only)
    from clipgrep.models import add_model
    from tests.convert_support import TINY_CONFIG

    model = tiny_model(seed=4)
    local = tmp_path / "student"
    local.mkdir()
    preprocess = {"size": 64, "mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5],
                  "interpolation": "bilinear", "resize_mode": "squash"}
    (local / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CONFIG, "preprocess_cfg": preprocess}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, local / "open_clip_model.safetensors")
    bundle = add_model("student", checkpoint=local, precision="fp32")
    assert bundle.manifest["preprocess"]["resize_mode"] == "squash"
    assert bundle.manifest["preprocess"]["mean"] == pytest.approx([0.1, 0.2, 0.3])
    np.testing.assert_allclose(bundle.text_encoder().encode(["hello"]), _embed_with_model(model, ["hello"]), atol=1e-5)


def test_bundle_directory_installs_by_copy(tiny: str, tmp_path: Path) -> None:
    from clipgrep.models import add_model, list_models

    first = add_model("first", arch=tiny, random_init=True, precision="fp32")
    outside = tmp_path / "shared-bundle"
    shutil.copytree(first.path, outside)
    second = add_model("second", checkpoint=outside)
    assert second.name == "second" and second.bundle_id == first.bundle_id
    assert json.loads((outside / "manifest.json").read_text())["name"] == "first"  # source untouched
    assert [e.name for e in list_models()] == ["first", "second"]


def test_tampered_bundle_directory_is_not_installed(tiny: str, tmp_path: Path) -> None:
    from clipgrep.errors import BundleError
    from clipgrep.models import add_model, list_models

    first = add_model("orig", arch=tiny, random_init=True, precision="fp32")
    outside = tmp_path / "tampered"
    shutil.copytree(first.path, outside)
    with open(outside / "text.onnx", "ab") as f:
        f.write(b"x")
    with pytest.raises(BundleError):
        add_model("copy", checkpoint=outside)
    assert [e.name for e in list_models()] == ["orig"]


def test_pretrained_download_failure_says_how_to_use_a_local_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    from clipgrep.models import add_model

    DEFAULT_ARCH, DEFAULT_PRETRAINED = "ViT-B-32", "laion2b_s34b_b79k"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConversionError) as info:
        add_model("b32", arch=DEFAULT_ARCH, pretrained=DEFAULT_PRETRAINED)
    message = str(info.value)
    assert f"cannot download {DEFAULT_ARCH} weights ({DEFAULT_PRETRAINED}) from the Hugging Face hub" in message
    assert f"clipgrep models add NAME --arch {DEFAULT_ARCH} --pretrained {DEFAULT_PRETRAINED} --checkpoint FILE" \
        in info.value.hint
    assert "huggingface.co/laion/" in info.value.hint


@pytest.mark.parametrize("kwargs, message", [
    ({"arch": "ViT-Q-99", "random_init": True}, "no architecture 'ViT-Q-99'"),
    ({"arch": "ViT-B-32", "pretrained": "nope"}, "no pretrained tag 'nope'"),
    ({"arch": "ViT-B-32"}, "no weights given"),
    ({"arch": "ViT-B-32", "checkpoint": "/does/not/exist.pt"}, "does not exist"),
])
def test_bad_sources_fail_with_one_clear_error(kwargs: dict, message: str) -> None:
    from clipgrep.models import add_model, list_models

    require_open_clip()
    with pytest.raises(ConversionError, match=message):
        add_model("x", **kwargs)
    assert list_models() == []
