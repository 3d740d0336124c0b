"""Stage 1 (intra-modal KD) on a tiny random teacher and 32 generated 32 px images: cache, training, resume."""
from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.convert
torch = pytest.importorskip("torch")

from benchmarks.synthetic import generate_dataset
from clipgrep.compress.checkpoint import load_local_dir, load_training_state
from clipgrep.compress.data import load_image_set, load_texts
from clipgrep.compress.losses import intra_modal_distill_loss
from clipgrep.compress.stage1 import CHECKPOINT, Stage1Config, Stage1Progress, run
from clipgrep.compress.students import build_student, parse_student, teacher_model_cfg
from clipgrep.compress.teacher import (
    CacheProgress,
    Teacher,
    cache_key,
    cached_embeddings,
    load_image_batch,
    load_teacher,
)
from clipgrep.convert.source import ModelSource, load_model
from clipgrep.errors import ClipgrepError

from ..convert_support import TEACHER_CONFIG, random_teacher_dir


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_teacher_dir(tmp_path_factory.mktemp("arch"), tmp_path_factory.mktemp("teacher") / "tiny")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 images of 32 px and their 160 captions (texts.txt)."""
    return generate_dataset(tmp_path_factory.mktemp("shapes") / "set", 32, seed=1, image_size=32).parent


def config(teacher_dir: Path, data: Path, out: Path, student: str = "image=2,text=2", **kw: Any) -> Stage1Config:
    base = {"images": str(data / "images"), "texts": str(data / "texts.txt"), "out": str(out), "epochs": 2,
            "batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "seed": 0, "device": "cpu"}
    return Stage1Config(str(teacher_dir), student, **{**base, **kw})


def weights(path: Path) -> dict[str, Any]:
    return load_local_dir(path)[0].state_dict()


# --- teacher specs ---------------------------------------------------------------------------------


def test_teacher_spec_syntax(tmp_path: Path) -> None:
    (tmp_path / "open_clip_config.json").write_text("{}")
    cases = {
        "ViT-B-32-quickgelu:openai": ModelSource("ViT-B-32-quickgelu", "openai"),
        "ViT-B-32:random": ModelSource("ViT-B-32", random_init=True),
        "ViT-B-32@w/clip.safetensors": ModelSource("ViT-B-32", None, Path(os.path.abspath("w/clip.safetensors"))),
        "ViT-B-32:openai@/w/a@b.pt": ModelSource("ViT-B-32", "openai", Path("/w/a@b.pt")),
        f"local-dir:{tmp_path}": ModelSource(checkpoint=tmp_path),
        str(tmp_path): ModelSource(checkpoint=tmp_path),
    }
    for spec, source in cases.items():
        assert ModelSource.parse(spec) == source, spec
        assert ModelSource.parse(source.spec()) == source
    for bad, message in [("ViT-B-32", "names no weights"), ("hf-hub:org/x", "not supported"),
                         ("ViT-B-32:random@w.pt", "after @"), ("ViT-B-32:", "invalid"), (" ", "empty"),
                         (str(tmp_path.parent), "not an open_clip local dir")]:
        with pytest.raises(ClipgrepError, match=message) as info:
            ModelSource.parse(bad)
        assert info.value.hint


@pytest.mark.parametrize("bad", [{"lr": float("inf")}, {"temperature": float("inf")},
                                 {"weight_decay": float("nan")}, {"weight_decay": float("inf")}])
def test_numbers_that_are_not_finite_are_refused(bad: dict[str, float]) -> None:
    """nan passes every `< 0` check and inf every `> 0` one (issue 12, item 20)."""
    with pytest.raises(ClipgrepError, match="must be"):
        Stage1Config("ViT-B-32:random", "text=2", None, "texts.txt", "out", **bad)


# --- (a) the teacher embedding cache --------------------------------------------------------------


class CountingTeacher(Teacher):
    """Counts the items it encodes, to prove the cache answers without running the model."""

    encoded = 0

    def encode_images(self, pixels: Any) -> Any:
        self.encoded += len(pixels)
        return super().encode_images(pixels)

    def encode_texts(self, ids: Any) -> Any:
        self.encoded += len(ids)
        return super().encode_texts(ids)


def test_cache_is_computed_once_and_keyed_by_items(teacher_dir: Path, data: Path, tmp_path: Path) -> None:
    teacher = CountingTeacher(load_model(ModelSource.parse(str(teacher_dir))), teacher_model_cfg(teacher_dir))
    images, texts = load_image_set(data / "images"), load_texts(data / "texts.txt")[:20]
    events: list[CacheProgress] = []
    first = np.array(cached_embeddings(teacher, "image", images, tmp_path, batch_size=12, on_progress=events.append))
    assert teacher.encoded == 32 and [e.done for e in events] == [12, 24, 32]
    npy = tmp_path / f"teacher-image-{cache_key(teacher, 'image', images)}.npy"
    key_inputs = json.loads(npy.with_suffix(".json").read_text())
    assert key_inputs["n_items"] == 32 and key_inputs["teacher"]["weights_blake2b"] == teacher.weights_digest
    mtime = npy.stat().st_mtime_ns

    again = cached_embeddings(teacher, "image", images, tmp_path)
    assert teacher.encoded == 32 and npy.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again, first)
    assert first.shape == (32, 32) and np.allclose(np.linalg.norm(first, axis=1), 1, atol=1e-5)
    pixels = torch.from_numpy(load_image_batch(images[:4], teacher.preprocess_config))
    np.testing.assert_allclose(first[:4], teacher.encode_images(pixels).numpy(), atol=1e-5)
    teacher.encoded = 0

    os.utime(images[3], ns=(mtime, mtime + 10**9))  # same bytes, newer mtime: may have changed
    keys = {cache_key(teacher, "image", items) for items in (images, images[:-1], images[::-1])}
    keys.add(npy.stem.rsplit("-", 1)[1])
    assert len(keys) == 4
    cached_embeddings(teacher, "text", texts, tmp_path)
    cached_embeddings(teacher, "text", texts, tmp_path)
    assert teacher.encoded == 20
    assert cache_key(teacher, "text", texts) != cache_key(teacher, "text", texts[1:] + texts[:1])



def test_concurrent_callers_encode_a_cache_once(teacher_dir: Path, data: Path, tmp_path: Path) -> None:
    """Two runs sharing a cache_dir that ask for the same embeddings at once (the proof benchmark's
    parallel jobs): the second waits for the first's file instead of encoding it all again."""
    teacher = CountingTeacher(load_model(ModelSource.parse(str(teacher_dir))), teacher_model_cfg(teacher_dir))
    texts = load_texts(data / "texts.txt")[:20]
    first_encoding, second_started = threading.Event(), threading.Event()
    encode_texts = teacher.encode_texts

    def slow_encode(ids: Any) -> Any:
        first_encoding.set()
        second_started.wait(10)
        time.sleep(0.5)  # lets the second caller reach the cache while this one is still encoding
        return encode_texts(ids)

    teacher.encode_texts = slow_encode  # type: ignore[method-assign]
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(cached_embeddings, teacher, "text", texts, tmp_path)
        assert first_encoding.wait(10)
        second = pool.submit(cached_embeddings, teacher, "text", texts, tmp_path)
        second_started.set()
        a, b = np.array(first.result()), np.array(second.result())
    assert teacher.encoded == 20
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, encode_texts(teacher.tokenize(texts)).numpy(), atol=1e-6)


