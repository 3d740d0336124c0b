"""Stage 1 on the user's own library: the index's stored teacher embeddings are the image targets."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.convert
torch = pytest.importorskip("torch")

from benchmarks.synthetic import generate_dataset
from clipgrep.compress.generic_texts import BUILTIN_GENERIC, generic_texts
from clipgrep.compress.library import indexed_images
from clipgrep.compress.stage1 import Stage1Config, run
from clipgrep.compress.teacher import Teacher
from clipgrep.errors import ClipgrepError
from clipgrep.index.build import IndexOptions, update_index
from clipgrep.models import add_model, load_model

from ..convert_support import random_teacher_dir


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_teacher_dir(tmp_path_factory.mktemp("arch"), tmp_path_factory.mktemp("teacher") / "tiny")


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A photo folder of 24 generated images."""
    return generate_dataset(tmp_path_factory.mktemp("library") / "set", 24, seed=2, image_size=32).parent / "images"


def index_with(name: str, checkpoint: Path, library: Path) -> None:
    add_model(name, checkpoint=checkpoint, precision="fp32")
    update_index([library], bundle=load_model(name, auto_install=False), options=IndexOptions(workers=0))


def config(teacher: Path, out: Path, **kw: Any) -> Stage1Config:
    base = {"images": None, "texts": None, "out": str(out), "epochs": 1, "batch_size": 8, "lr": 1e-3,
            "warmup_steps": 1, "device": "cpu", "images_from_index": "teacher-bundle"}
    return Stage1Config(str(teacher), "image=2", **{**base, **kw})


def test_indexed_vectors_are_the_targets_and_no_image_passes_through_the_teacher(
        teacher_dir: Path, library: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index_with("teacher-bundle", teacher_dir, library)
    indexed = indexed_images("teacher-bundle")
    assert len(indexed.paths) == 24 and indexed.stale == 0
    assert np.allclose(np.linalg.norm(indexed.vectors, axis=1), 1, atol=1e-4)

    def no_image_pass(self: Teacher, pixels: Any) -> Any:
        raise AssertionError("the teacher encoded images; the index already holds their embeddings")

    monkeypatch.setattr(Teacher, "encode_images", no_image_pass)
    student = run(config(teacher_dir, tmp_path / "run"))
    assert (student / "open_clip_config.json").is_file()
    assert not list((tmp_path / "run" / "cache").glob("teacher-image-*"))  # nothing was cached for images


def test_changed_files_are_left_out(teacher_dir: Path, library: Path, tmp_path: Path) -> None:
    index_with("teacher-bundle", teacher_dir, library)
    victim = min(library.iterdir())
    data = victim.read_bytes()
    victim.write_bytes(data + b"\0")  # size changed: its stored vector no longer describes it
    try:
        indexed = indexed_images("teacher-bundle")
        assert indexed.stale == 1 and victim not in indexed.paths and len(indexed.paths) == 23
    finally:
        victim.write_bytes(data)


def test_an_index_made_by_another_model_is_refused(teacher_dir: Path, library: Path, tmp_path: Path) -> None:
    other = random_teacher_dir(tmp_path / "arch", tmp_path / "other", seed=7)
    index_with("other-bundle", other, library)
    with pytest.raises(ClipgrepError, match="was not made by teacher") as info:
        run(config(teacher_dir, tmp_path / "run", images_from_index="other-bundle"))
    assert info.value.hint and "\n" not in str(info.value)


def test_empty_index_and_conflicting_image_sets_are_refused(teacher_dir: Path, library: Path,
                                                             tmp_path: Path) -> None:
    add_model("unindexed", checkpoint=teacher_dir, precision="fp32")
    with pytest.raises(ClipgrepError, match="nothing is indexed with model unindexed"):
        run(config(teacher_dir, tmp_path / "run", images_from_index="unindexed"))
    with pytest.raises(ClipgrepError, match="both --images and --images-from-index"):
        config(teacher_dir, tmp_path / "run", images=str(library))


def test_generic_texts_are_deterministic_distinct_and_sized() -> None:
    texts = generic_texts()
    assert len(texts) == 30_000 == len(set(texts))
    assert generic_texts(500) == texts[:500] and generic_texts(500, seed=1) != texts[:500]
    assert all(0 < len(t) < 120 and t == " ".join(t.split()) for t in texts)
    assert BUILTIN_GENERIC == "builtin:generic"


def test_auto_distils_exports_and_reports_then_the_student_indexes(teacher_dir: Path, library: Path,
                                                                    tmp_path: Path) -> None:
    from clipgrep.compress.auto import REPORT, AutoConfig, default_student, resolve_teacher, run_auto

    index_with("teacher-bundle", teacher_dir, library)
    assert resolve_teacher("teacher-bundle") == (str(teacher_dir), "teacher-bundle")  # from its provenance
    assert default_student(str(teacher_dir)) == "image=2,text=1"
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(generic_texts(64)), encoding="utf-8")
    steps: list[str] = []
    result = run_auto(AutoConfig("teacher-bundle", str(tmp_path / "auto"), "mine", texts=str(texts), epochs=1,
                                 batch_size=8, device="cpu", fidelity_sample=24),
                      on_step=steps.append)
    report = json.loads((tmp_path / "auto" / REPORT).read_text(encoding="utf-8"))
    assert report == result.report and report["student"] == "mine" and report["n_images"] == 24
    for key in ("text_recall_at_10", "image_recall_at_10"):
        assert 0.0 <= report[key] <= 1.0
    assert -1.0 <= report["text_spearman"] <= 1.0 and report["size_ratio"] < 1.0
    assert load_model("mine", auto_install=False).precision == "int8"
    update_index([library], bundle=load_model("mine", auto_install=False), options=IndexOptions(workers=0))
    assert len(indexed_images("mine").paths) == 24


def test_auto_refuses_a_model_without_torch_weights(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    from clipgrep.compress.auto import resolve_teacher

    from ..factories import make_contract_bundle

    add_model("numpy-only", checkpoint=make_contract_bundle(tmp_path / "b"))
    with pytest.raises(ClipgrepError, match="does not record torch weights") as info:
        resolve_teacher("numpy-only")
    assert "--teacher" in info.value.hint
    assert resolve_teacher("ViT-B-32:random") == ("ViT-B-32:random", None)
