"""Teacher-vs-student evaluation for ``clipgrep compress eval``: retrieval quality and encoder speed.

Every figure is measured through the runtime path, the code search runs
(STYLE rule 7): ``load_model`` -> ``Bundle`` -> ``embed.onnx`` encoders, images
decoded by ``index.decode`` as the indexer decodes them. So this module imports
numpy and the runtime only, never torch, and a student is judged exactly as it
will be used, int8 graph and all.

Recall follows the standard multi-caption protocol (``metrics.recall_at_k``).
Speeds are milliseconds per item at batch 1 (a query, a single photo) and batch
16 (indexing), measured in the same run as each other: every model is warmed up
first, then each repeat times every model in turn (the order rotating each
repeat), so that thermal or load drift on a shared machine falls on all models
alike; the figure reported is the median over repeats.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..errors import ClipgrepError
from ..models import Progress, load_model
from .data import PairSet, load_pairs, split_pairs
from .metrics import recall_at_k

SPLITS = ("all", "val", "test")
SPEED_BATCHES = (1, 16)
# Items in one timing sample: 16 runs of one item, or one run of 16.
SPEED_ITEMS = max(SPEED_BATCHES)


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate. ``models[0]`` is the reference (the teacher) that ``compare`` divides by.

    ``split="val"`` evaluates the validation side of ``split_pairs(pairs, val_fraction, seed)``,
    the images a student trained with the same seed and fraction never saw; ``split="test"``
    the published test split of a Karpathy file (5k COCO / 1k Flickr30K images, the paper's
    tables). ``image_root`` is where the pairs' image paths start (default: the file's dir). ``batch_size`` is
    the number of images or captions per ONNX run while encoding the set; ``workers`` the number
    of image decoding processes (``None``: one per CPU, ``0``: in-process).
    """

    pairs: str
    models: tuple[str, ...]
    split: str = "all"
    image_root: str | None = None
    val_fraction: float = 0.1
    seed: int = 0
    ks: tuple[int, ...] = (1, 5, 10)
    batch_size: int = 32
    speed_repeats: int = 3
    workers: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(self.models))
        object.__setattr__(self, "ks", tuple(self.ks))
        if not self.models:
            raise ClipgrepError("no models to evaluate", "name the teacher first, then the students")
        repeated = sorted({m for m in self.models if self.models.count(m) > 1})
        if repeated:
            raise ClipgrepError(f"model {repeated[0]!r} is listed more than once", "name each model once")
        if self.split not in SPLITS:
            raise ClipgrepError(f"unknown split {self.split!r}", f"use one of: {', '.join(SPLITS)}")
        if not self.ks or min(self.ks) < 1:
            raise ClipgrepError(f"recall ks must be 1 or more, got {self.ks}", "use e.g. 1,5,10")
        if self.batch_size < 1 or self.speed_repeats < 1:
            raise ClipgrepError(f"batch_size and speed_repeats must be 1 or more, got {self.batch_size} "
                                f"and {self.speed_repeats}", "use positive integers")


@dataclass
class ModelEval:
    """One model's figures. Sizes come from its manifest; ``params_*`` is ``None`` when the
    manifest records no parameter counts. ``recall`` has keys ``t2i_R@k`` and ``i2t_R@k``
    (fractions in [0, 1]); ``*_ms_b1`` / ``*_ms_b16`` are milliseconds per item, images timed on
    already-decoded pixels, texts including tokenisation."""

    name: str
    bundle_id: str
    precision: str
    embed_dim: int
    params_image: int | None
    params_text: int | None
    bytes_image: int
    bytes_text: int
    n_images: int
    n_captions: int
    recall: dict[str, float] = field(default_factory=dict)
    image_ms_b1: float = 0.0
    image_ms_b16: float = 0.0
    text_ms_b1: float = 0.0
    text_ms_b16: float = 0.0

    @property
    def params(self) -> int | None:
        if self.params_image is None or self.params_text is None:
            return None
        return self.params_image + self.params_text

    @property
    def size_bytes(self) -> int:
        return self.bytes_image + self.bytes_text

    def figures(self) -> dict[str, Any]:
        """Flat, JSON-ready figures: identity, sizes, each recall metric, speeds."""
        return {"name": self.name, "bundle_id": self.bundle_id, "precision": self.precision,
                "embed_dim": self.embed_dim, "n_images": self.n_images, "n_captions": self.n_captions,
                "params_image": self.params_image, "params_text": self.params_text, "params": self.params,
                "bytes_image": self.bytes_image, "bytes_text": self.bytes_text, "bytes": self.size_bytes,
                **self.recall,
                "image_ms_b1": self.image_ms_b1, "image_ms_b16": self.image_ms_b16,
                "text_ms_b1": self.text_ms_b1, "text_ms_b16": self.text_ms_b16}

    def ratios_to(self, reference: ModelEval) -> dict[str, float | None]:
        """Speed-ups (reference ms / own ms: above 1 is faster), params and size ratios (own /
        reference: below 1 is smaller) and recall ratios (own / reference, key ``<metric>_ratio``).
        A ratio whose denominator is zero or unknown is ``None``."""
        ratios = {f"{kind}_speedup_b{b}": _ratio(getattr(reference, f"{kind}_ms_b{b}"),
                                                 getattr(self, f"{kind}_ms_b{b}"))
                  for kind in ("image", "text") for b in SPEED_BATCHES}
        ratios["params_ratio"] = _ratio(self.params, reference.params)
        ratios["size_ratio"] = _ratio(self.size_bytes, reference.size_bytes)
        ratios.update({f"{key}_ratio": _ratio(value, reference.recall.get(key)) for key, value in self.recall.items()})
        return ratios


