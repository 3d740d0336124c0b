"""Teacher training from scratch on 24 generated 32 px images: learning, resume, output format, conversion."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.convert
torch = pytest.importorskip("torch")

from benchmarks.synthetic import generate_dataset
from benchmarks.teacher_training import (
    CHECKPOINT,
    TINY_TEACHER_CFG,
    TeacherProgress,
    TeacherTrainConfig,
    build_clip,
    evaluate_torch,
    train_teacher,
)
from clipgrep.compress.checkpoint import load_local_dir, load_training_state
from clipgrep.compress.data import load_pairs, split_pairs
from clipgrep.compress.losses import contrastive_losses
from clipgrep.embed.preprocess import PreprocessConfig
from clipgrep.errors import ClipgrepError

# TINY_TEACHER_CFG's shape (average-pooled ViT, text attention without a causal mask, LayerScale), smaller.
MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32, "pool_type": "avg",
                   "ls_init_value": 0.1},
    "text_cfg": {"context_length": 48, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2,
                 "no_causal_mask": True, "ls_init_value": 0.1},
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("shapes") / "set", 24, seed=2, image_size=32)


def config(pairs: Path, out: Path, **kw: Any) -> TeacherTrainConfig:
    base = {"image_size": 32, "epochs": 3, "batch_size": 8, "lr": 2e-3, "weight_decay": 0.0, "warmup_steps": 1,
            "seed": 0, "val_fraction": 0.2, "checkpoint_every": 100, "device": "cpu"}
    return TeacherTrainConfig(str(pairs), str(out), MODEL_CFG, **{**base, **kw})


@pytest.fixture(scope="module")
def trained(pairs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 steps (3 epochs of 2 batches) in one go."""
    return train_teacher(config(pairs, tmp_path_factory.mktemp("run") / "full"))


def batch_loss(model: Any, pixels: Any, tokens: Any) -> float:
    with torch.no_grad():
        image = model.encode_image(pixels, normalize=True)
        text = model.encode_text(tokens, normalize=True)
        t2i, i2t = contrastive_losses(text, image, 1.0 / model.logit_scale.exp())
    return float((t2i + i2t) / 2)


def fixed_batch(pairs: Path, model: Any) -> tuple[Any, Any]:
    """Every training image with its first caption, through the runtime's preprocessing and tokenizer."""
    from benchmarks.teacher_training import _tokenizer
    from clipgrep.compress.teacher import load_image_batch
    from clipgrep.convert.torch_env import import_open_clip

    train, _ = split_pairs(load_pairs(pairs), 0.2, 0)
    cfg = PreprocessConfig.from_dict(import_open_clip().get_model_preprocess_cfg(model))
    pixels = torch.from_numpy(load_image_batch(train.images, cfg))
    captions = [train.captions_of(i)[0] for i in range(len(train.images))]
    return pixels, torch.from_numpy(_tokenizer(model.context_length).encode(captions))


def weights(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path / "open_clip_model.safetensors"))


def test_a_few_steps_reduce_the_contrastive_loss(pairs: Path, trained: Path) -> None:
    torch.manual_seed(0)  # train_teacher seeds torch with config.seed before building: the same init
    initial = build_clip(MODEL_CFG).eval()
    final, _, _ = load_local_dir(trained)
    pixels, tokens = fixed_batch(pairs, final)
    before, after = batch_loss(initial, pixels, tokens), batch_loss(final, pixels, tokens)
    assert after < before - 0.1, (before, after)