# --- (b, e) training reduces the loss; the output is an open_clip local dir -------------------------


@pytest.fixture(scope="module")
def trained(teacher_dir: Path, data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Any]]:
    events: list[Any] = []
    out = tmp_path_factory.mktemp("s1") / "run"
    run(config(teacher_dir, data, out, max_steps=20, queue_size=16), events.append)
    return out, events


def fixed_batch_losses(model: Any, teacher: Teacher, images: list[Path], texts: list[str]) -> dict[str, float]:
    pixels = torch.from_numpy(load_image_batch(images, teacher.preprocess_config))
    ids = teacher.tokenize(texts)
    with torch.no_grad():
        student = {"image": model.encode_image(pixels, normalize=True), "text": model.encode_text(ids, normalize=True)}
        target = {"image": teacher.encode_images(pixels), "text": teacher.encode_texts(ids)}
        return {k: float(intra_modal_distill_loss(student[k], target[k], 0.07)) for k in student}


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(trained: tuple[Path, list[Any]], teacher_dir: Path,
                                                     data: Path) -> None:
    out, events = trained
    teacher = load_teacher(str(teacher_dir))
    untrained, _ = build_student(teacher.model, teacher.model_cfg, parse_student("image=2,text=2"))
    images, texts = load_image_set(data / "images")[:16], load_texts(data / "texts.txt")[:16]
    before = fixed_batch_losses(untrained, teacher, images, texts)
    after = fixed_batch_losses(load_local_dir(out / "student")[0], teacher, images, texts)
    assert after["image"] < before["image"] and after["text"] < before["text"], (before, after)

    steps = [e for e in events if isinstance(e, Stage1Progress)]
    assert [e.step for e in steps] == list(range(1, 21)) and {e.total_steps for e in steps} == {40}
    assert steps[-1].epoch == 1 and steps[-1].losses.keys() == {"image", "text"} and steps[-1].items_per_s > 0


