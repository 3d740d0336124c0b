"""Stage outputs (open_clip local dirs) and training checkpoints: round trips, atomic replacement, export."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.convert
torch = pytest.importorskip("torch")

from clipgrep.compress.checkpoint import (
    capture_rng_states,
    load_local_dir,
    load_training_state,
    restore_rng_states,
    save_local_dir,
    save_training_state,
)
from clipgrep.compress.students import build_student, parse_student, teacher_model_cfg
from clipgrep.errors import ClipgrepError

TEACHER_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
PREPROCESS = {"size": 64, "mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
              "resize_mode": "shortest", "fill_color": 0}


@pytest.fixture(scope="module")
def student() -> tuple[Any, dict[str, Any]]:
    """A 1+1-block student of a 2+2-block random teacher."""
    from clipgrep.convert.torch_env import import_open_clip

    open_clip = import_open_clip()
    torch.manual_seed(0)
    teacher = open_clip.model.CLIP(**TEACHER_CONFIG).eval()
    return build_student(teacher, TEACHER_CONFIG, parse_student("image=1,text=1"))


def embed(model: Any) -> tuple[Any, Any]:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, 64, 64, generator=generator)
    ids = torch.randint(1, 49000, (2, 77), generator=generator)
    with torch.no_grad():
        return model.encode_image(pixels), model.encode_text(ids)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# --- stage outputs ------------------------------------------------------------------------------------


def test_local_dir_round_trip_gives_identical_embeddings(student: tuple[Any, dict], tmp_path: Path) -> None:
    model, cfg = student
    out = save_local_dir(model, cfg, PREPROCESS, tmp_path / "s1", {"stage": 1, "student": "image=1,text=1"})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "open_clip_config.json",
                                                     "open_clip_model.safetensors"]
    assert json.loads((out / "config.json").read_text()) == {"stage": 1, "student": "image=1,text=1"}
    loaded, loaded_cfg, preprocess = load_local_dir(out)
    assert loaded_cfg == cfg and not loaded.training
    expected = {k: v for k, v in PREPROCESS.items() if k != "size"}
    assert {k: preprocess[k] for k in expected} == expected
    assert tuple(preprocess["size"]) == (64, 64)  # open_clip reports the tower's (height, width)
    for ours, theirs in zip(embed(model), embed(loaded)):
        assert torch.equal(ours, theirs)
    assert leftovers(tmp_path) == []
    # A stage output can teach the next stage.
    assert teacher_model_cfg(out) == teacher_model_cfg(f"local-dir:{out}") == teacher_model_cfg(str(out)) == cfg


def test_compiled_and_tied_weights_are_saved_plainly(student: tuple[Any, dict], tmp_path: Path) -> None:
    import copy

    model, cfg = student
    tied = copy.deepcopy(model)
    tied.visual.ln_post.weight = tied.visual.ln_pre.weight  # shared storage: safetensors refuses it as is

    class Compiled(torch.nn.Module):  # what torch.compile's wrapper does to state_dict keys
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self._orig_mod = inner

    save_local_dir(Compiled(tied), cfg, PREPROCESS, tmp_path / "tied")
    loaded, _, _ = load_local_dir(tmp_path / "tied")
    assert torch.equal(loaded.visual.ln_post.weight, tied.visual.ln_pre.weight)
    assert json.loads((tmp_path / "tied" / "config.json").read_text()) == {}


def test_failed_save_leaves_the_previous_output_intact(student: tuple[Any, dict], tmp_path: Path) -> None:
    model, cfg = student
    save_local_dir(model, cfg, PREPROCESS, tmp_path / "out", {"run": 1})
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(TypeError):  # fails after the weights were written, while writing config.json
        save_local_dir(model, cfg, PREPROCESS, tmp_path / "out", {"run": 2, "bad": object()})
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert leftovers(tmp_path) == []
    save_local_dir(model, cfg, PREPROCESS, tmp_path / "out", {"run": 3})  # a later save replaces it
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == {"run": 3}
    assert leftovers(tmp_path) == []


def test_unfinished_local_dirs_are_refused(student: tuple[Any, dict], tmp_path: Path) -> None:
    model, cfg = student
    with pytest.raises(ClipgrepError, match="is not an open_clip local dir") as e:
        load_local_dir(tmp_path)
    assert e.value.hint
    save_local_dir(model, cfg, PREPROCESS, tmp_path / "out")
    (tmp_path / "out" / "open_clip_model.safetensors").unlink()
    with pytest.raises(ClipgrepError, match="has no open_clip_model.safetensors"):
        load_local_dir(tmp_path / "out")


def test_student_converts_to_a_bundle_through_the_parity_gate(student: tuple[Any, dict],
                                                              tmp_path: Path) -> None:
    import torch.nn.functional as F

    from clipgrep.models import add_model

    model, cfg = student
    save_local_dir(model, cfg, PREPROCESS, tmp_path / "student")
    bundle = add_model("student", checkpoint=tmp_path / "student", precision="fp32")
    assert bundle.manifest["embed_dim"] == TEACHER_CONFIG["embed_dim"]
    assert bundle.manifest["preprocess"]["mean"] == pytest.approx(PREPROCESS["mean"])
    assert min(bundle.manifest["parity"][m]["min_cos"] for m in ("image", "text")) >= 0.9999
    from clipgrep.convert.torch_env import import_open_clip

    ids = import_open_clip().tokenize(["a red bicycle"])
    with torch.no_grad():
        expected = F.normalize(model.encode_text(ids), dim=-1).numpy()
    np.testing.assert_allclose(bundle.text_encoder().encode(["a red bicycle"]), expected, atol=1e-5)


# --- training checkpoints -----------------------------------------------------------------------------


def test_training_state_round_trip_restores_optimizer_scheduler_and_rng(student: tuple[Any, dict],
                                                                        tmp_path: Path) -> None:
    model, _ = student
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    scheduler.step()
    rng = capture_rng_states()
    expected_draws = (torch.rand(3), np.random.rand(3), random.random())
    save_training_state(tmp_path / "last.pt", 7, model.state_dict(), optimizer.state_dict(),
                        scheduler.state_dict(), rng, {"epoch": 2, "best_recall": 0.5})

    state = load_training_state(tmp_path / "last.pt")
    assert state.step == 7 and state.extra == {"epoch": 2, "best_recall": 0.5}
    assert state.model_state.keys() == model.state_dict().keys()
    assert all(torch.equal(state.model_state[k], v) for k, v in model.state_dict().items())
    fresh = torch.optim.AdamW(params, lr=1e-3)
    fresh.load_state_dict(state.optimizer_state)
    first = fresh.state_dict()["state"][0]
    assert torch.equal(first["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    fresh_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(fresh, T_max=10)
    fresh_scheduler.load_state_dict(state.scheduler_state)
    assert fresh_scheduler.last_epoch == 1
    restore_rng_states(state.rng_states)
    draws = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(draws[0], expected_draws[0])
    np.testing.assert_array_equal(draws[1], expected_draws[1])
    assert draws[2] == expected_draws[2]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("failure", ["unpicklable extra", "killed mid-write"])
def test_interrupted_training_save_keeps_the_previous_checkpoint(tmp_path: Path, failure: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import pickle

    weights = {"w": torch.arange(4.0)}
    save_training_state(tmp_path / "last.pt", 1, weights, None, None, capture_rng_states())
    extra: dict[str, Any] = {}
    if failure == "unpicklable extra":
        extra["callback"] = lambda: None  # pickling fails inside torch.save
    else:
        real_save = torch.save

        def half_save(obj: Any, f: Any) -> None:  # write half the bytes, then die as a kill would
            buffer = io.BytesIO()
            real_save(obj, buffer)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            raise KeyboardInterrupt

        monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises((pickle.PicklingError, AttributeError, KeyboardInterrupt)):  # AttributeError: local lambda
        save_training_state(tmp_path / "last.pt", 2, {"w": torch.zeros(4)}, None, None, capture_rng_states(),
                            extra)
    monkeypatch.undo()
    state = load_training_state(tmp_path / "last.pt")
    assert state.step == 1 and torch.equal(state.model_state["w"], weights["w"])
    assert leftovers(tmp_path) == []


def test_compile_prefix_is_stripped_from_training_state(tmp_path: Path) -> None:
    save_training_state(tmp_path / "s.pt", 0, {"_orig_mod.visual.proj": torch.ones(2)}, None, None, {})
    assert list(load_training_state(tmp_path / "s.pt").model_state) == ["visual.proj"]


class Pickled:  # not on torch's weights_only allow-list
    pass


@pytest.mark.parametrize("payload", ["garbage", "object", "dict"])
def test_foreign_or_damaged_training_checkpoints_are_refused(tmp_path: Path, payload: str) -> None:
    path = tmp_path / "x.pt"
    if payload == "garbage":
        path.write_bytes(b"not a checkpoint")
    else:
        torch.save({"format": 1, "obj": Pickled()} if payload == "object" else {"weights": torch.ones(1)}, path)
    with pytest.raises(ClipgrepError, match="x.pt") as e:
        load_training_state(path)
    assert "without --resume" in e.value.hint
    with pytest.raises(ClipgrepError, match="no training checkpoint"):
        load_training_state(tmp_path / "missing.pt")
