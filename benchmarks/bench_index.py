#!/usr/bin/env python
"""Index and cold-search benchmark: is indexing encoder-bound, and are no-op runs and searches instant?

One run measures, with the int8 ViT-B-32 random-weight bundle installed as a model:

1. end-to-end index throughput (img/s) of ``update_index`` (default ``IndexOptions``: decode
   worker processes, draft decoding) on N generated 4000x3000 photo-like JPEGs in a fresh
   ``CLIPGREP_HOME``, next to encoder-only throughput (``encode_pixels``, batch 16) and
   decode-only throughput (``decode_images``, default workers), and the ratio
   end-to-end / encoder-only (target >= 0.45);
2. a no-op re-index of 100,000 files (hard links to a few tiny PNGs): a fresh
   ``clipgrep index`` process (target <= 2 s), the same ``update_index`` in-process, and
   whether the no-op process imported lancedb (it must not: the snapshot fast path);
3. cold search: a fresh ``clipgrep search`` process on 10k- and 100k-row indexes
   (target <= 0.5 s), with ``python -c "import numpy, onnxruntime"`` and ``python -c pass``
   as yardsticks measured in the same run.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_index.py [--out bench-out] [--photos 48] [--quick]

The markdown table goes to stdout, progress to stderr. Bundles and photos are shared with
``bench_runtime.py``; the 100k-file tree and its two prepared indexes are cached under
``--out/index-bench`` (the first run builds them in a few minutes).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# This script's directory is sys.path[0] when run as a script: reuse bench_runtime's bundle and
# photo caches, machine facts and timing helpers, so both benchmarks describe the same inputs.
import bench_runtime as rt
import numpy as np
from PIL import Image

from clipgrep.bundle import Bundle
from clipgrep.embed.onnx import available_cpus
from clipgrep.embed.preprocess import PreprocessConfig, load_image
from clipgrep.errors import ClipgrepError
from clipgrep.paths import HOME_ENV

log, timed, alternate = rt.log, rt.timed, rt.alternate

MODEL_NAME = "bench-int8"
QUERY = "a red bicycle at night"
ENCODE_BATCH = 16  # the indexer's default batch (ImageEncoder.batch_size)

# The no-op / search tree: DIRS x FILES_PER_DIR hard links to DISTINCT tiny PNGs. Links cost
# one directory entry each (100k in a few seconds, no disk), and since every file has the
# content of one of DISTINCT originals, indexing encodes only those and reuses their vectors
# for the rest (fingerprint match), so a 100k-row index builds in minutes, not hours.
TREE_DIRS = 100
FILES_PER_DIR = 1000
DISTINCT = 10
SMALL_INDEX_DIRS = 10  # the first 10 directories: the 10k-row index
PNG_SIZE = 32
# Options for building the fixture indexes only (the timed runs use the defaults): one LanceDB
# commit per 20k reused rows instead of 256: crash safety is irrelevant for a fixture, and ~390
# commits would dominate the build.
BUILD_OPTIONS = dict(commit_rows=20_000)


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    text: str                       # as printed, e.g. "≤ 2 s"
    met: Callable[[float], bool]


def at_most(limit: float, unit: str = "") -> Target:
    return Target(f"≤ {limit:g}{' ' + unit if unit else ''}", lambda v: v <= limit)


def at_least(limit: float, unit: str = "") -> Target:
    return Target(f"≥ {limit:g}{' ' + unit if unit else ''}", lambda v: v >= limit)


@dataclass
class Row:
    """One table row: samples (the median is shown), optional target, free-form notes."""

    section: str
    what: str
    unit: str
    samples: list[float] = field(default_factory=list)
    target: Target | None = None
    digits: int = 2
    notes: list[str] = field(default_factory=list)
    shown: str | None = None        # replaces the number, e.g. "no" for a yes/no row

    @property
    def value(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def spread(self) -> float | None:
        """(max - min) / median over the samples: how much to trust the median."""
        if len(self.samples) < 2 or not self.value:
            return None
        return (max(self.samples) - min(self.samples)) / self.value

    def verdict(self) -> str:
        if self.target is None or self.value is None:
            return "—"
        return "pass" if self.target.met(self.value) else "**FAIL**"

    def cells(self) -> list[str]:
        value = self.shown if self.shown is not None else (
            "—" if self.value is None else f"{self.value:,.{self.digits}f}")
        notes = list(self.notes)
        if len(self.samples) > 1:
            notes.append(f"n={len(self.samples)}, spread {self.spread:.0%}" if self.spread is not None
                         else f"n={len(self.samples)}")
        return [self.section, self.what, value, self.unit, self.target.text if self.target else "—",
                self.verdict(), "; ".join(notes) or "—"]


def render_table(rows: Sequence[Row]) -> str:
    header = ["#", "Measurement", "Value", "Unit", "Target", "Result", "Notes"]
    align = ["---", "---", "---:", "---", "---", "---", "---"]
    lines = [header, align] + [r.cells() for r in rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


# --- helpers -------------------------------------------------------------------------------


@contextmanager
def clipgrep_home(home: Path) -> Iterator[Path]:
    """Point this process's clipgrep at ``home`` (paths.home() reads the variable on every call)."""
    saved = os.environ.get(HOME_ENV)
    os.environ[HOME_ENV] = str(home)
    try:
        yield home
    finally:
        if saved is None:
            os.environ.pop(HOME_ENV, None)
        else:
            os.environ[HOME_ENV] = saved


