"""Importing a published export (`models add --from DIR`) vs converting the same model, ViT-B-32.

Builds a random-weight ViT-B-32 once (needs the convert extra), writes it in
Immich's published layout (batch-1 graphs, int32 text ids, tokenizer.json) and
as a safetensors checkpoint, then in a fresh CLIPGREP_HOME:

1. times `add_model(from_source=DIR)` (int8: read, quantise, gate) and the
   conversion `add_model(arch=ViT-B-32, checkpoint=...)` of the same weights;
2. measures both int8 bundles: image encode throughput at batch 16 on
   preprocessed arrays (img/s; the import gives the batch-1 image graph a batch
   axis, or runs it row by row where it cannot), text latency per short query
   (ms, tokenisation included), sizes;
3. the speed ratio imported / converted, paired within each of --repeats
   interleaved repeats (so machine load hits both): image at batch 16 and row by
   row (the shape both can run), text per query; and the int8 node counts of
   both towers (the quantisation rule must give the same pattern).

Prints one markdown table and the ratios to stdout; progress to stderr. Medians over --repeats.
Run from the repository root: `.venv/bin/python benchmarks/bench_import.py`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

QUERIES = ["a red bicycle at night", "two cats sleeping on a sofa", "snowy mountain peak", "a bowl of fruit"]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_sources(out: Path) -> tuple[Path, Path]:
    """The Immich-layout export and a checkpoint of the same random ViT-B-32 (cached in ``out``)."""
    export, checkpoint = out / "ViT-B-32__random", out / "vit-b-32-random.safetensors"
    if (export / "textual" / "tokenizer_config.json").is_file() and checkpoint.is_file():
        return export, checkpoint
    import torch
    from safetensors.torch import save_file

    from clipgrep.convert.torch_env import import_open_clip
    from tests.export_support import write_openclip_export

    open_clip = import_open_clip()
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    log("writing the export (Immich layout)...")
    write_openclip_export(model, open_clip.get_model_config("ViT-B-32"), dict(open_clip.get_model_preprocess_cfg(model)),
                          export)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    return export, checkpoint


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def image_throughput(bundle, repeats: int, n: int = 32) -> float:
    encoder = bundle.image_encoder()
    h, w = bundle.preprocess_config["size"]
    pixels = np.random.default_rng(0).standard_normal((n, 3, h, w), dtype=np.float32)
    encoder.encode_pixels(pixels[:16])  # warm-up
    runs = []
    for _ in range(repeats):
        seconds, _ = timed(lambda: encoder.encode_pixels(pixels))
        runs.append(n / seconds)
    return statistics.median(runs)


def image_throughput_rows(bundle, n: int = 16) -> float:
    """img/s encoding one image per run: the shape Immich's batch-1 graphs always run in."""
    encoder = bundle.image_encoder()
    h, w = bundle.preprocess_config["size"]
    pixels = np.random.default_rng(0).standard_normal((n, 3, h, w), dtype=np.float32)
    encoder.encode_pixels(pixels[:1])  # warm-up
    seconds, _ = timed(lambda: [encoder.encode_pixels(pixels[i:i + 1]) for i in range(n)])
    return n / seconds


def query_ms(bundle, repeats: int) -> float:
    encoder = bundle.text_encoder()
    encoder.encode(QUERIES[:1])
    runs = []
    for _ in range(repeats):
        for q in QUERIES:
            seconds, _ = timed(lambda q=q: encoder.encode([q]))
            runs.append(seconds * 1000)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/import"))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    export, checkpoint = build_sources(args.out)
    with tempfile.TemporaryDirectory(dir=args.out) as home:
        os.environ["CLIPGREP_HOME"] = home
        from clipgrep.models import add_model

        log("models add --from DIR (int8)...")
        import_s, imported = timed(lambda: add_model("imported", from_source=str(export)))
        log("models add --arch ViT-B-32 --checkpoint (int8)...")
        convert_s, converted = timed(lambda: add_model("converted", arch="ViT-B-32", checkpoint=checkpoint))
        export_mb = sum(p.stat().st_size for p in export.rglob("*") if p.is_file()) / 1e6
        bundles = {"imported": (imported, import_s), "converted": (converted, convert_s)}
        speed: dict[str, dict[str, list[float]]] = {label: {"img": [], "rows": [], "ms": []} for label in bundles}
        for repeat in range(args.repeats):  # interleaved, the order alternating: the machine is shared
            for label in (list(bundles) if repeat % 2 == 0 else list(bundles)[::-1]):
                log(f"measuring {label} ({repeat + 1}/{args.repeats})...")
                speed[label]["img"].append(image_throughput(bundles[label][0], 1))
                speed[label]["rows"].append(image_throughput_rows(bundles[label][0]))
                speed[label]["ms"].append(query_ms(bundles[label][0], 1))
        rows = []
        for label, (bundle, seconds) in bundles.items():
            quantized = bundle.manifest["quantization"]
            rows.append((label, f"{seconds:.0f}", f"{bundle.size_bytes() / 1e6:.0f}",
                         f"{statistics.median(speed[label]['img']):.1f}",
                         f"{statistics.median(speed[label]['ms']):.1f}", bundle.manifest["tokenizer"]["kind"],
                         f"{quantized['image']['chosen']} / {quantized['text']['chosen']}",
                         f"{bundle.manifest['parity']['image']['min_cos']:.4f}"))
        # Paired ratios: imported / converted within the same repeat, so load shared by both cancels out.
        def ratio(key: str) -> str:
            r = [i / c for i, c in zip(speed["imported"][key], speed["converted"][key])]
            return f"median {statistics.median(r):.3f} (range {min(r):.3f}-{max(r):.3f})"

        ratios = {key: ratio(key) for key in ("img", "rows", "ms")}
        ops = {label: _int8_ops(bundle) for label, (bundle, _) in bundles.items()}
    print(f"ViT-B-32 (random weights), {os.cpu_count()} CPUs visible; export in Immich's layout {export_mb:.0f} MB\n")
    print("| bundle | models add (s) | int8 size (MB) | image img/s (batch 16) | text ms/query | tokenizer "
          "| int8 image / text | gate image min cos |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nimported / converted, paired per repeat ({args.repeats} interleaved repeats): "
          f"image img/s at batch 16 {ratios['img']}; image img/s row by row (the same shape for both) "
          f"{ratios['rows']}; text ms/query {ratios['ms']}")
    for tower in ("image", "text"):
        same = ops["imported"][tower] == ops["converted"][tower]
        print(f"int8 {tower} graphs: quantised op counts {'identical' if same else 'DIFFER'}: "
              f"imported {ops['imported'][tower]}, converted {ops['converted'][tower]}")


def _int8_ops(bundle) -> dict[str, dict[str, int]]:
    """How many nodes of each int8 kind (and Conv) each tower has: the same model must get the same pattern."""
    from collections import Counter

    from clipgrep.convert.dynamic_int8 import read_model

    kinds = ("MatMulInteger", "DynamicQuantizeLinear", "DequantizeLinear", "ConvInteger", "Conv")
    counts = {}
    for tower, spec in (("image", bundle.image), ("text", bundle.text)):
        nodes = Counter(n.op_type for n in read_model(bundle.file(spec.file), with_weights=False).graph.node)
        counts[tower] = {k: nodes[k] for k in kinds if nodes[k]}
    return counts


if __name__ == "__main__":
    main()