def evaluate(config: EvalConfig, on_progress: Progress | None = None) -> list[ModelEval]:
    """Recall@K and encoder speeds of every model in ``config.models``, in that order.

    Each model is scored on its own embeddings, so models of different ``embed_dim``
    compare fine. ``on_progress`` gets a short message as each phase starts.

    >>> results = evaluate(EvalConfig("shapes/pairs.jsonl", ("vit-b-32", "tiny-s2")))  # doctest: +SKIP
    >>> compare(results)[1]["image_speedup_b1"]                                      # doctest: +SKIP
    4.1
    """
    step = on_progress or (lambda _: None)
    bundles = [load_model(name, auto_install=False) for name in config.models]
    pairs = _load_split(config)
    images = [bundle.image_encoder(batch_size=config.batch_size) for bundle in bundles]
    texts = [bundle.text_encoder(batch_size=config.batch_size) for bundle in bundles]
    image_emb, speed_pixels = _encode_images(pairs, images, config, step)
    results = []
    for name, bundle, encoder, emb in zip(config.models, bundles, texts, image_emb):
        step(f"encoding {len(pairs.captions)} captions with {name}")
        text_emb = encoder.encode(pairs.captions)
        result = _describe(name, bundle, pairs)
        result.recall = recall_at_k(text_emb, emb, pairs.caption_image, config.ks)
        results.append(result)
    speed_texts = [pairs.captions[i % len(pairs.captions)] for i in range(SPEED_ITEMS)]
    timings = time_models(images, texts, speed_pixels, speed_texts, config.speed_repeats, step)
    for result, timing in zip(results, timings):
        for key, ms in timing.items():
            setattr(result, key, ms)
    return results


def compare(results: Sequence[ModelEval]) -> list[dict[str, Any]]:
    """One flat row per model: its ``figures()`` then its ``ratios_to`` the first model.

    The first model's own ratios are 1.0 (or ``None`` where its figure is 0 or unknown).
    Rows hold only str, int, float and None, ready for ``json.dumps`` and a table.
    """
    if not results:
        return []
    reference = results[0]
    return [{**r.figures(), **r.ratios_to(reference)} for r in results]


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _load_split(config: EvalConfig) -> PairSet:
    pairs = load_pairs(config.pairs, config.image_root)
    if config.split == "val":
        _, pairs = split_pairs(pairs, val_fraction=config.val_fraction, seed=config.seed)
    elif config.split == "test":
        pairs = pairs.published("test")
    if not pairs.images or not pairs.captions:
        raise ClipgrepError(f"the {config.split} split of {config.pairs} has no caption-image pairs",
                            "use --split all, or a larger --val-fraction")
    return pairs


def _describe(name: str, bundle: Bundle, pairs: PairSet) -> ModelEval:
    files = bundle.manifest["files"]
    params = bundle.manifest.get("params") or {}
    return ModelEval(name=name, bundle_id=bundle.bundle_id, precision=bundle.precision,
                     embed_dim=bundle.embed_dim, params_image=params.get("image"), params_text=params.get("text"),
                     bytes_image=files[bundle.image.file]["bytes"], bytes_text=files[bundle.text.file]["bytes"],
                     n_images=len(pairs.images), n_captions=len(pairs.captions))