def test_output_is_a_local_dir_with_the_teachers_dim(trained: tuple[Path, list[Any]]) -> None:
    out, _ = trained
    model, model_cfg, preprocess = load_local_dir(out / "student")
    assert model_cfg["vision_cfg"]["layers"] == 2 and model_cfg["text_cfg"]["layers"] == 2
    with torch.no_grad():
        image = model.encode_image(torch.zeros(2, 3, *preprocess["size"]))
        text = model.encode_text(torch.ones(2, 32, dtype=torch.long))
    assert image.shape == text.shape == (2, TEACHER_CONFIG["embed_dim"])

    resolved = Stage1Config.from_json((out / "config.json").read_text())
    assert resolved.student == "image=2,text=2,map=uniform,init=teacher"
    assert resolved.cache_dir == str(out / "cache") and Path(resolved.images).is_absolute()
    assert Stage1Config.from_json(resolved.to_json()) == resolved
    meta = json.loads((out / "student" / "config.json").read_text())
    assert meta["stage"] == 1 and meta["config"] == json.loads(resolved.to_json())
    assert meta["steps"] == 20 and meta["total_steps"] == 40 and not meta["complete"]
    assert meta["final_losses"].keys() == {"image", "text"} and meta["plan"]["text_layers"] == [0, 3]


# --- (c, d) resume ---------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


def test_resume_continues_from_the_checkpoint_and_matches_an_uninterrupted_run(
        teacher_dir: Path, data: Path, tmp_path: Path) -> None:
    def make(out: str) -> Stage1Config:
        return config(teacher_dir, data, tmp_path / out, max_steps=9, checkpoint_every=4, queue_size=12,
                      cache_dir=str(tmp_path / "cache"))

    def stop_at_6(event: Any) -> None:
        if isinstance(event, Stage1Progress) and event.step == 6:
            raise Interrupted

    with pytest.raises(Interrupted):
        run(make("a"), stop_at_6)
    assert load_training_state(tmp_path / "a" / CHECKPOINT).step == 4
    events: list[Any] = []
    run(make("a"), events.append)
    assert [e.step for e in events if isinstance(e, Stage1Progress)] == [5, 6, 7, 8, 9]
    assert not [e for e in events if isinstance(e, CacheProgress)], "the teacher cache was reused"
    run(make("b"))

    resumed, straight = weights(tmp_path / "a" / "student"), weights(tmp_path / "b" / "student")
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in resumed)  # CPU training is deterministic
    assert json.loads((tmp_path / "a" / "student" / "config.json").read_text())["resumed_from"] == 4

    # Going on past the first stop is a resume too: max_steps only says where to stop.
    more = replace(make("a"), max_steps=10)
    events.clear()
    run(more, events.append)
    assert [e.step for e in events if isinstance(e, Stage1Progress)] == [10]


def test_resume_with_another_config_or_data_is_refused(teacher_dir: Path, data: Path, tmp_path: Path) -> None:
    texts = tmp_path / "texts.txt"
    texts.write_text((data / "texts.txt").read_text())
    first = config(teacher_dir, data, tmp_path / "out", texts=str(texts), max_steps=1)
    run(first)
    for change in ({"lr": 5e-4}, {"student": "image=1,text=2"}, {"seed": 1}, {"texts": str(data / "texts.txt")}):
        with pytest.raises(ClipgrepError, match="different stage-1 config") as info:
            run(replace(first, **change))
        assert next(iter(change)) in info.value.message and "--out" in info.value.hint
    texts.write_text("".join(f"{t}\n" for t in load_texts(texts)[:40]))
    with pytest.raises(ClipgrepError, match="text set changed"):
        run(first)


# --- (f) a tower kept as the teacher's --------------------------------------------------------------


def test_a_tower_kept_as_teacher_stays_bit_identical(teacher_dir: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(config(teacher_dir, data, out, student="text=2", max_steps=3))
    student, teacher = weights(out / "student"), weights(teacher_dir)
    visual = [k for k in student if k.startswith("visual.")]
    assert visual and all(torch.equal(student[k], teacher[k]) for k in visual)
    assert not torch.equal(student["token_embedding.weight"], teacher["token_embedding.weight"])
    assert [p.name.split("-")[1] for p in (out / "cache").glob("*.npy")] == ["text"], "images were not encoded"
    assert json.loads((out / "student" / "config.json").read_text())["towers"] == ["text"]


def test_inputs_are_checked_before_any_model_loads(teacher_dir: Path, data: Path, tmp_path: Path) -> None:
    with pytest.raises(ClipgrepError, match="is the teacher"):
        run(config(teacher_dir, data, tmp_path / "a", student="image=teacher,text=teacher"))
    with pytest.raises(ClipgrepError, match="needs texts") as info:
        run(config(teacher_dir, data, tmp_path / "b", student="text=2", texts=None))
    assert info.value.hint == "pass --texts (or builtin:generic)"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    for bad in ({"batch_size": 1}, {"lr": 0}, {"max_steps": 0}, {"temperature": -1.0}):
        with pytest.raises(ClipgrepError):
            config(teacher_dir, data, tmp_path / "c", **bad)
    with pytest.raises(ClipgrepError, match="unexpected"):
        Stage1Config.from_json('{"teacher": "x", "bogus": 1}')
