"""Importing published ONNX exports (Immich's layout) into bundles, torch-free.

The exports are built here from tiny random open_clip models (the convert
extra); the import itself must not need torch, and its bundles must embed like
open_clip: fp32 >= 0.9999, int8 >= 0.995.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clipgrep.convert.parity_samples import SAMPLE_TEXTS, sample_images
from clipgrep.errors import ClipgrepError

from .convert_support import TINY_CONFIG, register_tiny_arch, require_open_clip, tiny_model
from .export_support import TinyMClipText, write_mclip_export, write_openclip_export

pytestmark = pytest.mark.convert
pytest.importorskip("tokenizers")

# Strings open_clip cleans the way Immich's whitespace cleaning and the HF CLIP normaliser do
# (no mojibake, HTML entities or ftfy fixes), so their ids must be identical.
PLAIN_TEXTS = [t for t in SAMPLE_TEXTS if t.isascii() and "&" not in t and "<" not in t and "\x1b" not in t]
MULTILINGUAL = ["chat noir sur un canapé", "黒い猫", "un perro en la playa", "Hund im Schnee", "red car"]
THRESHOLD = {"fp32": 0.9999, "int8": 0.995}


def _default_cfg(model: Any) -> dict[str, Any]:
    open_clip = require_open_clip()
    return dict(open_clip.get_model_preprocess_cfg(model))


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    register_tiny_arch(tmp_path_factory.mktemp("arch"))
    model = tiny_model(seed=0)
    root = write_openclip_export(model, TINY_CONFIG, _default_cfg(model), tmp_path_factory.mktemp("export") / "x")
    return {"model": model, "root": root, "cfg": _default_cfg(model)}


def _open_clip_embeddings(model: Any, cfg: dict[str, Any], texts: list[str]) -> tuple[np.ndarray, np.ndarray, Any]:
    import torch
    import torch.nn.functional as F

    open_clip = require_open_clip()
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    transform = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    pixels = []
    for data in sample_images().values():
        with Image.open(io.BytesIO(data)) as im:
            pixels.append(transform(im))
    ids = open_clip.get_tokenizer("ViT-B-32")(texts)
    with torch.no_grad():
        image = F.normalize(model.encode_image(torch.stack(pixels)), dim=-1).numpy()
        text = F.normalize(model.encode_text(ids), dim=-1).numpy()
    return image, text, ids.numpy()


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_immich_export_embeds_like_open_clip(tiny_export: dict[str, Any], precision: str) -> None:
    from clipgrep.models import add_model

    bundle = add_model(f"imm-{precision}", from_source=str(tiny_export["root"]), precision=precision)
    # A CLIP BPE tokenizer.json runs on clipgrep's own tokenizer, so every string matches open_clip.
    assert bundle.manifest["tokenizer"]["kind"] == "clip-bpe"
    # Literal special tokens are open_clip's spelling (<end_of_text>) there, HF's (<|endoftext|>) here.
    texts = [t for t in SAMPLE_TEXTS + MULTILINGUAL if "_of_text>" not in t]
    image_ref, text_ref, ids_ref = _open_clip_embeddings(tiny_export["model"], tiny_export["cfg"], texts)
    images = bundle.image_encoder(draft=False).encode_files(io.BytesIO(d) for d in sample_images().values())
    assert _cos(images, image_ref).min() >= THRESHOLD[precision]
    assert _cos(bundle.text_encoder().encode(texts), text_ref).min() >= THRESHOLD[precision]
    # Token ids: open_clip pads with 0, Immich's exports with the pad token (<|endoftext|>); the
    # causal text tower never looks past the first end-of-text, so only the padding differs.
    ours = bundle.text_encoder().tokenize(texts)
    real = ids_ref != 0
    assert np.array_equal(ours[real], ids_ref[real])
    assert (ours[~real] == 49407).all()
    parity = bundle.manifest["parity"]
    assert parity["token_ids_identical"] and parity["token_strings"] >= 50
    assert parity["image"]["min_cos"] >= THRESHOLD[precision] and parity["text"]["min_cos"] >= THRESHOLD[precision]
    assert bundle.manifest["encoders"]["text"] == {"file": "text.onnx", "input": "text", "output": "embedding",
                                                   "input_dtype": "int32", "batch": 1}
    # The export's image graph is traced at batch 1; the bundle's takes a batch again (the images
    # above were encoded in one run of it), rewritten and checked at import.
    assert "batch" not in bundle.manifest["encoders"]["image"]
    assert bundle.manifest["provenance"]["image_batch"].startswith("dynamic")
    assert not list(bundle.path.glob("image-batched*"))


# Other open_clip image towers Immich publishes: ModifiedResNet (RN50...: attention pooling through
# F.multi_head_attention_forward) and ViTs with an attentional pooler or average pooling.
OTHER_TOWERS = {
    "rn": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16},
    "vit-attn-pool": {"image_size": 64, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32,
                      "attentional_pool": True, "attn_pooler_queries": 4, "attn_pooler_heads": 2},
    "vit-avg-pool": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32,
                     "no_ln_pre": True, "pool_type": "avg", "final_ln_after_pool": True},
}


@pytest.mark.parametrize("tower", sorted(OTHER_TOWERS))
def test_other_traced_image_towers_get_a_batch_axis(tower: str, tmp_path: Path) -> None:
    import onnxruntime as ort
    import torch

    from clipgrep.convert.dynamic_int8 import read_model
    from clipgrep.imports.batching import make_batch_dynamic

    from .convert_support import register_arch
    from .export_support import write_visual

    open_clip = require_open_clip()
    name = register_arch(f"clipgrep-tiny-{tower}", {**TINY_CONFIG, "vision_cfg": OTHER_TOWERS[tower]}, tmp_path)
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None).eval()
    write_visual(model, _default_cfg(model), tmp_path / "export")
    path = tmp_path / "export" / "visual" / "model.onnx"
    pixels = np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32)

    result = make_batch_dynamic(read_model(path), {"image": pixels[:1]})

    assert result.reason == "dynamic"
    original = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rows = np.concatenate([original.run(None, {"image": pixels[i:i + 1]})[0] for i in range(4)])
    batched = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(batched.run(None, {"image": pixels})[0], rows, rtol=1e-4, atol=1e-5)


def test_an_image_graph_that_cannot_take_a_batch_runs_row_by_row(tiny_export: dict[str, Any],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from clipgrep.imports import batching
    from clipgrep.models import add_model

    monkeypatch.setattr(batching, "TOLERANCE", -1.0)  # no rewrite passes its check
    bundle = add_model("rows", from_source=str(tiny_export["root"]))
    assert bundle.manifest["encoders"]["image"]["batch"] == 1
    assert bundle.manifest["provenance"]["image_batch"].startswith("batch 1: ")
    image_ref, _, _ = _open_clip_embeddings(tiny_export["model"], tiny_export["cfg"], ["x"])
    images = bundle.image_encoder(draft=False).encode_files(io.BytesIO(d) for d in sample_images().values())
    assert _cos(images, image_ref).min() >= THRESHOLD["int8"]


def test_an_export_with_external_weights_gets_its_batch_axis(tiny_export: dict[str, Any], tmp_path: Path) -> None:
    import onnx

    from clipgrep.models import add_model

    root = tmp_path / "external"
    shutil.copytree(tiny_export["root"], root)
    visual = root / "visual" / "model.onnx"
    onnx.save_model(onnx.load(str(visual)), str(visual), save_as_external_data=True, location="model.onnx_data",
                    size_threshold=0)
    bundle = add_model("ext", from_source=str(root), precision="fp32")
    assert "batch" not in bundle.manifest["encoders"]["image"]
    assert sorted(p.name for p in bundle.path.glob("image*")) == ["image.onnx", "image.onnx.data"]
    image_ref, _, _ = _open_clip_embeddings(tiny_export["model"], tiny_export["cfg"], ["x"])
    images = bundle.image_encoder(draft=False).encode_files(io.BytesIO(d) for d in sample_images().values())
    assert _cos(images, image_ref).min() >= THRESHOLD["fp32"]


def test_clip_tokenizer_json_that_disagrees_runs_through_tokenizers(tiny_export: dict[str, Any],
                                                                     tmp_path: Path) -> None:
    """A CLIP-like tokenizer.json whose ids differ from clipgrep's CLIP tokenizer is run as it is."""

    from clipgrep.models import add_model

    root = tmp_path / "edited"
    shutil.copytree(tiny_export["root"], root)
    path = root / "textual" / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    vocab["dog</w>"], vocab["cat</w>"] = vocab["cat</w>"], vocab["dog</w>"]
    path.write_text(json.dumps(data))
    bundle = add_model("edited", from_source=str(root), precision="fp32")
    assert bundle.manifest["tokenizer"]["kind"] == "hf-tokenizers"
    cat, dog = bundle.text_encoder().tokenize(["cat", "dog"])[:, 1]
    assert (cat, dog) == (vocab["cat</w>"], vocab["dog</w>"])
    assert bundle.manifest["parity"]["token_ids_identical"]


