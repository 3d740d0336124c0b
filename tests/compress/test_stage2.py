"""Stage 2 (2a image, then 2b text; KD + mined hard negatives) on a tiny random teacher and 24 generated images."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.convert
torch = pytest.importorskip("torch")

from typer.testing import CliRunner

from benchmarks.synthetic import generate_dataset
from clipgrep.cli import app
from clipgrep.compress.checkpoint import load_local_dir, load_training_state, save_local_dir
from clipgrep.compress.data import PairSet, load_pairs, split_pairs
from clipgrep.compress.mining import mine_caption_negatives
from clipgrep.compress.stage2 import (
    CHECKPOINT,
    HardNegativeProgress,
    Stage2Config,
    Stage2Progress,
    run,
)
from clipgrep.compress.students import build_student, parse_student
from clipgrep.compress.teacher import CacheProgress, load_teacher
from clipgrep.errors import ClipgrepError

from ..convert_support import random_teacher_dir


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_teacher_dir(tmp_path_factory.mktemp("arch"), tmp_path_factory.mktemp("teacher") / "tiny")


@pytest.fixture(scope="module")
def stage1_dir(teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What stage 1 leaves: OUT/student, a 2+2-block student initialised from the teacher."""
    teacher = load_teacher(str(teacher_dir))
    student, model_cfg = build_student(teacher.model, teacher.model_cfg, parse_student("image=2,text=2"))
    out = tmp_path_factory.mktemp("s1")
    save_local_dir(student, model_cfg, teacher.preprocess, out / "student", {"stage": 1, "config": {"seed": 0}})
    return out


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 images of 32 px with 5 captions each; the default split trains on 23."""
    return generate_dataset(tmp_path_factory.mktemp("shapes") / "set", 24, seed=1, image_size=32)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One teacher-embedding cache for every run in this module."""
    return tmp_path_factory.mktemp("cache")


def config(teacher_dir: Path, stage1_dir: Path, pairs: Path, out: Path, cache: Path, **kw: Any) -> Stage2Config:
    base = {"epochs_image": 1, "epochs_text": 1, "batch_size": 8, "lr": 1e-3, "warmup_steps": 0,
            "hard_negatives_k": 4, "device": "cpu", "cache_dir": str(cache)}
    return Stage2Config(str(teacher_dir), str(stage1_dir), str(pairs), str(out), **{**base, **kw})


def weights(path: Path) -> dict[str, Any]:
    return load_local_dir(path)[0].state_dict()


def changed(a: dict[str, Any], b: dict[str, Any]) -> set[str]:
    assert a.keys() == b.keys()
    return {k for k in a if not torch.equal(a[k], b[k])}


def steps_of(events: list[Any]) -> list[Stage2Progress]:
    return [e for e in events if isinstance(e, Stage2Progress)]


# --- (a) one step reduces the loss on a fixed batch --------------------------------------------------


@pytest.mark.parametrize("phase", ["image", "text"])
def test_one_step_reduces_the_loss_on_a_fixed_batch(phase: str, teacher_dir: Path, stage1_dir: Path, pairs: Path,
                                                    cache: Path, tmp_path: Path) -> None:
    """One caption per image and a batch of every training image: each epoch is the same batch (reordered),
    and a static index keeps its hard negatives, so step 2 reports the loss of step 1's batch after one update."""
    single = tmp_path / "single.jsonl"
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    single.write_text("".join(json.dumps({"image": str(pairs.parent / r["image"]), "caption": r["captions"][0]})
                              + "\n" for r in rows))
    events: list[Any] = []
    # val_fraction 0: the images' absolute paths (tmp dirs) would otherwise decide the split, anew each run.
    run(config(teacher_dir, stage1_dir, single, tmp_path / "out", cache, steps=(phase,), batch_size=64,
               epochs_image=2, epochs_text=2, refresh_every=0, lr=1e-4, val_fraction=0.0), events.append)
    first, second = steps_of(events)
    assert first.phase == second.phase == phase and first.losses.keys() == {"t2v", "v2t", "kd", "hn", "total"}
    # The objective is the weighted total; single terms may trade off against each other in one step.
    assert second.losses["total"] < first.losses["total"], (first.losses, second.losses)


# --- (b, c) 2a trains only the image tower, 2b only the text tower; mined negatives ------------------


