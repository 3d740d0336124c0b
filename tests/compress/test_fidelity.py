"""The label-free fidelity report: top-10 overlap and rank correlation of student vs teacher."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipgrep.compress.fidelity import fidelity, overlap_at_k, spearman
from clipgrep.index.build import IndexOptions, update_index
from clipgrep.models import add_model, load_model


def naive_overlap(reference: np.ndarray, candidate: np.ndarray, k: int) -> list[float]:
    out = []
    for ref, cand in zip(reference, candidate):
        top_ref = set(sorted(range(len(ref)), key=lambda j: -ref[j])[:k])
        top_cand = set(sorted(range(len(cand)), key=lambda j: -cand[j])[:k])
        out.append(len(top_ref & top_cand) / k)
    return out


def naive_spearman(a: np.ndarray, b: np.ndarray) -> list[float]:
    out = []
    for x, y in zip(a, b):
        rank_x = {j: r for r, j in enumerate(sorted(range(len(x)), key=lambda j: x[j]))}
        rank_y = {j: r for r, j in enumerate(sorted(range(len(y)), key=lambda j: y[j]))}
        n = len(x)
        d2 = sum((rank_x[j] - rank_y[j]) ** 2 for j in range(n))
        out.append(1 - 6 * d2 / (n * (n * n - 1)))  # the textbook formula, valid without ties
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_overlap_and_spearman_match_naive_references(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(7, 40))
    b = a + rng.normal(scale=[[0.0], [0.1], [0.5], [1.0], [3.0], [10.0], [100.0]], size=(7, 40))
    assert overlap_at_k(a, b, 10) == pytest.approx(naive_overlap(a, b, 10))
    assert spearman(a, b) == pytest.approx(naive_spearman(a, b))
    assert overlap_at_k(a, a, 10) == pytest.approx(1.0) and spearman(a, a) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)


@pytest.fixture
def library(tmp_path: Path) -> Path:
    rng = np.random.default_rng(5)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(40):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        Image.new("RGB", (16, 16), colour).save(folder / f"{i:02d}.png")
    return folder


def test_fidelity_is_perfect_for_the_teacher_itself_and_lower_for_another_model(library: Path,
                                                                                tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    from ..factories import make_contract_bundle

    add_model("teacher", checkpoint=make_contract_bundle(tmp_path / "t", seed=0))
    add_model("same", checkpoint=make_contract_bundle(tmp_path / "same", name="same", seed=0))
    add_model("other", checkpoint=make_contract_bundle(tmp_path / "o", seed=3))
    update_index([library], bundle=load_model("teacher", auto_install=False), options=IndexOptions(workers=0))
    messages: list[str] = []
    same = fidelity("teacher", "same", text_queries=20, image_queries=10, speed_repeats=1,
                    on_progress=messages.append)
    assert (same.n_images, same.n_text_queries, same.n_image_queries) == (40, 20, 10)
    assert same.text_recall_at_10 == pytest.approx(1.0) and same.image_recall_at_10 == pytest.approx(1.0)
    assert same.text_spearman == pytest.approx(1.0) and same.image_spearman == pytest.approx(1.0)
    other = fidelity("teacher", "other", text_queries=20, image_queries=10, speed_repeats=1)
    assert other.image_recall_at_10 < 0.9 and other.image_spearman < 0.9
    figures = other.figures()
    assert figures["size_ratio"] > 0 and figures["image_speedup_b16"] > 0 and messages