def test_manifest_records_source_and_every_file_hash(tiny_export: dict[str, Any]) -> None:
    import hashlib

    from clipgrep.models import add_model

    bundle = add_model("imm", from_source=str(tiny_export["root"]))
    provenance = bundle.manifest["provenance"]
    root = tiny_export["root"]
    expected = {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in root.rglob("*") if p.is_file()}
    assert provenance["source_files"] == expected
    assert provenance["source"] == str(root) and provenance["layout"] == "immich"
    assert set(bundle.manifest["quantization"]) == {"image", "text"}


def test_import_runs_without_torch(tiny_export: dict[str, Any], tmp_path: Path) -> None:
    """The whole import (read, quantise, gate, install) with torch and open_clip made unimportable."""
    script = (
        "import sys\n"
        "for m in ('torch', 'torchvision', 'open_clip'): sys.modules[m] = None\n"
        "from clipgrep.models import add_model\n"
        f"b = add_model('nt', from_source={str(tiny_export['root'])!r})\n"
        "print(b.manifest['parity']['image']['min_cos'])\n"
        "assert not any(m in sys.modules and sys.modules[m] for m in ('torch', 'open_clip'))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=False, env={**os.environ, "CLIPGREP_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip()) >= 0.995


@pytest.mark.parametrize("resize_mode", ["squash", "longest"])
def test_preprocess_cfg_is_honoured(tiny_export: dict[str, Any], tmp_path: Path, resize_mode: str) -> None:
    from clipgrep.models import add_model

    model = tiny_export["model"]
    cfg = {**tiny_export["cfg"], "mean": [0.5, 0.25, 0.1], "std": [0.2, 0.3, 0.4], "resize_mode": resize_mode,
           "interpolation": "bilinear", "fill_color": 128}
    root = write_openclip_export(model, TINY_CONFIG, cfg, tmp_path / "export")
    bundle = add_model("odd", from_source=str(root), precision="fp32")
    image_ref, _, _ = _open_clip_embeddings(model, cfg, ["x"])
    images = bundle.image_encoder(draft=False).encode_files(io.BytesIO(d) for d in sample_images().values())
    assert _cos(images, image_ref).min() >= 0.9999
    stored = bundle.manifest["preprocess"]
    assert (stored["mean"], stored["std"], stored["resize_mode"]) == (cfg["mean"], cfg["std"], resize_mode)
    # The default-cfg export embeds these images differently: the cfg was really used.
    default = _open_clip_embeddings(model, tiny_export["cfg"], ["x"])[0]
    assert _cos(images, default).min() < 0.999


