"""The models clipgrep knows how to fetch: published ONNX exports, with what is known about them.

Every figure says where it comes from. Quality is the publisher's own benchmark
(open_clip's results tables, docs/openclip_results.csv and
docs/openclip_multilingual_retrieval_results.csv in mlfoundations/open_clip);
sizes and speeds were measured here (benchmarks/bench_import.py: ViT-B-32
random weights in Immich's layout, int8, 2 CPU cores, a quiet machine) and are
left empty where they were not. Stdlib only: ``models available`` is instant.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .errors import ClipgrepError

OPEN_CLIP_RESULTS = "open_clip docs/openclip_results.csv"
OPEN_CLIP_MULTILINGUAL = "open_clip docs/openclip_multilingual_retrieval_results.csv"
MEASURED = "benchmarks/bench_import.py: ViT-B-32, random weights, int8, 2 CPU cores, load < 1"

# ViT-B-32's towers in Immich's layout, imported and measured here (see MEASURED).
_B32_SIZES = {"download_mb": 609, "int8_mb": 160}  # int8: MatMul/Gemm/Gather, the conv stays fp32
_B32_SPEED = {"img_per_s_batch16": 109.9, "ms_per_query": 18.9, "source": MEASURED}


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    repo: str
    languages: str
    embed_dim: int
    licence: str
    quality: str | None = None
    quality_source: str | None = None
    download_mb: int | None = None
    int8_mb: int | None = None
    speed: dict[str, Any] | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


CATALOGUE: tuple[CatalogueEntry, ...] = (
    CatalogueEntry(
        "vit-b-32", "immich-app/ViT-B-32__laion2b-s34b-b79k", "en", 512, "MIT (LAION open_clip weights)",
        "ImageNet-1k zero-shot 66.6 %, 38-dataset mean 56.9 %", OPEN_CLIP_RESULTS, **_B32_SIZES, speed=_B32_SPEED,
        note="default: best quality per CPU ms among the MIT/Apache exports here"),
    CatalogueEntry(
        "vit-b-32-openai", "immich-app/ViT-B-32__openai", "en", 512, "MIT (OpenAI CLIP)",
        "ImageNet-1k zero-shot 63.3 %, 38-dataset mean 52.5 %", OPEN_CLIP_RESULTS, **_B32_SIZES, speed=_B32_SPEED,
        note="the image tower xlm-roberta-large-vit-b-32 was trained against"),
    CatalogueEntry(
        "xlm-roberta-base-vit-b-32", "immich-app/XLM-Roberta-Base-ViT-B-32__laion5b_s13b_b90k", "multilingual", 512,
        "MIT (LAION open_clip weights)", "ImageNet-1k zero-shot 62.4 %, 38-dataset mean 56.4 %", OPEN_CLIP_RESULTS,
        speed={"img_per_s_batch16": _B32_SPEED["img_per_s_batch16"], "ms_per_query": None, "source": MEASURED},
        note="ViT-B-32 image tower, XLM-RoBERTa base text tower"),
    CatalogueEntry(
        "xlm-roberta-large-vit-b-32", "immich-app/XLM-Roberta-Large-Vit-B-32", "multilingual", 512,
        "MIT (M-CLIP; check the model card)",
        note="M-CLIP text tower aligned to OpenAI's ViT-B/32 image tower; 560M-parameter text tower"),
    CatalogueEntry(
        "nllb-clip-base-siglip", "immich-app/nllb-clip-base-siglip__v1", "multilingual (NLLB-200 languages)", 768,
        "CC-BY-NC-4.0 (NLLB; non-commercial)",
        "Crossmodal-3600 image retrieval R@1 50.7 % (mean over 36 languages)", OPEN_CLIP_MULTILINGUAL,
        note="SigLIP image tower, NLLB-200 text encoder; search --lang LANG adds the language prefix"),
)
DEFAULT = CATALOGUE[0]


def find(name: str) -> CatalogueEntry | None:
    """The catalogue entry called ``name`` (or published as repo ``name``), or None."""
    for entry in CATALOGUE:
        if name in (entry.name, entry.repo, entry.repo.split("/", 1)[1]):
            return entry
    return None


def entry(name: str) -> CatalogueEntry:
    found = find(name)
    if found is None:
        raise ClipgrepError(f"{name!r} is not in clipgrep's catalogue",
                            "see: clipgrep models available, or pass --from OWNER/REPO or --from DIR")
    return found
