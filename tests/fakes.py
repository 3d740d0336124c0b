"""Deterministic fake encoders: images embed as their mean colour, the words red/green/blue as colour axes.

Ranking logic can then be tested with expected answers and no model.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from clipgrep.embed.preprocess import PreprocessConfig

AXES = {"red": 0, "green": 1, "blue": 2}


def _unit(vectors: np.ndarray) -> np.ndarray:
    return (vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-9)).astype(np.float32)


class FakeImageEncoder:
    """Implements what ``update_index`` needs: ``config``, ``batch_size``, ``encode_pixels``."""

    def __init__(self, dim: int = 8) -> None:
        self.dim = dim
        self.batch_size = 4
        self.config = PreprocessConfig.from_dict({"size": 8, "mean": [0, 0, 0], "std": [1, 1, 1],
                                                  "interpolation": "bilinear", "resize_mode": "squash"})
        self.calls = 0
        self.encoded = 0

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.encoded += len(pixels)
        out = np.zeros((len(pixels), self.dim), np.float32)
        out[:, :3] = pixels.mean(axis=(2, 3))
        out[:, 3] = 0.05  # keeps black images off the origin
        return _unit(out)


class FakeQueryEncoder:
    """Implements ``search.QueryEncoder``: 'red', 'green', 'blue' point along the colour axes."""

    def __init__(self, dim: int = 8) -> None:
        self.dim = dim
        self.images = FakeImageEncoder(dim)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                if word in AXES:
                    out[row, AXES[word]] = 1.0
            if not out[row].any():
                out[row, 4] = 1.0  # unknown words match nothing in particular
        return _unit(out)

    def encode_images(self, paths: Sequence[Path]) -> np.ndarray:
        from clipgrep.embed.preprocess import load_image

        return self.images.encode_pixels(np.stack([load_image(p, self.images.config) for p in paths]))
