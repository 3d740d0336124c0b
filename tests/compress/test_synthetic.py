"""The generated shapes data set: deterministic, captions true to the scene, readable by load_pairs."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.synthetic import (
    CAPTIONS_PER_IMAGE,
    COLOURS,
    COUNT_WORDS,
    PLURALS,
    POSITION_WORDS,
    SIZE_WORDS,
    Scene,
    ShapeGroup,
    generate_dataset,
    render,
    sample_scene,
)
from clipgrep.compress.data import load_pairs, load_texts, split_pairs
from clipgrep.errors import ClipgrepError


def rows_of(pairs_path: Path) -> list[dict]:
    return [json.loads(line) for line in pairs_path.read_text(encoding="utf-8").splitlines()]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("shapes") / "out", 16, seed=3)


def test_layout_and_return_value(dataset: Path) -> None:
    out = dataset.parent
    assert dataset == out / "pairs.jsonl"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "images", "pairs.jsonl", "texts.txt"]
    assert len(list((out / "images").glob("*.png"))) == 16
    assert pixels(out / "images" / "000000.png").shape == (64, 64, 3)
    assert json.loads((out / "config.json").read_text())["seed"] == 3


def test_same_seed_same_bytes_and_pixels(dataset: Path, tmp_path: Path) -> None:
    again = generate_dataset(tmp_path / "again", 16, seed=3)
    assert again.read_bytes() == dataset.read_bytes()
    assert (again.parent / "texts.txt").read_bytes() == (dataset.parent / "texts.txt").read_bytes()
    for name in ("000000.png", "000015.png"):
        assert np.array_equal(pixels(again.parent / "images" / name), pixels(dataset.parent / "images" / name))
    other = generate_dataset(tmp_path / "other", 16, seed=4)
    assert other.read_bytes() != dataset.read_bytes()


def test_image_i_depends_only_on_seed_and_i(dataset: Path, tmp_path: Path) -> None:
    fewer = generate_dataset(tmp_path / "fewer", 5, seed=3, image_size=32)
    assert rows_of(fewer) == rows_of(dataset)[:5]  # captions and scenes do not depend on the size either


def test_captions_state_every_fact_of_the_scene(dataset: Path) -> None:
    for row in rows_of(dataset):
        captions = row["captions"]
        assert len(set(captions)) == len(captions) == CAPTIONS_PER_IMAGE
        for group in row["scene"]["groups"]:
            noun = group["shape"] if group["count"] == 1 else PLURALS[group["shape"]]
            for caption in captions:
                words = caption.replace(",", " ").split()
                assert group["colour"] in words and noun in words, caption
                assert any(w in words for w in SIZE_WORDS[group["size"]]), caption
                assert any(p in caption for p in POSITION_WORDS[group["position"]]), caption
                if group["count"] > 1:
                    assert any(c in caption for c in COUNT_WORDS[group["count"]]), caption


def test_drawn_colours_match_the_scene(dataset: Path) -> None:
    for row in rows_of(dataset):
        image = pixels(dataset.parent / row["image"]).reshape(-1, 3).astype(int)
        for group in row["scene"]["groups"]:
            distance = np.linalg.norm(image - np.array(COLOURS[group["colour"]]), axis=1)
            assert (distance < 45).sum() >= 3, (row["image"], group)


def test_texts_file_lists_every_caption(dataset: Path) -> None:
    texts = load_texts(dataset.parent / "texts.txt")
    assert texts == [caption for row in rows_of(dataset) for caption in row["captions"]]


def test_load_pairs_reads_the_generated_set(dataset: Path) -> None:
    pairs = load_pairs(dataset)
    assert len(pairs.images) == 16 and len(pairs) == 16 * CAPTIONS_PER_IMAGE
    assert pairs.images[3] == dataset.parent / "images" / "000003.png"
    assert pairs.captions_of(3) == rows_of(dataset)[3]["captions"]
    train, val = split_pairs(pairs, 0.25)
    assert len(train.images) + len(val.images) == 16


def test_scenes_are_diverse_with_partial_overlaps() -> None:
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(300)]
    assert len(set(scenes)) > 270  # most images have a caption set of their own
    facts = [{(g.colour, g.shape) for g in s.groups} for s in scenes]
    colours = [{g.colour for g in s.groups} for s in scenes]
    # Near misses: another scene with a shared colour but none of the same coloured shapes.
    near = sum(any(colours[i] & colours[j] and not facts[i] & facts[j] for j in range(300) if j != i)
               for i in range(50))
    assert near == 50
    assert Counter(len(s.groups) for s in scenes).keys() == {1, 2, 3}


def test_same_scene_never_same_pixels() -> None:
    scene = Scene("grey", (ShapeGroup("red", "star", "large", "centre", 2),))
    first = np.asarray(render(scene, np.random.default_rng(1), 32))
    second = np.asarray(render(scene, np.random.default_rng(2), 32))
    assert first.shape == (32, 32, 3) and not np.array_equal(first, second)


@pytest.mark.parametrize(("kwargs", "problem"), [
    ({"n_images": 0}, "n_images must be at least 1"),
    ({"n_images": 2, "image_size": 8}, "too small"),
    ({"n_images": 2, "seed": -1}, "seed must be 0 or more"),
])
def test_bad_arguments(tmp_path: Path, kwargs: dict, problem: str) -> None:
    with pytest.raises(ClipgrepError, match=problem):
        generate_dataset(tmp_path / "out", **kwargs)


def test_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(ClipgrepError, match="not an empty directory") as info:
        generate_dataset(tmp_path, 2)
    assert str(tmp_path) in info.value.message and info.value.hint
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