def install_model(bundle: Bundle) -> Bundle:
    """The bundle installed as MODEL_NAME in the current CLIPGREP_HOME (copied unless already there)."""
    from clipgrep.models import add_model, load_model

    try:
        installed = load_model(MODEL_NAME, auto_install=False)
        if installed.bundle_id == bundle.bundle_id:
            return installed
    except ClipgrepError:
        pass
    log(f"  installing {bundle.path} as model {MODEL_NAME!r} in {os.environ[HOME_ENV]}")
    return add_model(MODEL_NAME, checkpoint=bundle.path, replace=True)


def clipgrep_command() -> list[str]:
    """The console script users run, so its wall time includes its real startup."""
    script = Path(sys.executable).with_name("clipgrep")
    return [str(script)] if script.exists() else [sys.executable, "-m", "clipgrep"]


def run_process(command: Sequence[str], home: Path | None = None) -> tuple[float, subprocess.CompletedProcess]:
    """Wall seconds of a fresh process (fork+exec to exit), and its captured result."""
    env = dict(os.environ)
    if home is not None:
        env[HOME_ENV] = str(home)
    start = time.perf_counter()
    done = subprocess.run(list(command), env=env, capture_output=True, text=True)
    return time.perf_counter() - start, done


def imported_modules(command_tail: Sequence[str], home: Path) -> set[str]:
    """Top-level packages a ``python -X importtime -m clipgrep ...`` process imported."""
    _, done = run_process([sys.executable, "-X", "importtime", "-m", "clipgrep", *command_tail], home)
    names = set()
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def check_ok(done: subprocess.CompletedProcess, what: str) -> None:
    if done.returncode != 0:
        raise SystemExit(f"{what} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")


# --- 1. end-to-end index throughput --------------------------------------------------------


