"""Export an open_clip model's two towers to fp32 ONNX with a dynamic batch axis."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_INPUT = "pixel_values"
TEXT_INPUT = "input_ids"
# Not "embedding": the dynamo exporter clashes with the aten::embedding node name.
OUTPUT = "embeds"


@dataclass(frozen=True)
class OnnxTowers:
    image: Path
    text: Path
    embed_dim: int
    params: dict[str, int]


def export_towers(model: Any, image_size: tuple[int, int], context_length: int, workdir: Path) -> OnnxTowers:
    """Write ``image.onnx`` and ``text.onnx`` (unit-normalised outputs) into ``workdir``."""
    import torch

    image_module, text_module = _towers(model)
    # Batch 2: with batch 1 the exporter may specialise the batch dim away.
    pixels = torch.randn(2, 3, *image_size, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(1, 49000, (2, context_length), generator=torch.Generator().manual_seed(0))
    image_path, text_path = workdir / "image.onnx", workdir / "text.onnx"
    _export(image_module, pixels, image_path, IMAGE_INPUT)
    _export(text_module, ids, text_path, TEXT_INPUT)
    with torch.no_grad():
        embed_dim = int(image_module(pixels[:1]).shape[-1])
    return OnnxTowers(image_path, text_path, embed_dim, count_params(model))


def count_params(model: Any) -> dict[str, int]:
    """Parameters of each tower; the logit scale/bias belong to neither."""
    image = sum(p.numel() for p in model.visual.parameters())
    total = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("logit_"))
    return {"image": image, "text": total - image}


def _towers(model: Any) -> tuple[Any, Any]:
    import torch
    import torch.nn.functional as F

    class ImageTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return F.normalize(self.model.encode_image(pixel_values), dim=-1)

    class TextTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return F.normalize(self.model.encode_text(input_ids), dim=-1)

    return ImageTower().eval(), TextTower().eval()


def _export(module: Any, example: Any, path: Path, input_name: str) -> None:
    """Export with the TorchScript exporter, falling back to dynamo where it is gone.

    Measured here on ViT-B-32: TorchScript export takes ~4 s per tower against
    ~12 s for dynamo, and onnxruntime runs both graphs at the same speed.
    Grad stays enabled: under no_grad nn.MultiheadAttention takes a fused fast
    path that the TorchScript exporter cannot translate.
    """
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's own deprecation notice
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=17,
                              input_names=[input_name], output_names=[OUTPUT],
                              dynamic_axes={input_name: {0: "batch"}, OUTPUT: {0: "batch"}})
        return
    except (ImportError, AttributeError, TypeError, RuntimeError):
        if path.exists():
            path.unlink()
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(module, (example,), str(path), dynamo=True, opset_version=18,
                      input_names=[input_name], output_names=[OUTPUT],
                      dynamic_shapes=({0: batch},), external_data=False)