def _encode_images(pairs: PairSet, encoders: list[Any], config: EvalConfig,
                   step: Progress) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Embeddings of every image by every model, and each model's ``SPEED_ITEMS`` timing pixels.

    Models whose manifests preprocess alike share one decoding pass; the others get
    their own, as their pixels differ. Decoding streams, so memory stays bounded.
    """
    groups: dict[Any, list[int]] = {}  # PreprocessConfig (frozen, hashed by value) -> model indices
    for m, encoder in enumerate(encoders):
        groups.setdefault(encoder.config, []).append(m)
    embeddings: list[np.ndarray] = [np.zeros(0)] * len(encoders)
    speed_pixels: list[np.ndarray] = [np.zeros(0)] * len(encoders)
    for members in groups.values():
        names = ", ".join(config.models[m] for m in members)
        step(f"decoding {len(pairs.images)} images and encoding them with {names}")
        parts: dict[int, list[np.ndarray]] = {m: [] for m in members}
        kept: list[np.ndarray] = []
        for batch in _decoded_batches(pairs, encoders[members[0]].config, config):
            kept.extend(batch[:SPEED_ITEMS - len(kept)])
            for m in members:
                parts[m].append(encoders[m].encode_pixels(batch))
        pixels = np.stack([kept[i % len(kept)] for i in range(SPEED_ITEMS)])
        for m in members:
            embeddings[m] = np.concatenate(parts[m])
            speed_pixels[m] = pixels
    return embeddings, speed_pixels


def _decoded_batches(pairs: PairSet, preprocess: Any, config: EvalConfig) -> Iterator[np.ndarray]:
    """Stacked [B,3,H,W] pixels of the set's images in order; a file that fails to decode is an error."""
    from ..index.decode import decode_images

    decoded = decode_images([str(p) for p in pairs.images], preprocess, workers=config.workers)
    batch: list[np.ndarray] = []
    with contextlib.closing(decoded):  # stops the worker processes on an early exit
        for result in decoded:
            if result.pixels is None:
                raise ClipgrepError(f"cannot decode {pairs.images[result.index]}: {result.skip_reason}",
                                    f"fix or replace the image, or remove it from {config.pairs}")
            batch.append(result.pixels)
            if len(batch) == config.batch_size:
                yield np.stack(batch)
                batch = []
    if batch:
        yield np.stack(batch)


def time_models(images: list[Any], texts: list[Any], pixels: list[np.ndarray], captions: list[str],
                 repeats: int, step: Progress) -> list[dict[str, float]]:
    """Median milliseconds per item for each model: ``{"image_ms_b1": ..., "text_ms_b16": ...}``.

    Text timings include tokenisation with the tokenizer's word cache already warm
    (the set's captions were just encoded), as in a long-running process.
    """
    tasks = []  # per model: (key, run, batches)
    for image_enc, text_enc, pix in zip(images, texts, pixels):
        # Timing batches must reach the session whole, whatever batch_size encoded the set.
        image_enc.batch_size = text_enc.batch_size = SPEED_ITEMS
        tasks.append([(f"{kind}_ms_b{b}", run, [items[i:i + b] for i in range(0, SPEED_ITEMS, b)])
                      for kind, run, items in (("image", image_enc.encode_pixels, pix),
                                               ("text", text_enc.encode, captions))
                      for b in SPEED_BATCHES])
    step(f"timing {len(tasks)} models ({repeats} repeats)")
    for model in tasks:  # warm-up: first runs at a new batch shape allocate and plan
        for _, run, batches in model:
            _ms_per_item(run, batches)
    samples: list[dict[str, list[float]]] = [{} for _ in tasks]
    for r in range(repeats):
        for m in [(r + i) % len(tasks) for i in range(len(tasks))]:  # rotate who goes first
            for key, run, batches in tasks[m]:
                samples[m].setdefault(key, []).append(_ms_per_item(run, batches))
    return [{key: statistics.median(values) for key, values in model.items()} for model in samples]


def _ms_per_item(run: Callable[[Any], object], batches: list[Any]) -> float:
    start = time.perf_counter_ns()
    for batch in batches:
        run(batch)
    return (time.perf_counter_ns() - start) / 1e6 / sum(len(b) for b in batches)