def bench_throughput(bundle: Bundle, photos: list[Path], out: Path, repeats: int) -> list[Row]:
    """img/s of update_index, encode_pixels and decode_images on the same photos, interleaved."""
    from clipgrep.index.build import IndexOptions, update_index
    from clipgrep.index.decode import SMALL_JOB, decode_images

    n = len(photos)
    config = PreprocessConfig.from_dict(bundle.preprocess_config)
    samples: dict[str, list[float]] = {"index": [], "encode": [], "decode": []}
    with tempfile.TemporaryDirectory(prefix="throughput-home-", dir=out) as tmp, clipgrep_home(Path(tmp)) as home:
        installed = install_model(bundle)
        root = link_photos(photos, home / "photos")
        pixels = np.stack([load_image(p, config, draft=True) for p in photos])
        encoder = installed.image_encoder(batch_size=ENCODE_BATCH)
        encoder.encode_pixels(pixels[:ENCODE_BATCH])  # session creation and first-run allocations
        # One-off process costs, paid before timing so that repeats are alike: the fork server
        # (started by the first pool of a process, ~0.3 s) and `import lancedb` (~1 s).
        list(decode_images([str(p) for p in photos[:16]], config))
        from clipgrep.store import _import_lancedb
        lancedb_s = timed(_import_lancedb)

        def index_once() -> None:
            shutil.rmtree(home / "index", ignore_errors=True)  # a fresh index every repeat
            report = update_index([root], bundle=installed, options=IndexOptions())
            if report.added != n or report.skipped:
                raise SystemExit(f"index run added {report.added} of {n} photos, skipped {report.skipped}")

        def decode_once() -> None:
            skipped = [d for d in decode_images([str(p) for p in photos], config) if d.pixels is None]
            if skipped:
                raise SystemExit(f"decode skipped {len(skipped)} photos: {skipped[0].skip_reason}")

        actions = {"index": index_once, "encode": lambda: encoder.encode_pixels(pixels), "decode": decode_once}
        for repeat in range(repeats):
            for name in alternate(list(actions), repeat):
                samples[name].append(n / timed(actions[name]))
                log(f"  repeat {repeat + 1}: {name}: {samples[name][-1]:.1f} img/s")

    ratios = [i / e for i, e in zip(samples["index"], samples["encode"])]  # per repeat: same conditions
    workers = "in-process (< SMALL_JOB photos)" if n < SMALL_JOB else f"{available_cpus()} worker processes"
    return [
        Row("1", f"Index end-to-end, {n} photos (update_index, default IndexOptions, fresh index)", "img/s",
            samples["index"], digits=1, notes=[f"excludes `import lancedb` ({lancedb_s:.2f} s, once per process)"]),
        Row("1", f"Encoder only (encode_pixels, batch {ENCODE_BATCH}, pre-decoded)", "img/s",
            samples["encode"], digits=1),
        Row("1", "Decode only (decode_images, default workers, draft)", "img/s", samples["decode"], digits=1,
            notes=[workers]),
        Row("1", "Ratio end-to-end / encoder only", "×", ratios, target=at_least(0.45),
            notes=["median of per-repeat ratios"]),
    ]


def link_photos(photos: list[Path], folder: Path) -> Path:
    """A folder holding exactly these photos (hard links: no copy, same page-cache pages)."""
    folder.mkdir(parents=True, exist_ok=True)
    for photo in photos:
        try:
            os.link(photo, folder / photo.name)
        except OSError:  # another file system: copy instead
            shutil.copy2(photo, folder / photo.name)
    return folder


# --- the 100k-file tree and its indexes ----------------------------------------------------


def tree_layout() -> dict[str, int]:
    return {"dirs": TREE_DIRS, "files_per_dir": FILES_PER_DIR, "distinct": DISTINCT, "png_size": PNG_SIZE}


def ensure_tree(base: Path) -> Path:
    """``base/tree/dNNN/img-NNNN.png``: TREE_DIRS x FILES_PER_DIR hard links to DISTINCT PNGs.

    The originals are ``tree/d000/img-0000..`` (so any subset of directories from d000 on
    contains them all). A stamp written last marks a complete tree; anything else is rebuilt,
    together with the indexes made from it.
    """
    tree, stamp = base / "tree", base / "tree.json"
    if stamp.exists() and json.loads(stamp.read_text()) == tree_layout():
        return tree
    log(f"creating {TREE_DIRS * FILES_PER_DIR:,} hard links to {DISTINCT} PNGs in {tree} ...")
    shutil.rmtree(base, ignore_errors=True)
    originals = [tree / "d000" / f"img-{i:04d}.png" for i in range(DISTINCT)]
    originals[0].parent.mkdir(parents=True)
    old = time.time() - 86_400
    for i, path in enumerate(originals):
        make_png(i).save(path)
        # Well in the past: a file modified within 2 s of being indexed is "racy" and would be
        # fingerprinted again on every run, which is not the no-op case being measured.
        os.utime(path, (old, old))
    for d in range(TREE_DIRS):
        folder = tree / f"d{d:03d}"
        folder.mkdir(exist_ok=True)
        for f in range(FILES_PER_DIR):
            path = folder / f"img-{f:04d}.png"
            if not path.exists():
                os.link(originals[(d * FILES_PER_DIR + f) % DISTINCT], path)
    stamp.write_text(json.dumps(tree_layout()))
    return tree


