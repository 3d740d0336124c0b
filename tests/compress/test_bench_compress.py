"""The proof benchmark's training plan (benchmarks/bench_compress.py) on a tiny run: every image tower
is trained once, the shared one is what the per-depth path would have trained, and the runs go in
parallel worker processes, each once its inputs exist."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.convert
torch = pytest.importorskip("torch")

from benchmarks import bench_compress as bench
from clipgrep.compress import stage1, stage2
from clipgrep.compress.checkpoint import load_local_dir

TINY = bench.Settings(images=24, unlabelled=8, val_fraction=0.25, teacher_epochs=1, stage1_epochs=1,
                      stage2_epochs=1, hard_negatives_k=2, speed_repeats=1, threads=1)


def record(student: Path) -> dict[str, Any]:
    return json.loads((student / "config.json").read_text(encoding="utf-8"))


def tower(student: Path, name: str) -> dict[str, Any]:
    state = load_local_dir(student)[0].state_dict()
    return {k: v for k, v in state.items() if k.startswith("visual.") == (name == "image")}


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    out = tmp_path_factory.mktemp("bench")
    timings: dict[str, float] = {}
    job_timings: dict[str, float] = {}
    checkpoints = bench.train_models(out, replace(TINY, jobs=2), timings, job_timings)
    assert list(timings) == ["data", "teacher training", "stage 1 + 2"]
    assert job_timings.keys() == {"stage 1 t2", "stage 1 t4", "stage 1 t6", "stage 2 full", "stage 2 s2-no-kd",
                                  "stage 2 s2-no-hn", "stage 2 full-t2", "stage 2 full-t6"}
    return out, checkpoints


def write_inputs(path: Path, *inputs: Path) -> Path:
    """A job: writes the names of its inputs to ``path``; each input must exist already."""
    assert all(p.is_file() for p in inputs)
    path.write_text(" ".join(p.name for p in inputs), encoding="utf-8")
    return path


def fail(message: str) -> Path:
    raise ValueError(message)


def test_jobs_run_in_workers_once_their_inputs_exist(tmp_path: Path) -> None:
    jobs = [bench.Job("c", write_inputs, (tmp_path / "c", bench.After("a"), bench.After("b"))),
            bench.Job("b", write_inputs, (tmp_path / "b", bench.After("a"))),
            bench.Job("a", write_inputs, (tmp_path / "a",)),
            bench.Job("d", write_inputs, (tmp_path / "d",))]
    timings: dict[str, float] = {}
    outputs = bench.run_jobs(jobs, 2, 1, timings)
    assert outputs == {name: tmp_path / name for name in "abcd"} and timings.keys() == set("abcd")
    assert [(tmp_path / name).read_text() for name in "abcd"] == ["", "a", "a b", ""]


def test_a_failed_job_fails_the_run_and_its_dependents_never_start(tmp_path: Path) -> None:
    jobs = [bench.Job("bad", fail, ("no such teacher",)),
            bench.Job("after", write_inputs, (tmp_path / "after", bench.After("bad")))]
    with pytest.raises(ValueError, match="no such teacher"):
        bench.run_jobs(jobs, 2, 1, {})
    assert not (tmp_path / "after").exists()


def test_each_image_tower_is_trained_once(trained: tuple[Path, dict[str, Path]]) -> None:
    out, checkpoints = trained
    assert set(checkpoints) == {"bench-teacher", *(f"bench-{v.name}" for v in bench.VARIANTS)}
    # Stage 1: only the main student distils an image tower; the other depths distil text alone.
    stage1_towers = {k: record(out / f"stage1-t{k}" / "student")["towers"] for k in bench.TEXT_BLOCKS}
    assert stage1_towers == {2: ["text"], 4: ["image", "text"], 6: ["text"]}
    # Stage 2: step 2a runs once per loss variant (full, no KD, no HN), never again per text depth.
    steps_run = {v.name: record(checkpoints[f"bench-{v.name}"])["steps_run"] for v in bench.VARIANTS
                 if v.stage2 is not None}
    assert steps_run == {"s2-no-kd": ["image", "text"], "s2-no-hn": ["image", "text"], "full": ["image", "text"],
                         "full-t2": ["text"], "full-t6": ["text"]}
    # The 2- and 6-block students carry the full run's image tower and their own text tower.
    full_image = tower(checkpoints["bench-full"], "image")
    for k in (2, 6):
        student = checkpoints[f"bench-full-t{k}"]
        assert same(tower(student, "image"), full_image)
        assert record(student)["config"]["student"] == str(out / f"graft-full-t{k}")
        assert load_local_dir(student)[1]["text_cfg"]["layers"] == k


def test_the_shared_image_tower_is_the_one_each_depth_would_train(trained: tuple[Path, dict[str, Path]],
                                                                    tmp_path: Path) -> None:
    """The work skipped is identical work: a 2-block student run the per-depth way (stage 1 on both
    towers, then 2a + 2b) ends with the very image tower the benchmark reuses."""
    out, checkpoints = trained
    main_stage1 = stage1.Stage1Config.from_json((out / "stage1-t4" / "config.json").read_text(encoding="utf-8"))
    s1 = stage1.run(replace(main_stage1, student=bench.student_spec(2), out=str(tmp_path / "s1")))
    assert same(tower(s1, "image"), tower(out / "stage1-t4" / "student", "image"))
    full_stage2 = stage2.Stage2Config.from_json((out / "stage2-full" / "config.json").read_text(encoding="utf-8"))
    s2 = stage2.run(replace(full_stage2, student=str(s1), out=str(tmp_path / "s2")))
    assert same(tower(s2, "image"), tower(checkpoints["bench-full-t2"], "image"))


def test_recall_is_averaged_over_the_test_folds_and_speed_comes_from_the_first(monkeypatch: pytest.MonkeyPatch,
                                                                             tmp_path: Path) -> None:
    from clipgrep.compress import eval as compress_eval

    def model(name: str, fold: int, r1: float) -> compress_eval.ModelEval:
        return compress_eval.ModelEval(name=name, bundle_id=name, precision="int8", embed_dim=8, params_image=10,
                                       params_text=10, bytes_image=1, bytes_text=1, n_images=100, n_captions=500,
                                       recall={"t2i_R@1": r1, "i2t_R@1": r1 / 2}, image_ms_b1=1.0 + fold,
                                       image_ms_b16=1.0, text_ms_b1=1.0, text_ms_b16=1.0)

    recalls = {0: {"t": 0.30, "s": 0.27}, 1: {"t": 0.20, "s": 0.23}}  # fold -> model -> t2i R@1
    repeats: list[int] = []

    def run(config: compress_eval.EvalConfig, _: Any) -> list[compress_eval.ModelEval]:
        fold = int(Path(config.pairs).parent.name)
        repeats.append(config.speed_repeats)
        return [model(name, fold, recalls[fold][name]) for name in config.models]

    monkeypatch.setattr(compress_eval, "evaluate", run)
    rows = bench.evaluate([tmp_path / "0" / "pairs.jsonl", tmp_path / "1" / "pairs.jsonl"], ["t", "s"],
                          replace(TINY, speed_repeats=7))
    teacher, student = rows
    assert student["t2i_R@1"] == pytest.approx(0.25) and teacher["t2i_R@1"] == pytest.approx(0.25)
    assert student["i2t_R@1"] == pytest.approx(0.125) and student["t2i_R@1_ratio"] == pytest.approx(1.0)
    assert (student["n_images"], student["n_captions"]) == (200, 1000)
    assert student["image_ms_b1"] == 1.0 and repeats == [7, 1]  # timed properly on the first fold only