def test_output_is_a_local_dir_with_its_config_and_recall(pairs: Path, trained: Path) -> None:
    model, model_cfg, preprocess = load_local_dir(trained)
    assert model_cfg == MODEL_CFG
    assert PreprocessConfig.from_dict(preprocess).size == (32, 32) and preprocess["resize_mode"] == "shortest"
    stage = json.loads((trained / "config.json").read_text())
    assert stage["stage"] == "teacher" and stage["steps"] == stage["total_steps"] == 6 and stage["complete"]
    assert stage["train_images"] + stage["val_images"] == 24
    _, val = split_pairs(load_pairs(pairs), 0.2, 0)
    assert stage["val_recall"] == pytest.approx(evaluate_torch(model, val), abs=1e-6)
    run_config = TeacherTrainConfig.from_json((trained.parent / "config.json").read_text())
    assert run_config.model_cfg == MODEL_CFG and run_config.out == str(trained.parent)


def test_batches_hold_distinct_images_with_one_of_their_captions(pairs: Path, tmp_path: Path) -> None:
    from benchmarks.teacher_training import _resolve, _Run, _TrainSet

    c = _resolve(config(pairs, tmp_path / "run", batch_size=6))
    train, _ = split_pairs(load_pairs(pairs), 0.2, 0)
    data = _TrainSet.load(train, {"size": 32}, MODEL_CFG)
    r = _Run(c, build_clip(MODEL_CFG), data)
    seen = []
    for step in range(r.steps_per_epoch):
        images, captions = r.batch_at(step)
        assert len(set(images.tolist())) == len(images) == 6
        assert (train.caption_image[captions] == images).all()
        seen.extend(images.tolist())
    assert len(set(seen)) == len(seen)  # one pass visits each image at most once
    assert not np.array_equal(r.batch_at(0)[1], r.batch_at(r.steps_per_epoch)[1])  # captions vary by pass


def test_resume_continues_from_the_checkpoint_step(pairs: Path, trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    reports: list[TeacherProgress] = []
    first = train_teacher(config(pairs, out, max_steps=3))
    assert load_training_state(out / CHECKPOINT).step == 3
    assert json.loads((first / "config.json").read_text())["complete"] is False
    second = train_teacher(config(pairs, out), reports.append)
    assert [p.step for p in reports] == [4, 5, 6]
    stage = json.loads((second / "config.json").read_text())
    assert stage["resumed_from"] == 3 and stage["steps"] == 6
    resumed, straight = weights(second), weights(trained)
    for key in straight:  # 3 + 3 steps are the same 6 steps as in one go
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6, msg=key)


def test_resume_refuses_a_changed_config(pairs: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train_teacher(config(pairs, out, max_steps=1))
    with pytest.raises(ClipgrepError, match="lr"):
        train_teacher(config(pairs, out, lr=1e-3))


def test_teacher_converts_into_a_bundle_that_passes_the_parity_gate(trained: Path) -> None:
    from benchmarks.teacher_training import _tokenizer
    from clipgrep.models import add_model

    bundle = add_model("t", checkpoint=trained, precision="fp32")  # refuses to install when parity fails
    assert bundle.manifest["preprocess"]["size"] == [32, 32]
    model, _, _ = load_local_dir(trained)
    texts = ["two small red circles on the left", "a blue star on a white background"]
    with torch.no_grad():
        expected = model.encode_text(torch.from_numpy(_tokenizer(48).encode(texts)), normalize=True).numpy()
    np.testing.assert_allclose(bundle.text_encoder().encode(texts), expected, atol=1e-5)


def test_config_checks_the_image_size_and_keeps_its_own_model_cfg(pairs: Path, tmp_path: Path) -> None:
    with pytest.raises(ClipgrepError, match="image_size"):
        config(pairs, tmp_path, image_size=64)
    cfg = {**TINY_TEACHER_CFG, "vision_cfg": {k: v for k, v in TINY_TEACHER_CFG["vision_cfg"].items()
                                              if k != "image_size"}}
    c = TeacherTrainConfig(str(pairs), str(tmp_path), cfg, image_size=48)
    assert c.model_cfg["vision_cfg"]["image_size"] == 48 and "image_size" not in cfg["vision_cfg"]
    assert TeacherTrainConfig.from_json(c.to_json()) == c
    assert replace(c, lr=1.0).model_cfg == c.model_cfg