@pytest.fixture(scope="module")
def mclip_export(tiny_export: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    text = TinyMClipText(vocab=4000, dim=TINY_CONFIG["embed_dim"])
    words = " ".join(MULTILINGUAL + PLAIN_TEXTS).split()
    root = write_mclip_export(tiny_export["model"], TINY_CONFIG, tiny_export["cfg"], text, words,
                              tmp_path_factory.mktemp("mclip") / "XLM-Roberta-Tiny")
    return {"root": root, "text": text}


def _immich_reference_ids(root: Path, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """What Immich's MClipTextualEncoder feeds its graph, written out from its source."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(root / "textual" / "tokenizer.json"))
    pad = json.loads((root / "textual" / "tokenizer_config.json").read_text())["pad_token"]
    tok.enable_padding(length=77, pad_token=pad, pad_id=tok.token_to_id(pad))
    tok.enable_truncation(max_length=77)
    encodings = [tok.encode(" ".join(t.split())) for t in texts]
    return np.array([e.ids for e in encodings]), np.array([e.attention_mask for e in encodings])


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_mclip_export_with_sentencepiece_tokenizer(mclip_export: dict[str, Any], precision: str) -> None:
    from clipgrep.models import add_model

    bundle = add_model(f"mclip-{precision}", from_source=str(mclip_export["root"]), precision=precision)
    texts = MULTILINGUAL + SAMPLE_TEXTS
    ids, mask = _immich_reference_ids(mclip_export["root"], texts)
    encoder = bundle.text_encoder()
    assert np.array_equal(encoder.tokenize(texts), ids)
    assert ids[0, 0] == 0 and (ids[0][mask[0] == 0] == 1).all()  # <s> first, <pad> (id 1) after the text
    reference = mclip_export["text"](ids, mask).numpy()
    assert _cos(encoder.encode(texts), reference).min() >= THRESHOLD[precision]
    spec = bundle.manifest["encoders"]["text"]
    assert (spec["input"], spec["mask_input"], spec["input_dtype"]) == ("input_ids", "attention_mask", "int32")


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_text_only_swap_reuses_the_index(tiny_export: dict[str, Any], mclip_export: dict[str, Any], tmp_path: Path,
                                         clipgrep_home: Path, precision: str) -> None:
    """Two models with the same published image tower share one index: the second one needs no re-index."""
    from PIL import Image

    from clipgrep.models import add_model

    clip = add_model("clip32", from_source=str(tiny_export["root"]), precision=precision)
    mclip = add_model("mclip32", from_source=str(mclip_export["root"]), precision=precision)
    assert clip.bundle_id != mclip.bundle_id
    assert clip.image_id == mclip.image_id
    if precision == "int8":  # quantised once: the second model reuses the first one's image.onnx
        assert mclip.manifest["quantization"]["image"]["reused_from"] == "clip32"
    pics = tmp_path / "pics"
    pics.mkdir()
    for i, colour in enumerate(["red", "black"]):
        Image.new("RGB", (64, 48), colour).save(pics / f"{i}.png")

    def clipgrep(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "clipgrep", *argv], capture_output=True, text=True, check=False)

    assert clipgrep("index", str(pics), "--model", "clip32").returncode == 0
    found = clipgrep("search", "chat noir", "--model", "mclip32", "--paths")
    assert found.returncode == 0 and len(found.stdout.splitlines()) == 2, found.stderr
    status = clipgrep("status", "--model", "mclip32", "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["rows"] == 2

    # models remove --purge finds the index by the same key: kept while the other model uses it, then deleted.
    from clipgrep.models import remove_model
    from clipgrep.paths import index_dir
    from clipgrep.store import list_bundle_ids

    kept = remove_model("clip32", purge=True)
    assert kept.shared_with == ("mclip32",) and list_bundle_ids(index_dir()) == [clip.index_id]
    assert clipgrep("search", "chat noir", "--model", "mclip32", "--paths").returncode == 0
    purged = remove_model("mclip32", purge=True)
    assert purged.data_bytes > 0 and list_bundle_ids(index_dir()) == []


def test_nllb_language_prefix(tiny_export: dict[str, Any], tmp_path: Path) -> None:
    """NLLB exports get the FLORES-200 code glued in front of the query, as Immich does."""
    from clipgrep.embed.hf_tokenizer import HfTokenizer
    from clipgrep.imports.layout import read_export

    root = tmp_path / "nllb-clip-tiny"
    shutil.copytree(tiny_export["root"], root)
    config = json.loads((root / "config.json").read_text())
    config["text_cfg"]["hf_tokenizer_name"] = "facebook/nllb-200-distilled-600M"
    (root / "config.json").write_text(json.dumps(config))
    export = read_export(root)
    assert export.tokenizer["language_prefix"] == "flores200"
    tok = HfTokenizer.from_spec(export.tokenizer_path, export.tokenizer)
    with_prefix = tok.encode(["black cat"], language="fr")[0]
    assert np.array_equal(with_prefix, tok.encode(["fra_Latnblack cat"])[0])
    assert not np.array_equal(with_prefix, tok.encode(["black cat"])[0])

    # ...and `clipgrep search --lang` passes the language down.
    from PIL import Image

    from clipgrep.models import add_model

    add_model("nllb", from_source=str(root), precision="fp32")
    pics = tmp_path / "pics"
    pics.mkdir()
    Image.new("RGB", (64, 48), "black").save(pics / "cat.png")

    def score(*extra: str) -> float:
        run = subprocess.run([sys.executable, "-m", "clipgrep", *extra], capture_output=True, text=True, check=False)
        assert run.returncode == 0, run.stderr
        return float(run.stdout.split("\t")[0]) if run.stdout else 0.0

    score("index", str(pics), "--model", "nllb")
    assert score("search", "black cat", "--model", "nllb", "--lang", "fr") != \
        score("search", "black cat", "--model", "nllb")
    assert score("search", "black cat", "--model", "nllb", "--lang", "fr") == \
        score("search", "fra_Latnblack cat", "--model", "nllb")


@pytest.mark.parametrize("remove, message", [
    ("visual/model.onnx", "no visual/model.onnx"),
    ("visual/preprocess_cfg.json", "visual/preprocess_cfg.json is missing"),
    ("textual/tokenizer_config.json", "textual/tokenizer_config.json is missing"),
    ("config.json", "config.json is missing"),
])
def test_incomplete_export_is_refused_with_one_line(tiny_export: dict[str, Any], tmp_path: Path, remove: str,
                                                    message: str) -> None:

    from clipgrep.models import add_model, model_path

    root = tmp_path / "broken"
    shutil.copytree(tiny_export["root"], root)
    (root / remove).unlink()
    with pytest.raises(ClipgrepError) as error:
        add_model("broken", from_source=str(root))
    assert message in error.value.message and "\n" not in str(error.value)
    assert not model_path("broken").exists()


def test_cli_add_from_dir_and_search_path(tiny_export: dict[str, Any]) -> None:
    result = subprocess.run([sys.executable, "-m", "clipgrep", "models", "add", "cli-imm", "--from",
                             str(tiny_export["root"])], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    info = subprocess.run([sys.executable, "-m", "clipgrep", "models", "info", "cli-imm", "--json"],
                          capture_output=True, text=True, check=False)
    assert json.loads(info.stdout)["provenance"]["layout"] == "immich"
    text = subprocess.run([sys.executable, "-m", "clipgrep", "models", "info", "cli-imm"], capture_output=True,
                          text=True, check=False).stdout
    assert "identical to tokenizer.json" in text and "source files" in text and "'visual/model.onnx'" not in text


def test_multilingual_index_and_search_never_import_torch(mclip_export: dict[str, Any], tmp_path: Path,
                                                         clipgrep_home: Path) -> None:
    """With an imported multilingual model, `index` and `search "chat noir..."` work and load no torch."""
    from PIL import Image

    from clipgrep.models import add_model

    from .test_imports import TRAINING, imported_modules

    add_model("multi", from_source=str(mclip_export["root"]), precision="fp32")
    pics = tmp_path / "pics"
    pics.mkdir()
    for i, colour in enumerate(["red", "black", "white"]):
        Image.new("RGB", (80, 60), colour).save(pics / f"{i}.jpg")
    for argv in (["index", str(pics), "--model", "multi"], ["search", "chat noir sur un canapé", "--model", "multi"],
                 ["search", "黒い猫", "--model", "multi", "--json"]):
        loaded = imported_modules(["-m", "clipgrep", *argv], env={"CLIPGREP_HOME": str(clipgrep_home)})
        assert loaded.isdisjoint(TRAINING), (argv, sorted(loaded & set(TRAINING)))
    result = subprocess.run([sys.executable, "-m", "clipgrep", "search", "黒い猫", "--model", "multi", "--paths"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 3


def test_models_available_lists_the_catalogue(clipgrep_home: Path) -> None:
    from clipgrep.catalogue import CATALOGUE, DEFAULT

    result = subprocess.run([sys.executable, "-m", "clipgrep", "models", "available", "--json"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["name"] for r in rows] == [e.name for e in CATALOGUE]
    for row in rows:
        assert {"repo", "languages", "embed_dim", "download_mb", "int8_mb", "quality", "quality_source", "licence",
                "speed", "installed"} <= set(row)
        assert row["quality"] is None or row["quality_source"]
    assert DEFAULT.licence.startswith(("MIT", "Apache")) and DEFAULT.name == "vit-b-32"
    assert any(r["languages"] != "en" for r in rows)
    table = subprocess.run([sys.executable, "-m", "clipgrep", "models", "available"], capture_output=True, text=True,
                           check=False)
    assert "vit-b-32 *" in table.stdout and "nllb-clip-base-siglip" in table.stdout
