"""ONNX Runtime encoders for a bundle: the only module that imports onnxruntime.

Sessions are created lazily, so building an encoder is free until it encodes.
Outputs are float32 and L2-normalised (again: int8 graphs drift slightly off
unit norm, and search scores must be cosines).
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from .preprocess import PreprocessConfig, load_image

if TYPE_CHECKING:
    from ..bundle import Bundle


def available_cpus() -> int:
    """CPUs this process may run on (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def create_session(path: Path, *, threads: int | None = None) -> Any:
    """An InferenceSession on the best available device.

    CUDA is used when onnxruntime-gpu sees a GPU; otherwise the CPU with one
    intra-op thread per available core and spinning off, which measured ~8 %
    faster here when image decoding runs in other processes at the same time.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or available_cpus()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: device-discovery warnings are noise to users
    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


class _LazySession:
    def __init__(self, path: Path, input_name: str, output_name: str, threads: int | None) -> None:
        self.path = path
        self.input_name = input_name
        self.output_name = output_name
        self.threads = threads
        self._session: Any = None

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self._session is None:
            self._session = create_session(self.path, threads=self.threads)
        (out,) = self._session.run([self.output_name], {self.input_name: batch})
        return l2_normalize(out)


class ImageEncoder:
    """Encode images with a bundle's image tower, preprocessing per its manifest.

    >>> enc = load_bundle("tiny").image_encoder()                   # doctest: +SKIP
    >>> enc.encode_files(["cat.jpg", "dog.png"]).shape               # doctest: +SKIP
    (2, 512)
    """

    def __init__(self, bundle: Bundle, *, batch_size: int = 16, draft: bool = True,
                 threads: int | None = None) -> None:
        spec = bundle.image
        self.config = PreprocessConfig.from_dict(bundle.preprocess_config)
        self.batch_size = batch_size
        self.draft = draft
        self.embed_dim = bundle.embed_dim
        self._session = _LazySession(bundle.file(spec.file), spec.input, spec.output, threads)

    def load(self, source: str | os.PathLike[str] | BinaryIO) -> np.ndarray:
        """Decode and preprocess one image into a [3,H,W] float32 array."""
        return load_image(source, self.config, draft=self.draft)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Embed already-preprocessed [N,3,H,W] pixels, in batches of ``batch_size``."""
        if len(pixels) == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        parts = [self._session.run(np.ascontiguousarray(pixels[i:i + self.batch_size], dtype=np.float32))
                 for i in range(0, len(pixels), self.batch_size)]
        return np.concatenate(parts)

    def encode_files(self, sources: Iterable[str | os.PathLike[str] | BinaryIO]) -> np.ndarray:
        """Decode, preprocess and embed images; returns [N, D] unit vectors."""
        pixels = [self.load(s) for s in sources]
        if not pixels:
            return np.zeros((0, self.embed_dim), np.float32)
        return self.encode_pixels(np.stack(pixels))


class TextEncoder:
    """Encode texts with a bundle's text tower and its own tokenizer.

    >>> load_bundle("tiny").text_encoder().encode(["a red bicycle"]).shape   # doctest: +SKIP
    (1, 512)
    """

    def __init__(self, bundle: Bundle, *, batch_size: int = 64, threads: int | None = None) -> None:
        from .tokenizer import ClipTokenizer

        spec = bundle.text
        tok = bundle.tokenizer
        self.tokenizer = ClipTokenizer.from_file(
            bundle.file(tok.file), context_length=tok.context_length, sot_id=tok.sot_id, eot_id=tok.eot_id)
        self.batch_size = batch_size
        self.embed_dim = bundle.embed_dim
        self._session = _LazySession(bundle.file(spec.file), spec.input, spec.output, threads)

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        return self.tokenizer.encode(list(texts))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts; returns [N, D] unit vectors."""
        if not texts:
            return np.zeros((0, self.embed_dim), np.float32)
        ids = self.tokenize(texts)
        return np.concatenate([self._session.run(ids[i:i + self.batch_size])
                               for i in range(0, len(ids), self.batch_size)])
