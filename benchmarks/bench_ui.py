#!/usr/bin/env python
"""Web page and terminal preview benchmark: what `clipgrep ui` and `search --preview` cost.

On a 100,000-row index whose 200 newest rows are real-size generated photos (4000x3000 JPEG,
the same generator as bench_runtime), with the int8 random-weight ViT-B-32 bundle:

1. first thumbnail page: the page (newest first, 60 tiles) and its 60 thumbnails fetched
   6 at a time like a browser, with an empty thumbnail cache (cold) and again (warm);
2. search round trip in the running server: GET /results?q=... for 50 different queries
   (text encoded by the resident model, ranked over 100k rows, HTML rendered), median;
3. the server process's memory (VmRSS and peak VmHWM from /proc) after all of that;
4. `clipgrep search PHOTO -k 10 --preview` minus the same search without --preview, both
   real processes writing to a pseudo-terminal, run in alternation; cold and warm thumbnail
   cache, median of 7 pairs.

Usage (from the repository root; needs the ui extra and httpx)::

    .venv/bin/python benchmarks/bench_ui.py [--out bench-out]

Bundles and photos are cached under ``--out`` (shared with bench_runtime/bench_index).
"""
from __future__ import annotations

import argparse
import os
import pty
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bench_runtime as rt  # this script's directory is sys.path[0]
import numpy as np

from clipgrep.paths import HOME_ENV, snapshot_dir
from clipgrep.snapshot import write_snapshot

ROWS = 100_000
PHOTOS = 200
QUERIES = [f"{a} {b}" for a in ("a dog", "red car", "sunset", "my cat", "snowy street", "birthday cake",
                                  "a blue boat", "mountain lake", "receipt", "two people")
           for b in ("at night", "in the park", "close up", "from above", "in winter")]  # 50 distinct
MODEL = "bench-int8"
log = rt.log


def ensure_photos(out: Path) -> list[Path]:
    folder = (out / "ui-photos").resolve()  # absolute, as the indexer stores paths
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"photo-{i:03d}.jpg" for i in range(PHOTOS)]
    todo = [(i, p) for i, p in enumerate(paths) if not p.exists()]
    if todo:
        log(f"generating {len(todo)} {rt.PHOTO_SIZE[0]}x{rt.PHOTO_SIZE[1]} JPEGs in {folder} (once) ...")
    for i, path in todo:
        partial = path.with_suffix(".partial")
        rt.make_photo(1000 + i).save(partial, format="JPEG", quality=rt.PHOTO_QUALITY)
        partial.rename(path)
    return paths


def build_index(home: Path, bundle, photos: list[Path]) -> None:
    """A snapshot of ROWS rows: the photos (newest, vectors clustered so a photo's neighbours are photos)
    and ROWS - PHOTOS rows of files that do not exist (search cost depends on rows, not on files)."""
    from clipgrep.models import add_model

    os.environ[HOME_ENV] = str(home)
    installed = add_model(MODEL, checkpoint=bundle.path, replace=True)
    rng = np.random.default_rng(0)
    dim = installed.embed_dim
    vectors = rng.standard_normal((ROWS, dim)).astype(np.float32)
    centre = rng.standard_normal(dim).astype(np.float32) * 3
    vectors[:PHOTOS] += centre
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    stats = [p.stat() for p in photos]
    fake = [f"/bench/library/{i // 500:04d}/img-{i:06d}.jpg" for i in range(ROWS - PHOTOS)]
    paths = [str(p) for p in photos] + fake
    sizes = [s.st_size for s in stats] + [2_000_000] * len(fake)
    mtimes = [s.st_mtime_ns for s in stats] + [1_600_000_000_000_000_000 + i for i in range(len(fake))]
    write_snapshot(snapshot_dir(installed.bundle_id), paths, vectors, sizes, mtimes, mtimes, ["00"] * ROWS,
                   {"bundle_id": installed.bundle_id})


