"""compress eval through the runtime path: contract bundles installed as models, a tiny synthetic set.

No torch: the teacher and students here are contract bundles (numpy weights in ONNX).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks.synthetic import generate_dataset
from clipgrep.bundle import MANIFEST, write_manifest
from clipgrep.compress.data import PairSet, load_pairs, split_pairs
from clipgrep.compress.eval import EvalConfig, ModelEval, compare, evaluate
from clipgrep.errors import ClipgrepError, ModelNotFound
from clipgrep.models import add_model, load_model

from ..factories import make_contract_bundle
from ..test_imports import TRAINING, imported_modules
from .test_metrics import naive_recall

KS = (1, 5, 10)
# Seed 6 gives a teacher with no zero recall on this set, so each of its own ratios is defined.
TEACHER_SEED, STUDENT_SEED = 6, 0
TIMINGS = ("image_ms_b1", "image_ms_b16", "text_ms_b1", "text_ms_b16")


def rewrite_manifest(directory: Path, **changes: object) -> Path:
    """Change manifest fields and re-derive files and bundle_id, as the exporter would write them."""
    manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    fields = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files", "bundle_id")}
    write_manifest(directory, {**fields, **changes})
    return directory


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("shapes"), 12, seed=0, image_size=32)


@pytest.fixture(scope="module")
def bundle_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    teacher = make_contract_bundle(root / "teacher", seed=TEACHER_SEED)
    student = make_contract_bundle(root / "student", seed=STUDENT_SEED)
    rewrite_manifest(teacher, params={"image": 3000, "text": 1000})
    rewrite_manifest(student, params={"image": 600, "text": 400})
    # Another embed_dim and other preprocessing: its pixels come from a decoding pass of its own.
    small = make_contract_bundle(root / "small", seed=2, dim=4)
    rewrite_manifest(small, preprocess={"size": [24, 24], "mean": [0.2, 0.4, 0.6], "std": [0.3, 0.3, 0.3],
                                        "interpolation": "bilinear", "resize_mode": "squash", "fill_color": 0})
    return {"teacher": teacher, "student": student, "small": small}


@pytest.fixture
def models(bundle_dirs: dict[str, Path]) -> tuple[str, ...]:
    for name, directory in bundle_dirs.items():
        add_model(name, checkpoint=directory)
    return ("teacher", "student")


def reference_recall(name: str, pairs: PairSet) -> dict[str, float]:
    """Embed with the bundle's own encoders, the way search does, and rank naively."""
    bundle = load_model(name, auto_install=False)
    image = bundle.image_encoder().encode_files(pairs.images)
    text = bundle.text_encoder().encode(pairs.captions)
    return naive_recall(text, image, pairs.caption_image, KS)


def test_recall_equals_naive_reference_on_runtime_embeddings(pairs_file: Path, models: tuple[str, ...]) -> None:
    messages: list[str] = []
    results = evaluate(EvalConfig(str(pairs_file), (*models, "small"), ks=KS, batch_size=5, speed_repeats=1),
                       on_progress=messages.append)
    pairs = load_pairs(pairs_file)
    assert [r.name for r in results] == ["teacher", "student", "small"]
    for result in results:
        assert result.recall == pytest.approx(reference_recall(result.name, pairs))
        assert set(result.recall) == {f"{d}_R@{k}" for d in ("t2i", "i2t") for k in KS}
        assert (result.n_images, result.n_captions) == (12, 60)
    # The models really differ, so a mix-up between them would show.
    assert results[0].recall != results[1].recall
    assert [r.embed_dim for r in results] == [8, 8, 4]
    # Teacher and student preprocess alike and share a decoding pass; "small" gets its own.
    assert sum(m.startswith("decoding") for m in messages) == 2


def test_figures_come_from_the_manifest(pairs_file: Path, models: tuple[str, ...]) -> None:
    teacher, student = evaluate(EvalConfig(str(pairs_file), models, speed_repeats=1))
    bundle = load_model("teacher", auto_install=False)
    files = bundle.manifest["files"]
    assert (teacher.bundle_id, teacher.precision) == (bundle.bundle_id, "fp32")
    assert (teacher.bytes_image, teacher.bytes_text) == (files["image.onnx"]["bytes"], files["text.onnx"]["bytes"])
    assert (teacher.params_image, teacher.params_text, teacher.params) == (3000, 1000, 4000)
    assert student.params == 1000


def test_speeds_are_positive_and_compare_is_consistent(pairs_file: Path, models: tuple[str, ...]) -> None:
    results = evaluate(EvalConfig(str(pairs_file), models, speed_repeats=3))
    for result in results:
        for key in TIMINGS:
            ms = getattr(result, key)
            assert isinstance(ms, float) and math.isfinite(ms) and ms > 0, (result.name, key, ms)
    rows = compare(results)
    json.dumps(rows, allow_nan=False)  # plain JSON for --json
    teacher, student = rows
    ratio_keys = [k for k in teacher if k.endswith("_ratio") or "_speedup_" in k]
    assert len(ratio_keys) == 4 + 2 + 2 * len(KS)
    assert all(teacher[k] == 1.0 for k in ratio_keys), {k: teacher[k] for k in ratio_keys}
    for kind in ("image", "text"):
        for b in (1, 16):
            assert student[f"{kind}_speedup_b{b}"] == teacher[f"{kind}_ms_b{b}"] / student[f"{kind}_ms_b{b}"]
    assert student["params_ratio"] == 1000 / 4000
    assert student["size_ratio"] == student["bytes"] / teacher["bytes"]
    for key in results[0].recall:
        assert student[f"{key}_ratio"] == student[key] / teacher[key]
    assert student["i2t_R@1"] == 0.0 and student["i2t_R@1_ratio"] == 0.0  # a student may score nothing


