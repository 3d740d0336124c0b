"""The parity gate: a bundle must embed like the open_clip model it came from.

The bundle side runs the real runtime path (file bytes -> Pillow/numpy
preprocessing -> onnxruntime; text -> torch-free tokenizer -> onnxruntime).
The reference side runs open_clip's own preprocess, tokenizer and encoders.
"""
from __future__ import annotations

import io
from typing import Any

import numpy as np

from ..bundle import Bundle
from ..errors import ConversionError
from .parity_samples import SAMPLE_TEXTS, sample_images
from .source import LoadedModel

# Minimum cosine between bundle and open_clip embeddings, per precision.
THRESHOLDS = {"fp32": 0.9999, "int8": 0.995}


def measure_parity(loaded: LoadedModel, bundle: Bundle) -> dict[str, Any]:
    """Compare ``bundle`` with ``loaded`` on generated images and varied texts."""
    return {
        "threshold_min_cos": THRESHOLDS[bundle.precision],
        **_text_parity(loaded, bundle),
        **_image_parity(loaded, bundle),
    }


def check_parity(figures: dict[str, Any], precision: str, what: str, reference: str = "open_clip's") -> None:
    """Raise ConversionError unless ``figures`` pass the gate for ``precision`` against ``reference``
    (open_clip's own model, or a published export's fp32 graphs and tokenizer.json)."""
    if not figures["token_ids_identical"]:
        raise ConversionError(f"{what}: the bundle's tokenizer disagrees with {reference}",
                              "this tokenizer is not supported yet; please report it")
    threshold = THRESHOLDS[precision]
    for modality in ("image", "text"):
        worst = figures[modality]["min_cos"]
        if worst < threshold:
            raise ConversionError(
                f"{what}: {modality} embeddings differ from {reference} (min cosine {worst:.5f} < {threshold})",
                "try --precision fp32, or report it")


def _summary(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    cos = np.sum(a * b, axis=1)
    return {"min_cos": round(float(cos.min()), 6), "mean_cos": round(float(cos.mean()), 6), "n": len(cos)}


def _text_parity(loaded: LoadedModel, bundle: Bundle) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    encoder = bundle.text_encoder()
    ours = encoder.tokenize(SAMPLE_TEXTS)
    theirs = loaded.tokenizer(SAMPLE_TEXTS)
    with torch.no_grad():
        reference = F.normalize(loaded.model.encode_text(theirs), dim=-1).numpy()
    return {
        "token_ids_identical": bool(np.array_equal(ours, theirs.numpy())),
        "text": _summary(encoder.encode(SAMPLE_TEXTS), reference),
    }


def _image_parity(loaded: LoadedModel, bundle: Bundle) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    samples = sample_images()
    transform = image_transform_v2(PreprocessCfg(**loaded.preprocess), is_train=False)
    pixels = []
    for data in samples.values():
        with Image.open(io.BytesIO(data)) as im:
            pixels.append(transform(im))
    with torch.no_grad():
        reference = F.normalize(loaded.model.encode_image(torch.stack(pixels)), dim=-1).numpy()
    exact = bundle.image_encoder(draft=False).encode_files(io.BytesIO(d) for d in samples.values())
    # Reduced-size JPEG decoding is a deliberate runtime deviation from open_clip;
    # record what it costs so users can judge it.
    jpegs = [i for i, label in enumerate(samples) if label.endswith(".jpg")]
    drafted = bundle.image_encoder(draft=True).encode_files(io.BytesIO(list(samples.values())[i]) for i in jpegs)
    return {"image": _summary(exact, reference), "image_jpeg_draft": _summary(drafted, reference[jpegs])}
