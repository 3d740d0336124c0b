#!/usr/bin/env python
"""Runtime benchmark: what int8 bundles and reduced-size JPEG decoding buy on this machine.

One run measures, for ViT-B-32 with random weights:

1. image encode throughput (img/s), batch 1 and 16, fp32 vs int8, on preprocessed
   arrays through ``ImageEncoder.encode_pixels`` (decode excluded);
2. text encode latency (ms/query), batch 1, fp32 vs int8, through ``TextEncoder.encode``
   (tokenisation included), and tokenisation alone (µs/query);
3. decode+preprocess throughput for generated 4000x3000 photo-like JPEGs, plain vs
   draft (reduced-size) decoding, and what draft costs in pixels and embeddings;
4. session load time, fp32 vs int8, image and text.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_runtime.py [--out bench-out] [--repeats 3] [--images 12]

The markdown table goes to stdout, progress to stderr. Bundles and photos are cached
under ``--out``, so only the first run pays for conversion (which needs the convert
extra: torch + open_clip).
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from clipgrep.bundle import Bundle, load_bundle
from clipgrep.embed.onnx import available_cpus, create_session
from clipgrep.embed.preprocess import PreprocessConfig, load_image
from clipgrep.errors import BundleError

ARCH = "ViT-B-32"
PRECISIONS = ("fp32", "int8")
SEED = 0  # fixes the random weights, so a bundle rebuilt alone matches its cached sibling

# Batch 1 is the latency case (one file at a time); 16 is the indexer's default batch.
BATCH_SIZES = (1, 16)
IMAGES_PER_BATCH1_RUN = 16
BATCHES_PER_BATCH16_RUN = 2

# Short queries of the kind people type into a search box (well under 77 tokens).
QUERIES = [
    "a dog on the beach", "red bicycle", "sunset over the mountains", "birthday cake with candles",
    "my cat sleeping", "snow in the city at night", "receipt", "whiteboard with notes",
    "people hiking in the forest", "a blue car", "wedding photo", "screenshot of a chat",
    "coffee cup on a desk", "fireworks", "boat on a lake", "kids playing football",
]
TOKENIZE_PASSES = 50  # tokenising is ~100 µs; loop over the queries many times for a stable figure

# Generated "photos": what a phone writes (12 MP, quality 90, ~2 MB), with enough texture that
# JPEG decoding does real work. Pure noise would be unrealistic; pure gradients compress too well.
PHOTO_SIZE = (4000, 3000)
PHOTO_QUALITY = 90
PHOTO_BLOCK = 50
PHOTO_NOISE_SIGMA = 4.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- results -------------------------------------------------------------------------------


@dataclass
class Result:
    """One table row: per-repeat samples for a baseline (fp32 / plain) and a variant (int8 / draft).

    Either side may be empty (a figure that exists for one side only). The ratio is
    always variant / baseline, whatever the unit, so read it with the unit in mind.
    """

    section: str
    what: str
    unit: str
    baseline: list[float] = field(default_factory=list)
    variant: list[float] = field(default_factory=list)
    digits: int = 1

    def median(self, samples: list[float]) -> float | None:
        return statistics.median(samples) if samples else None

    @property
    def ratio(self) -> float | None:
        base, var = self.median(self.baseline), self.median(self.variant)
        return var / base if base and var is not None else None

    @property
    def spread(self) -> float | None:
        """Largest (max - min) / median of either side: how much to trust the medians."""
        spreads = [(max(s) - min(s)) / statistics.median(s)
                   for s in (self.baseline, self.variant) if len(s) > 1 and statistics.median(s)]
        return max(spreads) if spreads else None

    def cells(self) -> list[str]:
        def number(value: float | None) -> str:
            return "—" if value is None else f"{value:,.{self.digits}f}"

        ratio, spread = self.ratio, self.spread
        return [self.section, self.what, self.unit, number(self.median(self.baseline)),
                number(self.median(self.variant)), "—" if ratio is None else f"{ratio:.2f}×",
                "—" if spread is None else f"{spread:.0%}"]


def render_table(results: Sequence[Result]) -> str:
    header = ["#", "Measurement", "Unit", "fp32 / plain", "int8 / draft", "ratio (right/left)", "spread"]
    align = ["---", "---", "---", "---:", "---:", "---:", "---:"]
    rows = [header, align] + [r.cells() for r in results]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


# --- helpers -------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(items: Sequence, repeat: int) -> list:
    """Items in order on even repeats and reversed on odd ones.

    On a shared, thermally throttled machine whatever runs first (or second) in a
    repeat is systematically favoured; alternating spreads that bias over both sides.
    """
    return list(items) if repeat % 2 == 0 else list(reversed(items))


def machine_facts() -> list[str]:
    import onnxruntime as ort
    import PIL

    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return [
        f"- CPU: {cpu_model}; usable cores (sched_getaffinity): {available_cpus()} "
        f"(= onnxruntime intra-op threads)",
        f"- onnxruntime {ort.__version__} ({', '.join(ort.get_available_providers())}), "
        f"numpy {np.__version__}, Pillow {PIL.__version__}, Python {platform.python_version()}",
        f"- load average at start (1/5/15 min): {load}",
    ]


# --- inputs: bundles and photos ------------------------------------------------------------


def ensure_bundles(out: Path) -> tuple[dict[str, Bundle], float | None]:
    """fp32 and int8 bundles of random-weight ViT-B-32, built once and cached under ``out``.

    Returns the bundles and the conversion time in seconds (None when all were cached).
    One ONNX export feeds both precisions, as ``clipgrep compress export`` does.
    """
    root = out / "bundles"
    paths = {p: root / f"{ARCH.lower()}-random-{p}" for p in PRECISIONS}
    bundles: dict[str, Bundle] = {}
    for precision, path in paths.items():
        if path.exists():
            try:
                bundles[precision] = load_bundle(path)
            except BundleError as e:  # a half-written or stale cache: ours to rebuild
                log(f"cached bundle {path} unusable ({e}); rebuilding it")
                shutil.rmtree(path)
    missing = [p for p in PRECISIONS if p not in bundles]
    if not missing:
        log(f"using cached bundles in {root}")
        return bundles, None

    from clipgrep.convert.pipeline import assemble_bundle, export_onnx
    from clipgrep.convert.source import ModelSource, load_model
    from clipgrep.convert.torch_env import import_torch

    log(f"converting {ARCH} (random weights) to {', '.join(missing)} bundles in {root} ...")
    start = time.perf_counter()
    import_torch().manual_seed(SEED)
    loaded = load_model(ModelSource(ARCH, random_init=True))
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=root) as work:
        towers = export_onnx(loaded, Path(work))
        for precision in missing:
            log(f"  assembling {precision} (quantise + parity gate)")
            bundles[precision] = assemble_bundle(loaded, towers, paths[precision], name=f"bench-{precision}",
                                                 precision=precision, on_progress=lambda s: log(f"    {s}"))
    seconds = time.perf_counter() - start
    del loaded
    gc.collect()  # drop the torch model (~600 MB) before timing anything
    log(f"conversion took {seconds:.1f} s")
    return bundles, seconds


def make_photo(seed: int) -> Image.Image:
    """A photo-like RGB image: smooth gradients, 50-px blocks (edges), small sensor-like noise."""
    width, height = PHOTO_SIZE
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    a, b, phase = (rng.uniform(-1, 1, 3).astype(np.float32) for _ in range(3))  # per-channel, shape (3,)
    img = 128 + 70 * (a * x + b * y) + 30 * np.sin(6 * (a * y - b * x + phase))
    # Blocks vary mostly in brightness, a little in colour, like real surfaces.
    grid = (-(-height // PHOTO_BLOCK), -(-width // PHOTO_BLOCK))
    blocks = rng.normal(0, 20, (*grid, 1)) + rng.normal(0, 7, (*grid, 3))
    img += blocks.astype(np.float32).repeat(PHOTO_BLOCK, 0).repeat(PHOTO_BLOCK, 1)[:height, :width]
    img += PHOTO_NOISE_SIGMA * rng.standard_normal(img.shape, dtype=np.float32)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def ensure_photos(out: Path, count: int) -> list[Path]:
    """``count`` generated JPEGs under ``out/photos``, written once (deterministic per index)."""
    folder = out / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"photo-{i:02d}.jpg" for i in range(count)]
    todo = [(i, p) for i, p in enumerate(paths) if not p.exists()]
    if todo:
        log(f"generating {len(todo)} {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} JPEGs in {folder} ...")
    for index, path in todo:
        partial = path.with_suffix(".partial")  # so an interrupted run never leaves a truncated photo
        make_photo(SEED + index).save(partial, format="JPEG", quality=PHOTO_QUALITY)
        partial.rename(path)
    return paths


# --- 1. image encode -----------------------------------------------------------------------


def bench_image_encode(bundles: dict[str, Bundle], pixels: np.ndarray, repeats: int) -> list[Result]:
    """img/s of ``encode_pixels`` at each batch size; one warmed-up encoder per precision."""
    encoders = {p: b.image_encoder(batch_size=max(BATCH_SIZES)) for p, b in bundles.items()}
    for precision, encoder in encoders.items():
        log(f"  warming up {precision} image session")
        for batch in BATCH_SIZES:  # the first run of each shape allocates; keep that out of the figures
            encoder.encode_pixels(pixels[:batch])

    counts = {1: IMAGES_PER_BATCH1_RUN, 16: 16 * BATCHES_PER_BATCH16_RUN}
    inputs = {b: np.resize(pixels, (counts[b], *pixels.shape[1:])) for b in BATCH_SIZES}  # tiles the photos
    samples: dict[tuple[str, int], list[float]] = {(p, b): [] for p in PRECISIONS for b in BATCH_SIZES}
    for repeat in range(repeats):
        for precision in alternate(PRECISIONS, repeat):
            encoder = encoders[precision]
            for batch in BATCH_SIZES:
                data = inputs[batch]
                # Slice the batches here so each encode_pixels call is exactly one session run.
                seconds = timed(lambda: [encoder.encode_pixels(data[i:i + batch])
                                         for i in range(0, len(data), batch)])
                samples[precision, batch].append(len(data) / seconds)
                log(f"  repeat {repeat + 1}: image {precision} batch {batch}: {len(data) / seconds:.1f} img/s")
    return [Result("1", f"Image encode, batch {b} (encode_pixels, no decode)", "img/s",
                   samples["fp32", b], samples["int8", b]) for b in BATCH_SIZES]


# --- 2. text encode ------------------------------------------------------------------------


def bench_text(bundles: dict[str, Bundle], repeats: int) -> list[Result]:
    """ms/query of ``encode([query])`` (tokenising included) and µs/query of tokenising alone."""
    encoders = {p: b.text_encoder() for p, b in bundles.items()}
    for precision, encoder in encoders.items():
        log(f"  warming up {precision} text session")
        encoder.encode(QUERIES[:2])  # session creation, plus ftfy/regex caches in the tokenizer

    latency: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    tokenize: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for repeat in range(repeats):
        for precision in alternate(PRECISIONS, repeat):
            encoder = encoders[precision]
            seconds = timed(lambda: [encoder.encode([q]) for q in QUERIES])
            latency[precision].append(seconds * 1e3 / len(QUERIES))
            # Same tokenizer file in both bundles; measured per encoder to show its share of each latency.
            seconds = timed(lambda: [encoder.tokenize([q]) for _ in range(TOKENIZE_PASSES) for q in QUERIES])
            tokenize[precision].append(seconds * 1e6 / (TOKENIZE_PASSES * len(QUERIES)))
            log(f"  repeat {repeat + 1}: text {precision}: {latency[precision][-1]:.1f} ms/query, "
                f"tokenize {tokenize[precision][-1]:.0f} µs/query")
    return [
        Result("2", "Text encode, batch 1, short queries (encode, incl. tokenize)", "ms/query",
               latency["fp32"], latency["int8"]),
        Result("2", "Tokenize only, batch 1", "µs/query", tokenize["fp32"], tokenize["int8"], digits=0),
    ]


# --- 3. decode + preprocess ----------------------------------------------------------------


def bench_decode(photos: list[Path], config: PreprocessConfig, repeats: int) -> list[Result]:
    """img/s of ``load_image`` on the photos, plain (draft=False) vs reduced-size (draft=True)."""
    modes = (False, True)
    for draft in modes:  # pull the files into the page cache and warm Pillow up
        load_image(photos[0], config, draft=draft)
    samples: dict[bool, list[float]] = {m: [] for m in modes}
    for repeat in range(repeats):
        for draft in alternate(modes, repeat):
            seconds = timed(lambda: [load_image(p, config, draft=draft) for p in photos])
            samples[draft].append(len(photos) / seconds)
            log(f"  repeat {repeat + 1}: decode draft={draft}: {samples[draft][-1]:.1f} img/s")
    return [Result("3", f"Decode+preprocess {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} JPEG (load_image)", "img/s",
                   samples[False], samples[True])]


def draft_cost(photos: list[Path], config: PreprocessConfig, bundles: dict[str, Bundle]) -> list[Result]:
    """What draft decoding changes: model-input pixels, and int8 embeddings of the same photos.

    The int8-vs-fp32 cosine on plain decodes is shown next to it as a yardstick: a draft
    cost well below the quantisation cost is noise nobody will see in search results.
    Random weights make these cosines indicative only (a trained model may be more or
    less sensitive to the same pixel change).
    """
    plain = np.stack([load_image(p, config, draft=False) for p in photos])
    drafted = np.stack([load_image(p, config, draft=True) for p in photos])
    pixel_diff = float(np.abs(plain - drafted).mean())

    int8 = bundles["int8"].image_encoder()
    int8_plain = int8.encode_pixels(plain)
    cos_draft = np.sum(int8_plain * int8.encode_pixels(drafted), axis=1)  # rows are unit vectors
    cos_quant = np.sum(int8_plain * bundles["fp32"].image_encoder().encode_pixels(plain), axis=1)
    return [
        Result("3", "Draft vs plain: mean abs pixel difference (normalised model input)", "(x−mean)/std",
               variant=[pixel_diff], digits=4),
        Result("3", "Draft vs plain: cosine of int8 image embeddings, min", "cosine",
               variant=[float(cos_draft.min())], digits=5),
        Result("3", "Draft vs plain: cosine of int8 image embeddings, mean", "cosine",
               variant=[float(cos_draft.mean())], digits=5),
        Result("3", "Yardstick: int8 vs fp32 image embeddings (plain decode), min", "cosine",
               variant=[float(cos_quant.min())], digits=5),
    ]


# --- 4. session load -----------------------------------------------------------------------


def bench_session_load(bundles: dict[str, Bundle], pixel: np.ndarray, repeats: int) -> list[Result]:
    """ms to create each session, and to get the first vector out of a fresh encoder.

    In-process with a warm file cache (not a cold process): the figures exclude Python
    and onnxruntime import time and disk reads, so they are lower bounds for a first search.
    """
    create = {(m, p): [] for m in ("image", "text") for p in PRECISIONS}
    first = {(m, p): [] for m in ("image", "text") for p in PRECISIONS}
    for repeat in range(repeats):
        for precision in alternate(PRECISIONS, repeat):
            bundle = bundles[precision]
            for modality, spec in (("image", bundle.image), ("text", bundle.text)):
                create[modality, precision].append(timed(lambda: create_session(bundle.file(spec.file))) * 1e3)
            image, text = bundle.image_encoder(), bundle.text_encoder()  # lazy: no session yet
            first["image", precision].append(timed(lambda: image.encode_pixels(pixel[None])) * 1e3)
            first["text", precision].append(timed(lambda: text.encode([QUERIES[0]])) * 1e3)
            del image, text
            gc.collect()
            log(f"  repeat {repeat + 1}: {precision} sessions: image {create['image', precision][-1]:.0f} ms, "
                f"text {create['text', precision][-1]:.0f} ms")
    results = []
    for modality in ("image", "text"):
        results.append(Result("4", f"{modality.capitalize()} session load (create_session only)", "ms",
                               create[modality, "fp32"], create[modality, "int8"], digits=0))
        results.append(Result("4", f"{modality.capitalize()} first encode, fresh encoder (load + 1 run)", "ms",
                              first[modality, "fp32"], first[modality, "int8"], digits=0))
    return results


# --- main ----------------------------------------------------------------------------------


def bundle_facts(bundles: dict[str, Bundle], conversion_s: float | None) -> list[str]:
    quant = bundles["int8"].manifest.get("quantization", {})
    chosen = ", ".join(f"{tower}: {info.get('chosen')}" for tower, info in quant.items()) or "n/a"
    sizes = ", ".join(f"{p} {b.size_bytes() / 1e6:.0f} MB" for p, b in bundles.items())
    built = f"converted in this run in {conversion_s:.1f} s" if conversion_s is not None else "cached"
    return [f"- Bundles: {ARCH}, random weights (seed {SEED}), {built}; sizes {sizes}; "
            f"int8 quantised variant chosen at conversion: {chosen}"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out"),
                        help="cache for bundles and photos (default: bench-out/)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; medians are reported (default 3)")
    parser.add_argument("--images", type=int, default=12, help="generated photos to decode (default 12)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.images < 1:
        parser.error("--repeats and --images must be at least 1")

    facts = machine_facts()
    bundles, conversion_s = ensure_bundles(args.out)
    photos = ensure_photos(args.out, args.images)
    photo_mb = statistics.mean(p.stat().st_size for p in photos) / 1e6
    config = PreprocessConfig.from_dict(bundles["fp32"].preprocess_config)
    # Real preprocessed photos as encoder input: content does not change the work, but it is honest.
    pixels = np.stack([load_image(p, config, draft=True) for p in photos])

    results: list[Result] = []
    log("1. image encode")
    results += bench_image_encode(bundles, pixels, args.repeats)
    log("2. text encode")
    results += bench_text(bundles, args.repeats)
    log("3. decode + preprocess")
    results += bench_decode(photos, config, args.repeats)
    results += draft_cost(photos, config, bundles)
    log("4. session load")
    results += bench_session_load(bundles, pixels[0], args.repeats)

    print(f"## clipgrep runtime benchmark ({args.repeats} repeats, medians)\n")
    print("\n".join(facts + bundle_facts(bundles, conversion_s)))
    print(f"- Photos: {len(photos)} generated {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} JPEGs, quality {PHOTO_QUALITY}, "
          f"mean {photo_mb:.2f} MB, in {args.out / 'photos'}")
    print()
    print(render_table(results))
    print()
    print("Ratio = right column / left column (int8/fp32 or draft/plain): above 1 is faster for img/s, "
          "below 1 is faster for ms. Spread = largest (max−min)/median over repeats of either column. "
          "Session figures are in-process with a warm file cache, not a cold process. "
          "Cosines come from random weights: indicative only.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