def test_unknown_figures_give_no_ratio() -> None:
    def model(name: str, params: int | None, recall: float) -> ModelEval:
        return ModelEval(name, "id", "int8", 8, params, params, 10, 10, 1, 1, {"t2i_R@1": recall},
                         1.0, 1.0, 1.0, 1.0)

    rows = compare([model("teacher", None, 0.0), model("student", 5, 0.5)])
    assert rows[1]["params_ratio"] is None and rows[1]["t2i_R@1_ratio"] is None
    assert rows[0]["t2i_R@1_ratio"] is None  # 0 / 0 is not a ratio of 1
    assert compare([]) == []


def test_val_split_is_split_pairs_val_side(pairs_file: Path, models: tuple[str, ...]) -> None:
    (result,) = evaluate(EvalConfig(str(pairs_file), models[:1], split="val", val_fraction=0.5, seed=3,
                                    speed_repeats=1))
    _, val = split_pairs(load_pairs(pairs_file), val_fraction=0.5, seed=3)
    assert 0 < len(val.images) < 12
    assert (result.n_images, result.n_captions) == (len(val.images), len(val.captions))
    assert result.recall == pytest.approx(reference_recall("teacher", val))


def test_test_split_is_the_karpathy_test_split(pairs_file: Path, models: tuple[str, ...], tmp_path: Path) -> None:
    """The generated set rewritten as a Karpathy file whose test split is every third image."""
    pairs = load_pairs(pairs_file)
    entries = [{"filename": image.name, "split": "test" if i % 3 == 0 else "train",
                "sentences": [{"raw": caption} for caption in pairs.captions_of(i)]}
               for i, image in enumerate(pairs.images)]
    karpathy = tmp_path / "dataset_shapes.json"
    karpathy.write_text(json.dumps({"images": entries}), encoding="utf-8")
    (result,) = evaluate(EvalConfig(str(karpathy), models[:1], split="test", speed_repeats=1,
                                    image_root=str(pairs.images[0].parent)))
    test = pairs.select(range(0, len(pairs.images), 3))
    assert (result.n_images, result.n_captions) == (len(test.images), len(test.captions))
    assert result.recall == pytest.approx(reference_recall("teacher", test))


def test_empty_split_is_an_error(pairs_file: Path, models: tuple[str, ...]) -> None:
    with pytest.raises(ClipgrepError, match="val split .* has no caption-image pairs"):
        evaluate(EvalConfig(str(pairs_file), models, split="val", val_fraction=0.0))


def test_unknown_model_fails_before_any_work(pairs_file: Path, models: tuple[str, ...]) -> None:
    messages: list[str] = []
    with pytest.raises(ModelNotFound, match="'nope'") as info:
        evaluate(EvalConfig(str(pairs_file), (*models, "nope")), on_progress=messages.append)
    assert "\n" not in str(info.value) and "clipgrep models list" in info.value.hint
    assert messages == []


def test_pairs_file_problems_are_reported(tmp_path: Path, models: tuple[str, ...]) -> None:
    with pytest.raises(ClipgrepError):
        evaluate(EvalConfig(str(tmp_path / "missing.jsonl"), models))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"image": "broken.png", "caption": "a red circle"}) + "\n", encoding="utf-8")
    with pytest.raises(ClipgrepError, match="cannot decode .*broken.png"):
        evaluate(EvalConfig(str(pairs), models))


@pytest.mark.parametrize("changes, problem", [
    ({"models": ()}, "no models"),
    ({"models": ("a", "b", "a")}, "more than once"),
    ({"split": "dev"}, "unknown split"),
    ({"ks": (0, 5)}, "ks must be 1 or more"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_config_is_an_error(changes: dict, problem: str) -> None:
    with pytest.raises(ClipgrepError, match=problem):
        EvalConfig(**{"pairs": "pairs.jsonl", "models": ("a", "b"), **changes})


def test_config_takes_lists_as_tuples() -> None:
    config = EvalConfig("p.jsonl", ["a", "b"], ks=[1, 5])  # type: ignore[arg-type]
    assert config.models == ("a", "b") and config.ks == (1, 5)


def test_evaluate_imports_neither_torch_nor_open_clip(pairs_file: Path, models: tuple[str, ...]) -> None:
    script = (
        "from clipgrep.compress.eval import EvalConfig, compare, evaluate\n"
        f"rows = compare(evaluate(EvalConfig({str(pairs_file)!r}, ('teacher', 'student'), speed_repeats=1)))\n"
        "assert len(rows) == 2\n"
    )
    loaded = imported_modules(["-c", script])  # CLIPGREP_HOME, and so the models, come with the environment
    assert "onnxruntime" in loaded
    assert loaded.isdisjoint(TRAINING), sorted(loaded & set(TRAINING))