@pytest.fixture(scope="module")
def two_steps(teacher_dir: Path, stage1_dir: Path, pairs: Path, cache: Path,
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Stop after 2a (2 steps of 4), keep what it wrote, then resume through 2b."""
    out = tmp_path_factory.mktemp("s2") / "run"
    cfg = config(teacher_dir, stage1_dir, pairs, out, cache)
    first: list[Any] = []
    run(replace(cfg, max_steps=2), first.append)
    after_2a = {"weights": weights(out / "student"), "state": load_training_state(out / CHECKPOINT),
                "meta": json.loads((out / "student" / "config.json").read_text())}
    rest: list[Any] = []
    run(cfg, rest.append)
    return {"out": out, "config": cfg, "first": first, "rest": rest, "after_2a": after_2a}


def test_2a_changes_only_the_image_tower_and_2b_only_the_text_tower(two_steps: dict[str, Any],
                                                                     stage1_dir: Path) -> None:
    start, after_2a = weights(stage1_dir / "student"), two_steps["after_2a"]["weights"]
    final = weights(two_steps["out"] / "student")
    image_changed, text_changed = changed(start, after_2a), changed(after_2a, final)
    assert image_changed and all(k.startswith("visual.") for k in image_changed)
    assert text_changed and not any(k.startswith(("visual.", "logit_")) for k in text_changed)
    assert "token_embedding.weight" in text_changed and "text_projection" in text_changed

    assert [(e.step, e.phase, e.epoch) for e in steps_of(two_steps["first"])] == [(1, "image", 1), (2, "image", 1)]
    assert [(e.step, e.phase) for e in steps_of(two_steps["rest"])] == [(3, "text"), (4, "text")]
    meta = json.loads((two_steps["out"] / "student" / "config.json").read_text())
    assert two_steps["after_2a"]["meta"]["final_losses"].keys() == {"image"}
    assert meta["stage"] == 2 and meta["complete"] and meta["resumed_from"] == 2 and meta["steps"] == 4
    assert meta["terms"] == {"t2v": True, "v2t": True, "kd": True, "hn": True}
    assert meta["init"]["stage_config"] == {"seed": 0}
    assert meta["final_losses"]["text"].keys() == {"t2v", "v2t", "kd", "hn", "total"}


def test_mined_negatives_never_include_the_captions_own_image(two_steps: dict[str, Any], pairs: Path) -> None:
    train, _ = split_pairs(load_pairs(pairs), 0.1, 0)
    assert meta_images(two_steps["out"]) == len(train.images) == 23
    for state, phase in ((two_steps["after_2a"]["state"], "image"),
                         (load_training_state(two_steps["out"] / CHECKPOINT), "text")):
        assert state.extra["phase"] == phase and state.extra["mined_for"] == [phase, 0]
        table = state.extra["hard_negatives"].numpy()
        mined = np.flatnonzero((table >= 0).any(axis=1))
        assert len(mined) == len(train.images)  # one caption per image for the epoch
        for caption in mined:
            row = table[caption][table[caption] >= 0]
            assert len(row) == 4 and len(set(row)) == 4 and train.caption_image[caption] not in row
    # The index is built from the current student: 2a's queries are teacher texts, 2b's the student's.
    kinds = {(e.phase, e.kind) for e in two_steps["first"] + two_steps["rest"] if isinstance(e, HardNegativeProgress)}
    assert kinds == {("image", "image"), ("text", "image"), ("text", "text")}


def meta_images(out: Path) -> int:
    return json.loads((out / "student" / "config.json").read_text())["train_split"]["images"]


def test_mining_skips_the_own_image_and_images_with_an_identical_caption(tmp_path: Path) -> None:
    pairs = PairSet([tmp_path / f"{i}.png" for i in range(4)], ["a red circle", "a blue square", "a red circle",
                                                                "green", "a red circle"],
                    np.array([0, 1, 2, 3, 0]))
    images = np.array([[1.0, 0.0], [0.6, 0.8], [0.99, 0.14], [0.0, 1.0]], dtype=np.float32)
    query = np.array([[1.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    got = mine_caption_negatives(query, images, pairs, np.array([0, 1]), k=3)
    # Caption 0: image 0 is its own, image 2 has the same text. Caption 1: only its own image 1 is out.
    np.testing.assert_array_equal(got, [[1, 3, -1], [0, 2, 3]])


# --- (d) switched-off terms are not computed ---------------------------------------------------------


def test_terms_with_weight_zero_are_not_computed(teacher_dir: Path, stage1_dir: Path, pairs: Path,
                                                 tmp_path: Path) -> None:
    events: list[Any] = []
    out = tmp_path / "out"
    run(config(teacher_dir, stage1_dir, pairs, out, tmp_path / "cache", weight_kd=0, weight_hn=0), events.append)
    assert [set(e.losses) for e in steps_of(events)] == [{"t2v", "v2t", "total"}] * 4
    assert load_training_state(out / CHECKPOINT).extra["hard_negatives"] is None
    # Nothing was mined; the only student encoding is 2b's frozen image side. No teacher images: KD is off.
    assert [(e.phase, e.kind) for e in events if isinstance(e, HardNegativeProgress)] == [("text", "image")]
    assert {e.kind for e in events if isinstance(e, CacheProgress)} == {"text"}
    meta = json.loads((out / "student" / "config.json").read_text())
    assert meta["terms"] == {"t2v": True, "v2t": True, "kd": False, "hn": False}
    assert all(losses.keys() == {"t2v", "v2t", "total"} for losses in meta["final_losses"].values())


# --- (e) resume --------------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


def test_resume_continues_from_the_checkpoint_and_matches_an_uninterrupted_run(
        teacher_dir: Path, stage1_dir: Path, pairs: Path, cache: Path, tmp_path: Path) -> None:
    def make(out: str) -> Stage2Config:
        return config(teacher_dir, stage1_dir, pairs, tmp_path / out, cache, epochs_image=2, checkpoint_every=2)

    def stop_at_3(event: Any) -> None:
        if isinstance(event, Stage2Progress) and event.step == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        run(make("a"), stop_at_3)
    assert load_training_state(tmp_path / "a" / CHECKPOINT).step == 2
    events: list[Any] = []
    run(make("a"), events.append)
    assert [(e.step, e.phase, e.epoch) for e in steps_of(events)] == [
        (3, "image", 2), (4, "image", 2), (5, "text", 1), (6, "text", 1)]
    assert not [e for e in events if isinstance(e, CacheProgress)], "the teacher cache was reused"
    run(make("b"))
    resumed, straight = weights(tmp_path / "a" / "student"), weights(tmp_path / "b" / "student")
    assert not changed(resumed, straight)  # CPU training is deterministic, refreshes included

    with pytest.raises(ClipgrepError, match="different stage-2 run") as info:
        run(replace(make("a"), weight_hn=0.5))
    assert "weight_hn" in info.value.message and "--out" in info.value.hint


# --- config -------------------------------------------------------------------------------------------


def test_config_round_trips_and_bad_values_are_refused(two_steps: dict[str, Any], stage1_dir: Path,
                                                       tmp_path: Path) -> None:
    resolved = Stage2Config.from_json((two_steps["out"] / "config.json").read_text())
    assert resolved.student == str(stage1_dir / "student") and resolved.steps == ("image", "text")
    assert Stage2Config.from_json(resolved.to_json()) == resolved
    for bad in ({"steps": ("text", "image")}, {"steps": ()}, {"weight_t2v": 0, "weight_v2t": 0, "weight_kd": 0,
                                                              "weight_hn": 0},
                {"hard_negatives_k": 0}, {"refresh_every": -1}, {"kd_temperature": 0.0}, {"val_fraction": 1.0},
                {"weight_kd": float("nan")}, {"lr": float("inf")}, {"val_fraction": float("nan")}):
        with pytest.raises(ClipgrepError):
            replace(resolved, **bad)
    with pytest.raises(ClipgrepError, match="neither a stage-1 output"):
        run(replace(resolved, student=str(tmp_path), out=str(tmp_path / "x")))


def test_a_foreign_out_directory_is_refused_before_anything_is_written(teacher_dir: Path, stage1_dir: Path,
                                                                        pairs: Path, tmp_path: Path) -> None:
    """``--out`` naming someone's project dir overwrote its config.json before failing."""
    out = tmp_path / "project"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}\n')
    result = CliRunner().invoke(app, [
        "compress", "stage2", "--teacher", str(teacher_dir), "--student", str(stage1_dir), "--pairs", str(pairs),
        "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "is not empty and is not a stage-2 run directory" in result.stderr
    assert (out / "config.json").read_text() == '{"mine": true}\n' and len(list(out.iterdir())) == 1


# --- (f) the command line -----------------------------------------------------------------------------


def test_stage2_from_the_command_line(teacher_dir: Path, stage1_dir: Path, pairs: Path, tmp_path: Path) -> None:
    out = tmp_path / "s2"
    result = CliRunner().invoke(app, [
        "compress", "stage2", "--teacher", str(teacher_dir), "--student", str(stage1_dir), "--pairs", str(pairs),
        "--out", str(out), "--epochs-image", "1", "--epochs-text", "1", "--batch-size", "8", "--lr", "1e-3",
        "--hard-negatives", "4", "--refresh-every", "0", "--weight-kd", "0.5", "--steps", "image,text",
        "--device", "cpu"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert (out / "student" / "open_clip_config.json").is_file() and (out / "config.json").is_file()
    assert "step 4/4 text epoch 1" in result.stderr and "stage 2 done" in result.stderr
    assert Stage2Config.from_json((out / "config.json").read_text()).weight_kd == 0.5