def make_png(seed: int) -> Image.Image:
    """A tiny RGB image, distinct per seed (random colours)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (PNG_SIZE, PNG_SIZE, 3), dtype=np.uint8))


def ensure_index(home: Path, roots: list[Path], originals: list[Path], bundle: Bundle) -> tuple[Bundle, int]:
    """An up-to-date index of ``roots`` in ``home``; returns the installed bundle and its row count.

    A new index first indexes the DISTINCT originals alone: reuse only matches files already
    stored, so indexing the whole tree straight away would encode every file.
    """
    from clipgrep.index.build import IndexOptions, update_index
    from clipgrep.paths import snapshot_dir
    from clipgrep.snapshot import read_snapshot

    with clipgrep_home(home):
        installed = install_model(bundle)
        if read_snapshot(snapshot_dir(installed.bundle_id)) is None:
            log(f"  indexing the {len(originals)} distinct originals in {home}")
            update_index(originals, bundle=installed)
        start = time.perf_counter()
        report = update_index(roots, bundle=installed, options=IndexOptions(**BUILD_OPTIONS))
        log(f"  {home.name}: {report.rows:,} rows ({report.reused:,} reused, {report.added} encoded, "
            f"{report.unchanged:,} unchanged) in {time.perf_counter() - start:.1f} s")
    return installed, report.rows


# --- 2. no-op re-index ---------------------------------------------------------------------


def bench_noop(home: Path, tree: Path, bundle: Bundle, rows: int, samples: int) -> list[Row]:
    """A re-index that finds nothing to do: fresh CLI processes, then in-process update_index."""
    from clipgrep.index.build import IndexOptions, update_index

    tail = ["index", str(tree), "--model", MODEL_NAME, "--no-progress", "--json"]
    cli: list[float] = []
    in_process: list[float] = []
    for i in range(samples):
        seconds, done = run_process([*clipgrep_command(), *tail], home)
        check_ok(done, "clipgrep index")
        report = json.loads(done.stdout)
        if report["unchanged"] != rows or report["encoded"] or report["added"] or report["removed"]:
            raise SystemExit(f"the no-op run was not a no-op: {done.stdout}")
        cli.append(seconds)
        with clipgrep_home(home):
            in_process.append(timed(lambda: update_index([tree], bundle=bundle, options=IndexOptions())))
        log(f"  run {i + 1}: CLI {cli[-1]:.2f} s, in-process {in_process[-1]:.2f} s")

    modules = imported_modules(tail, home)  # a separate run: -X importtime slows the process down
    heavy = sorted(modules & {"lancedb", "pyarrow", "onnxruntime", "torch", "pandas"})
    return [
        Row("2", f"No-op re-index, {rows:,} files: `clipgrep index` process wall", "s", cli,
            target=at_most(2, "s")),
        Row("2", f"No-op re-index, {rows:,} files: update_index in-process", "s", in_process,
            notes=["imports already paid"]),
        Row("2", "No-op re-index process imported lancedb", "yes/no", [float("lancedb" in modules)],
            target=Target("no", lambda v: v == 0), shown="yes" if "lancedb" in modules else "no",
            notes=[f"heavy packages imported: {', '.join(heavy) or 'none'}"]),
    ]


# --- 3. cold search ------------------------------------------------------------------------


def bench_search(homes: dict[int, Path], samples: int) -> list[Row]:
    """Wall time of fresh search processes per index size, and two interpreter yardsticks."""
    commands: dict[str, tuple[list[str], Path | None]] = {
        f"search {rows}": ([*clipgrep_command(), "search", QUERY, "--model", MODEL_NAME], home)
        for rows, home in homes.items()}
    commands["numpy+ort"] = ([sys.executable, "-c", "import numpy, onnxruntime"], None)
    commands["pass"] = ([sys.executable, "-c", "pass"], None)

    for name, (command, home) in commands.items():  # warm the page cache (bundle, snapshot, .pyc)
        _, done = run_process(command, home)
        check_ok(done, name)
        if name.startswith("search") and len(done.stdout.splitlines()) != 10:
            raise SystemExit(f"{name} printed {len(done.stdout.splitlines())} results, expected 10")
    times: dict[str, list[float]] = {name: [] for name in commands}
    for i in range(samples):
        for name in alternate(list(commands), i):
            command, home = commands[name]
            times[name].append(run_process(command, home)[0])
        log(f"  sample {i + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))

    base_ort, base_pass = statistics.median(times["numpy+ort"]), statistics.median(times["pass"])
    rows = []
    for size in homes:
        value = statistics.median(times[f"search {size}"])
        rows.append(Row("3", f"Cold `clipgrep search` process, {size:,} rows", "s", times[f"search {size}"],
                        target=at_most(0.5, "s"),
                        notes=[f"{value / base_ort:.2f}× import numpy+onnxruntime",
                               f"{value / base_pass:.1f}× python -c pass"]))
    rows.append(Row("3", 'Yardstick: `python -c "import numpy, onnxruntime"`', "s", times["numpy+ort"]))
    rows.append(Row("3", "Yardstick: `python -c pass`", "s", times["pass"], digits=3))
    return rows


# --- main ----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out"),
                        help="cache for bundles, photos, the 100k tree and its indexes (default: bench-out/)")
    parser.add_argument("--photos", type=int, default=None,
                        help="generated photos to index in row 1 (default 48; 16 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 1 repeat, 3 search samples, 16 photos (same index sizes)")
    args = parser.parse_args(argv)
    photo_count = args.photos or (16 if args.quick else 48)
    if photo_count < 1:
        parser.error("--photos must be at least 1")
    repeats, noop_samples, search_samples = (1, 1, 3) if args.quick else (5, 3, 7)
    out = args.out.resolve()  # absolute: the index stores absolute paths, processes get --out as given

    facts = rt.machine_facts()
    bundles, conversion_s = rt.ensure_bundles(out)
    bundle = bundles["int8"]
    photos = rt.ensure_photos(out, photo_count)

    rows: list[Row] = []
    log(f"1. index throughput on {photo_count} photos")
    rows += bench_throughput(bundle, photos, out, repeats)

    base = out / "index-bench"
    tree = ensure_tree(base)
    originals = sorted((tree / "d000").glob("img-*.png"))[:DISTINCT]
    log("preparing the 100k and 10k indexes")
    big, big_rows = ensure_index(base / "home-100k", [tree], originals, bundle)
    small_roots = [tree / f"d{d:03d}" for d in range(SMALL_INDEX_DIRS)]
    _, small_rows = ensure_index(base / "home-10k", small_roots, originals, bundle)

    log("2. no-op re-index")
    rows += bench_noop(base / "home-100k", tree, big, big_rows, noop_samples)
    log("3. cold search")
    rows += bench_search({small_rows: base / "home-10k", big_rows: base / "home-100k"}, search_samples)

    built = f"converted in this run in {conversion_s:.1f} s" if conversion_s is not None else "cached"
    photo_mb = statistics.mean(p.stat().st_size for p in photos) / 1e6
    print(f"## clipgrep index benchmark (medians; samples: row 1 ×{repeats}, row 2 ×{noop_samples}, "
          f"row 3 ×{search_samples})\n")
    print("\n".join(facts))
    print(f"- Model: {rt.ARCH} int8, random weights ({built}), {bundle.size_bytes() / 1e6:.0f} MB, "
          f"installed as {MODEL_NAME!r} by copy; CLI: {' '.join(clipgrep_command())}")
    print(f"- Photos: {photo_count} generated {rt.PHOTO_SIZE[0]}x{rt.PHOTO_SIZE[1]} JPEGs, mean {photo_mb:.2f} MB; "
          f"tree: {TREE_DIRS} dirs x {FILES_PER_DIR} hard links to {DISTINCT} {PNG_SIZE}x{PNG_SIZE} PNGs in {tree}")
    print()
    print(render_table(rows))
    print()
    print("Process figures are wall time of a fresh process, fork+exec to exit, with the page cache warm. "
          "Spread = (max−min)/median over the samples. Row 1 excludes one-off process costs "
          "(`import lancedb`, fork-server start), includes everything update_index does "
          "(scan, fingerprints, decode pool, session creation, LanceDB writes, snapshot).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