def start_server(home: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, HOME_ENV: str(home)}
    proc = subprocess.Popen([sys.executable, "-m", "clipgrep", "ui", "--no-browser", "--model", MODEL],
                            env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    match = re.search(r"(http://\S+)", line)
    if not match:
        proc.kill()
        raise SystemExit(f"clipgrep ui did not print its address: {line}{proc.stderr.read()}")
    return proc, match.group(1)


def first_page(client, base: str) -> tuple[float, int]:
    """Seconds from requesting the page to the last of its thumbnails, and how many there were."""
    start = time.perf_counter()
    html = client.get(base + "/").text
    thumbs = re.findall(r'src="(/thumb/[^"]+)"', html)
    with ThreadPoolExecutor(6) as pool:  # browsers open 6 connections per host
        codes = list(pool.map(lambda url: client.get(base + url.replace("&amp;", "&")).status_code, thumbs))
    seconds = time.perf_counter() - start
    assert codes and all(c == 200 for c in codes), codes[:5]
    return seconds, len(thumbs)


def rss_kib(pid: int) -> tuple[int, int]:
    """The process's resident memory now and at its peak (KiB), from /proc (Linux)."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(status["VmRSS"].split()[0]), int(status["VmHWM"].split()[0])


def on_a_terminal(args: list[str], home: Path) -> float:
    """Wall seconds of a clipgrep process whose stdout is a pseudo-terminal (output drained)."""
    master, slave = pty.openpty()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "clipgrep", *args], stdout=slave, stderr=subprocess.DEVNULL,
                            env={**os.environ, HOME_ENV: str(home), "TERM": "xterm-kitty"})
    os.close(slave)
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        try:
            if not ready or not os.read(master, 1 << 20):
                break
        except OSError:
            break
    proc.wait()
    os.close(master)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args()
    import httpx

    bundle = rt.ensure_bundles(args.out)[0]["int8"]
    photos = ensure_photos(args.out)
    home = Path(tempfile.mkdtemp(prefix="bench-ui-"))
    try:
        build_index(home, bundle, photos)
        cache = home / "cache" / "thumbs"
        proc, url = start_server(home)
        base = url.split("/?")[0]
        rows = []
        with httpx.Client(timeout=120, limits=httpx.Limits(max_connections=6)) as client:
            client.get(url)  # token -> cookie
            client.get(base + "/results?q=warm%20up")  # the first query loads the text session
            shutil.rmtree(cache, ignore_errors=True)
            cold, n = first_page(client, base)
            warm, _ = first_page(client, base)
            rows += [(f"first page + {n} thumbnails, cold cache (s)", f"{cold:.2f}"),
                     (f"first page + {n} thumbnails, warm cache (s)", f"{warm:.3f}")]
            times = []
            for q in QUERIES:
                start = time.perf_counter()
                response = client.get(base + "/results", params={"q": q})
                times.append(time.perf_counter() - start)
                assert response.status_code == 200 and "tile" in response.text
            rows.append(("search round trip, median of 50 queries (ms)", f"{statistics.median(times) * 1000:.1f}"))
            rows.append(("  p90 / max (ms)", f"{sorted(times)[44] * 1000:.1f} / {max(times) * 1000:.1f}"))
            rss, peak = rss_kib(proc.pid)
            rows.append(("server memory, RSS / peak (MiB)", f"{rss / 1024:.0f} / {peak / 1024:.0f}"))
        proc.terminate()
        proc.wait(10)

        # Plain and preview runs alternate, so that load from other processes hits both alike.
        query = ["search", "--model", MODEL, str(photos[0]), "-k", "10"]
        for _ in range(2):
            on_a_terminal(query, home)  # page cache, optimised-session cache
        cold, warm = [], []
        for _ in range(7):
            shutil.rmtree(cache, ignore_errors=True)
            plain = on_a_terminal(query, home)
            cold.append(on_a_terminal([*query, "--preview"], home) - plain)
            plain = on_a_terminal(query, home)
            warm.append(on_a_terminal([*query, "--preview"], home) - plain)
        rows += [("search -k 10 (process on a pty), plain (s)", f"{plain:.2f}"),
                 ("--preview extra over plain, cold cache, median of 7 pairs (s)", f"{statistics.median(cold):.3f}"),
                 ("--preview extra over plain, warm cache, median of 7 pairs (s)", f"{statistics.median(warm):.3f}")]
    finally:
        shutil.rmtree(home, ignore_errors=True)
    print(f"\n{ROWS:,} rows, {PHOTOS} photos {rt.PHOTO_SIZE[0]}x{rt.PHOTO_SIZE[1]}, "
          f"model {bundle.name} (int8, random weights), {os.cpu_count()} CPUs\n")
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
