#!/usr/bin/env python
"""What ``clipgrep index --engine ray`` costs on one machine, and what its shard resume costs.

One run, on N generated photo-like JPEGs (default 2,000 at 640x480) and one bundle (default: the
tests' tiny contract bundle, so the numbers are the engines' own overhead, not a model's; pass
``--bundle DIR`` for a real one, e.g. the int8 ViT-B-32 bench_runtime.py builds):

1. ``clipgrep index DIR`` (the local engine) in a fresh ``CLIPGREP_HOME``: seconds and img/s;
2. ``clipgrep index --engine ray --address A DIR --table T`` against a local cluster started once
   by this script (``ray.init(num_cpus=2)``; its start is timed apart), in one shard (the default
   shard size) and in shards of ``--shard-size``;
3. the re-run with nothing to do, for both engines;
4. resume: a driver killed (SIGKILL) right after its first shard's commit, then the re-run.

Every clipgrep run is a fresh process, as a user runs it. Usage (from the repository root, in a
venv with the ray extra: ``make bench-ray``)::

    .venv-ray/bin/python benchmarks/bench_ray.py [--out bench-out] [--images 2000] [--shard-size 500]

The markdown table goes to stdout, progress to stderr.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL = "bench-ray"


def log(message: str) -> None:
    print(f"[bench_ray] {message}", file=sys.stderr, flush=True)


def make_photos(folder: Path, count: int) -> Path:
    """Smooth gradients plus noise, as JPEG quality 90: decodes like a small photo. Cached."""
    folder.mkdir(parents=True, exist_ok=True)
    have = len(list(folder.glob("*.jpg")))
    if have < count:
        log(f"generating {count - have} photos in {folder}")
    for i in range(have, count):
        rng = np.random.default_rng(i)
        y, x = np.mgrid[0:480, 0:640].astype(np.float32)
        base = rng.uniform(0, 255, 3) + np.stack([x / 640, y / 480, (x + y) / 1120], -1) * rng.uniform(-120, 120, 3)
        pixels = np.clip(base + rng.normal(0, 12, (480, 640, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def env(home: Path) -> dict[str, str]:
    return {**os.environ, "CLIPGREP_HOME": str(home),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}


def clipgrep(home: Path, *args: str) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "clipgrep", *args], env=env(home), capture_output=True, text=True,
                          check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"clipgrep {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    return seconds


def install(home: Path, bundle: Path) -> None:
    clipgrep(home, "models", "add", MODEL, "--checkpoint", str(bundle), "--replace")


def committed_rows(table: Path) -> int:
    from clipgrep.engines.sharded_table import ShardedTable
    from clipgrep.table_uri import parse_table_uri

    try:
        return ShardedTable.existing(parse_table_uri(str(table))).count()
    except Exception:  # noqa: BLE001 - not created yet
        return 0


def killed_after_first_shard(home: Path, address: str, photos: Path, table: Path, shard_size: int) -> int:
    """Run a driver, SIGKILL it once a shard is committed; returns the rows it left committed."""
    driver = subprocess.Popen([sys.executable, "-m", "clipgrep", "index", "--engine", "ray", "--address", address,
                               str(photos), "--table", str(table), "--model", MODEL, "--shard-size", str(shard_size)],
                              env=env(home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while driver.poll() is None and committed_rows(table) == 0:
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    return committed_rows(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench-out")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--bundle", type=Path, help="a bundle dir (default: the tests' tiny contract bundle)")
    args = parser.parse_args(argv)

    work = args.out / "ray-bench"
    shutil.rmtree(work / "runs", ignore_errors=True)
    runs = work / "runs"
    photos = make_photos(work / f"photos-{args.images}", args.images)
    bundle = args.bundle
    if bundle is None:
        sys.path.insert(0, str(REPO_ROOT))
        from tests.factories import make_contract_bundle

        bundle = make_contract_bundle(work / "tiny-bundle")
    home = runs / "home"
    install(home, bundle)
    n = args.images
    rows: list[tuple[str, str, str]] = []

    def add(what: str, seconds: float, images: int | None = None) -> None:
        rate = f"{images / seconds:.1f}" if images else ""
        rows.append((what, f"{seconds:.1f}", rate))
        log(f"{what}: {seconds:.1f} s {rate}")

    add("local `clipgrep index` (fresh index)", clipgrep(home, "index", str(photos), "--model", MODEL), n)
    add("local, re-run with nothing to do", clipgrep(home, "index", str(photos), "--model", MODEL))

    import ray

    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=str(runs / "ray"))
    add("start a local Ray cluster (ray.init, num_cpus=2)", time.perf_counter() - start)
    address = ray.get_runtime_context().gcs_address
    try:
        ray_index = ("index", "--engine", "ray", "--address", address, str(photos), "--model", MODEL)
        add("ray, 1 shard (default --shard-size 10000)",
            clipgrep(home, *ray_index, "--table", str(runs / "db" / "one")), n)
        add(f"ray, shards of {args.shard_size}",
            clipgrep(home, *ray_index, "--table", str(runs / "db" / "sharded"), "--shard-size", str(args.shard_size)), n)
        add("ray, re-run with nothing to do",
            clipgrep(home, *ray_index, "--table", str(runs / "db" / "sharded"), "--shard-size", str(args.shard_size)))
        table = runs / "db" / "resumed"
        kept = killed_after_first_shard(home, address, photos, table, args.shard_size)
        add(f"ray, re-run after a driver killed with {kept} rows committed ({n - kept} to redo)",
            clipgrep(home, *ray_index, "--table", str(table), "--shard-size", str(args.shard_size)), n - kept)
        if committed_rows(table) != n:
            raise SystemExit(f"the resumed table has {committed_rows(table)} rows, not {n}")
    finally:
        ray.shutdown()

    print(f"{n} generated 640x480 JPEGs, bundle {bundle.name}, {os.cpu_count()} CPUs\n")
    print("| run | seconds | images/s |\n|---|---:|---:|")
    for what, seconds, rate in rows:
        print(f"| {what} | {seconds} | {rate} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
