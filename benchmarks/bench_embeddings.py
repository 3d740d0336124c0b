#!/usr/bin/env python
"""Importing embeddings computed elsewhere (``clipgrep index --from-embeddings``) at library size.

Generates clip-retrieval's inference output (``img_emb/img_emb_NN.npy`` float16 [n, D] and
``metadata/metadata_NN.parquet`` with ``image_path``; random vectors, local-looking paths that
do not exist, so every row costs the ``stat`` a real local path would), installs a contract
bundle of the same dimension (numpy weights, no torch), and imports it in a fresh
``CLIPGREP_HOME`` in a child process, which reports:

- wall time of each phase: checking the shards, the streamed upserts (bounded commits),
  compaction, writing the search snapshot (streamed from the table) and its inverted file
  (``clipgrep.ann``, past 200,000 rows);
- peak RSS in each phase (sampled every 50 ms) and over the whole child (``ru_maxrss``);
- then one cold ``clipgrep search -k 1`` process over the result;
- then the snapshot published again (snapshot + inverted file, as ``forget`` does) in a fresh
  process, whose peak RSS is that of publishing alone (a phase above also shows what earlier
  phases left allocated).

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_embeddings.py [--rows 1000000] [--shards 10] [--dim 512] [--out bench-out]

The shards are cached under ``--out/embeddings-<rows>x<dim>`` (~1 GB for 10^6 x 512 float16).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "bench-embeddings"

CHILD = """
import json, os, resource, sys, threading, time
import clipgrep.ann as ann
import clipgrep.index.protocol as protocol
from clipgrep.index.imported import import_embeddings
from clipgrep.models import load_model
from clipgrep.store import IndexStore

phase, spans, peaks, done = ["start"], [], {}, threading.Event()

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

def sample():
    while not done.is_set():
        peaks[phase[0]] = max(peaks.get(phase[0], 0.0), rss_mb())
        time.sleep(0.05)

def enter(name):
    spans.append((name, time.perf_counter()))
    phase[0] = name

def timed(owner, attr, name):
    original = getattr(owner, attr)
    def wrapper(*args, **kwargs):
        enter(name)
        return original(*args, **kwargs)
    setattr(owner, attr, wrapper)

timed(IndexStore, "maintain", "compaction")
timed(protocol, "publish", "snapshot")
timed(ann, "build_ivf", "snapshot IVF")
threading.Thread(target=sample, daemon=True).start()
bundle = load_model(sys.argv[2], auto_install=False)
enter("checking")
report = import_embeddings(sys.argv[1], bundle=bundle,
                           on_progress=lambda p: p.phase == "importing" and phase[0] != "importing" and enter("importing"))
enter("end")
done.set()
print(json.dumps({"spans": spans, "peaks": peaks, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "added": report.added, "rows": report.rows}))
"""


REPUBLISH = """
import json, resource, sys, time
from clipgrep.index.protocol import publish
from clipgrep.models import load_model
from clipgrep.paths import index_dir
from clipgrep.store import IndexStore

store = IndexStore.existing(index_dir(), load_model(sys.argv[1], auto_install=False).index_id)
store.count()  # lancedb loaded: the baseline
with open("/proc/self/statm") as f:
    before = int(f.read().split()[1]) * 4096 / 2**20
started = time.perf_counter()
rows = publish(store)[0]
print(json.dumps({"rows": rows, "seconds": time.perf_counter() - started, "before_mb": before,
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def generate(out: Path, rows: int, shards: int, dim: int) -> Path:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = out / "complete"
    if done.exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    (out / "img_emb").mkdir(parents=True)
    (out / "metadata").mkdir()
    rng = np.random.default_rng(0)
    width = len(str(shards - 1))  # clip-retrieval pads to the partition count's width
    for shard in range(shards):
        n = rows // shards + (1 if shard < rows % shards else 0)
        start = shard * (rows // shards) + min(shard, rows % shards)
        name = str(shard).zfill(width)
        np.save(out / "img_emb" / f"img_emb_{name}.npy", rng.standard_normal((n, dim), dtype=np.float32).astype(np.float16))
        paths = [f"/mnt/archive/{(start + i) // 1000:05d}/{start + i:08d}.jpg" for i in range(n)]
        pq.write_table(pa.table({"image_path": paths, "caption": [""] * n}), out / "metadata" / f"metadata_{name}.parquet")
        print(f"generated shard {shard + 1}/{shards}", file=sys.stderr, flush=True)
    done.touch()
    return out


def install_model(dim: int, env: dict[str, str]) -> None:
    code = (f"from tests.factories import make_contract_bundle; from clipgrep import models; import tempfile, pathlib; "
            f"models.add_model({MODEL!r}, checkpoint=make_contract_bundle(pathlib.Path(tempfile.mkdtemp()) / 'b', dim={dim}))")
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args()

    source = generate(args.out / f"embeddings-{args.rows}x{args.dim}", args.rows, args.shards, args.dim)
    home = Path(tempfile.mkdtemp(prefix="clipgrep-bench-emb-", dir=args.out))
    env = {**os.environ, "CLIPGREP_HOME": str(home), "PYTHONPATH": str(ROOT)}
    try:
        install_model(args.dim, env)
        print(f"importing {args.rows} rows ...", file=sys.stderr, flush=True)
        child = subprocess.run([sys.executable, "-c", CHILD, str(source), MODEL], env=env, check=True,
                               capture_output=True, text=True)
        result = json.loads(child.stdout.splitlines()[-1])
        started = time.perf_counter()
        search = subprocess.run([sys.executable, "-m", "clipgrep", "search", "a photo", "--model", MODEL, "-k", "1"],
                                env=env, check=True, capture_output=True, text=True)
        search_s = time.perf_counter() - started
        again = subprocess.run([sys.executable, "-c", REPUBLISH, MODEL], env=env, check=True,
                               capture_output=True, text=True)
        republish = json.loads(again.stdout.splitlines()[-1])
    finally:
        shutil.rmtree(home, ignore_errors=True)

    spans = result["spans"]
    total = spans[-1][1] - spans[0][1]
    print(f"| import of {args.rows:,} rows, D={args.dim}, float16, {args.shards} shards | wall s | peak RSS MB |")
    print("|---|---|---|")
    for (name, begin), (_, end) in itertools.pairwise(spans):
        print(f"| {name} | {end - begin:.1f} | {result['peaks'].get(name, 0):.0f} |")
    print(f"| **total** ({result['added']:,} rows added) | "
          f"{total:.1f} | {result['maxrss_mb']:.0f} |")
    print(f"| cold `clipgrep search -k 1` afterwards | {search_s:.2f} | |")
    print(f"| publishing again in a fresh process (snapshot + IVF; {republish['before_mb']:.0f} MB before) | "
          f"{republish['seconds']:.1f} | {republish['maxrss_mb']:.0f} |")
    print(f"search found: {search.stdout.strip()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
