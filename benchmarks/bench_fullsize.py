#!/usr/bin/env python
"""What ``clipgrep compress`` costs at real size: a full ViT-B-32 teacher (151M parameters), the
paper's student (6 of 12 image blocks, 4 of 12 text blocks), on this machine's CPU.

Random weights (the code path is the one real weights take; only the numbers in them differ),
224 px generated images, a bounded number of steps per stage:

1. stage 1 (teacher embedding cache, then intra-modal KD of both towers);
2. stage 2 (2a then 2b, KD and hard negatives);
3. export (ONNX, int8 quantisation, parity gate) of the student, int8 and fp32 from one export;
4. hard-negative mining over 100,000 captions x 20,000 images (the COCO-sized case), alone;
5. the teacher-cache size per 1,000 items.

Each command runs as its own process, so peak RSS is per stage. Prints a markdown table and
writes ``results.json`` in ``--out``.

Usage (from the repository root; needs the ``convert`` extra)::

    .venv/bin/python benchmarks/bench_fullsize.py [--out bench-out/fullsize] [--images 256] [--steps 6]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEACHER = "ViT-B-32:random"
STUDENT = "image=b32-6l,text=4"


def run(label: str, args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``python -m clipgrep ARGS``; its wall time and peak RSS (from wait4, this child alone)."""
    print(f"[{label}] clipgrep {' '.join(args)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "clipgrep", *args], env=env)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if child.returncode != 0:
        raise SystemExit(f"[{label}] failed with exit code {child.returncode}")
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024)}


def mining_cost(captions: int, images: int) -> dict[str, Any]:
    """Peak RSS and time of one corpus-level mining pass, in a child process of its own."""
    code = f"""
import resource, time, numpy as np
from clipgrep.compress.data import PairSet
from clipgrep.compress.mining import mine_caption_negatives
from pathlib import Path
rng = np.random.default_rng(0)
def unit(n):
    x = rng.standard_normal((n, 512), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)
caption_image = np.arange({captions}) % {images}
pairs = PairSet([Path(f"/i/{{i}}.jpg") for i in range({images})], [f"caption {{t}}" for t in range({captions})],
                caption_image)
text, image = unit({captions}), unit({images})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
mine_caption_negatives(text, image, pairs, np.arange({captions}), 8)
print(time.perf_counter() - start, before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds, before, after = (float(v) for v in out.stdout.split())
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(after / 1024), "added_mb": round((after - before) / 1024)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "fullsize")
    parser.add_argument("--images", type=int, default=192, help="stage 2 runs one epoch of each step over them")
    parser.add_argument("--steps", type=int, default=6, help="stage-1 training steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    from benchmarks.synthetic import generate_dataset

    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, "CLIPGREP_HOME": str(out / "home"), "PYTHONPATH": str(ROOT)}
    pairs = generate_dataset(out / "data", args.images, seed=0, image_size=224)
    common = ["--teacher", TEACHER, "--batch-size", str(args.batch), "--device", args.device,
              "--checkpoint-every", "1000"]
    results: dict[str, Any] = {"images": args.images, "captions": 5 * args.images, "steps": args.steps,
                               "batch": args.batch}
    results["stage1"] = run("stage 1", ["compress", "stage1", *common, "--student", STUDENT,
                                        "--images", str(pairs.parent / "images"),
                                        "--texts", str(pairs.parent / "texts.txt"), "--epochs", "50",
                                        "--max-steps", str(args.steps), "--out", str(out / "s1")], env)
    results["stage2"] = run("stage 2", ["compress", "stage2", *common, "--student", str(out / "s1"),
                                        "--pairs", str(pairs), "--epochs-image", "1", "--epochs-text", "1",
                                        "--val-fraction", "0", "--hard-negatives", "8", "--out", str(out / "s2")],
                            env)
    results["export"] = run("export", ["compress", "export", str(out / "s2"), "student", "--precision", "both"], env)
    manifest = json.loads((out / "home" / "models" / "student" / "manifest.json").read_text())
    results["parity"] = manifest.get("parity")
    results["student_bytes"] = sum(f["bytes"] for f in manifest["files"].values())
    caches = list((out / "s1" / "cache").glob("teacher-*.npy"))
    results["teacher_cache_bytes_per_1000"] = round(sum(p.stat().st_size for p in caches) / (args.images * 6) * 1000)
    results["mining_100k_x_20k"] = mining_cost(100_000, 20_000)
    for stage in ("stage1", "stage2"):
        checkpoint = out / ("s1" if stage == "stage1" else "s2") / "checkpoint.pt"
        results[stage]["checkpoint_mb"] = round(checkpoint.stat().st_size / 2**20)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    return 0


def table(r: dict[str, Any]) -> str:
    rows = ["| step | wall s | peak RSS MB | note |", "|---|---|---|---|"]
    rows.append(f"| stage 1 ({r['steps']} steps, batch {r['batch']}, teacher cache of {r['images']} images "
                f"+ {r['captions']} captions included) | {r['stage1']['seconds']} | {r['stage1']['peak_rss_mb']} | "
                f"checkpoint {r['stage1']['checkpoint_mb']} MB |")
    rows.append(f"| stage 2 (2a + 2b, one epoch each = {r['images'] // r['batch']} steps each, K=8 hard negatives) | {r['stage2']['seconds']} | "
                f"{r['stage2']['peak_rss_mb']} | checkpoint {r['stage2']['checkpoint_mb']} MB |")
    parity = r.get("parity") or {}
    rows.append(f"| export int8 + fp32 (one ONNX export) | {r['export']['seconds']} | {r['export']['peak_rss_mb']} | "
                f"int8 bundle {r['student_bytes'] / 2**20:.0f} MB; parity {json.dumps(parity)[:120]} |")
    m = r["mining_100k_x_20k"]
    rows.append(f"| hard-negative mining, 100k captions x 20k images | {m['seconds']} | {m['peak_rss_mb']} | "
                f"+{m['added_mb']} MB over the inputs |")
    rows.append(f"| teacher cache on disk | | | {r['teacher_cache_bytes_per_1000'] / 2**20:.1f} MB per 1,000 items |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
