"""recall@K against a naive reference: full rankings built one query at a time."""
from __future__ import annotations

import numpy as np
import pytest

from clipgrep.compress.metrics import recall_at_k

KS = (1, 2, 5, 10)


def ranking(query: np.ndarray, items: np.ndarray) -> list[int]:
    """All item ids by descending similarity, ties to the lower id (a stable sort)."""
    return sorted(range(len(items)), key=lambda j: (-float(np.dot(query, items[j])), j))


def naive_recall(text: np.ndarray, image: np.ndarray, text_to_image: np.ndarray, ks: tuple[int, ...]) -> dict:
    result = {}
    for k in ks:
        hits = [int(text_to_image[t]) in ranking(text[t], image)[:k] for t in range(len(text))]
        result[f"t2i_R@{k}"] = sum(hits) / len(hits)
        hits = []
        for i in range(len(image)):
            captions = {t for t in range(len(text)) if text_to_image[t] == i}
            if captions:  # an image without captions cannot be scored image->text
                hits.append(any(t in captions for t in ranking(image[i], text)[:k]))
        result[f"i2t_R@{k}"] = sum(hits) / len(hits)
    return result


def noisy_captions(seed: int, images: int = 11, per_image: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(images, 16))
    text_to_image = np.repeat(np.arange(images), per_image)
    text = image[text_to_image] + 3.0 * rng.normal(size=(len(text_to_image), 16))
    return text, image, text_to_image


@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_matches_naive_reference(chunk: int) -> None:
    text, image, text_to_image = noisy_captions(1)
    got = recall_at_k(text, image, text_to_image, KS, chunk=chunk)
    expected = naive_recall(text, image, text_to_image, KS)
    assert got == pytest.approx(expected)
    # The noise level keeps the test meaningful: neither metric is saturated at R@1.
    assert 0 < got["t2i_R@1"] < 1 and 0 < got["i2t_R@1"] < 1
    assert got["i2t_R@1"] != got["t2i_R@1"]


def test_image_to_text_counts_any_of_its_captions() -> None:
    image = np.array([[1.0, 0.0], [0.0, 1.0]])
    text = np.array([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    text_to_image = np.array([0, 0, 1, 1])
    got = recall_at_k(text, image, text_to_image, ks=(1,))
    # Image 0's top caption is caption 1, its second caption: a hit although its caption 0 ranks only third.
    # Image 1 ranks caption 0 (image 0's) first, tied with its own caption 3: the tie goes to the lower id.
    assert got["i2t_R@1"] == 0.5
    assert got == pytest.approx(naive_recall(text, image, text_to_image, (1,)))


def test_ties_and_uncaptioned_images_follow_the_reference() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(-1, 2, size=(9, 3)).astype(float)  # exact, heavily tied scores
    text_to_image = np.array([0, 0, 1, 2, 2, 2, 4, 5, 6, 6])  # images 3, 7, 8 are distractors
    text = rng.integers(-1, 2, size=(10, 3)).astype(float)
    got = recall_at_k(text, image, text_to_image, KS, chunk=2)
    assert got == pytest.approx(naive_recall(text, image, text_to_image, KS))


def test_rejects_bad_inputs() -> None:
    text, image = np.zeros((3, 4)), np.zeros((2, 4))
    with pytest.raises(ValueError):
        recall_at_k(text, image, np.array([0, 1]))
    with pytest.raises(ValueError):
        recall_at_k(text, image, np.array([0, 1, 2]))
    with pytest.raises(ValueError):
        recall_at_k(text, np.zeros((2, 5)), np.array([0, 1, 1]))
    with pytest.raises(ValueError):
        recall_at_k(text, image, np.array([0, 1, 1]), ks=(0,))
