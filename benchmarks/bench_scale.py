#!/usr/bin/env python
"""Search at scale: exact brute force vs approximate indexes, on 10^5 .. 10^7 memory-mapped rows.

For each size, generates clustered unit vectors (D=512; Gaussian clusters around random
unit centres, queries near data rows: closer to CLIP embeddings than uniform noise),
written in chunks as a real snapshot generation (never all in RAM), and measures side by side:

- ``exact``: the f32 snapshot brute-forced (today's ``ranking.rank``);
- ``int8 scan``: every row's int8 code scanned, the best 200 rescored in f32;
- ``snapshot IVF``: ``clipgrep.ann`` (k-means partitions of the snapshot, int8 codes grouped
  by partition, ``nprobe`` probed, rescored in f32): what ``clipgrep search`` uses above
  ``EXACT_MAX_ROWS``;
- ``LanceDB IVF_PQ`` (nprobes 20, refine_factor 10) and ``LanceDB IVF_HNSW_SQ``.

With ``--rebuild``, also the cost of the inverted file's rebuild when an index run adds 1% rows:
k-means afresh vs the previous generation's centroids and scales reused (what ``publish`` does).

Per method: build time, recall@10 against exact (``--queries`` queries, in-process), warm
latency in-process (median ms), and a **fresh process** that imports what the method needs,
opens the index and answers one query: its wall time with the page cache warm, and "cold"
after ``posix_fadvise(DONTNEED)`` on every index file (dropping the whole page cache needs
root; this evicts the index's own clean pages, so its reads come from disk), and its peak
RSS (``VmHWM``). Query encoding is not included: it costs the same for every method
(bench_index.py measures a whole ``clipgrep search``).

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_scale.py [--sizes 100000,1000000] [--out bench-out/scale]
        [--methods exact,int8,ivf,ivf_pq,hnsw_sq] [--queries 50] [--runs 3] [--rebuild]

The markdown table goes to stdout, progress to stderr. Data is kept under ``--out`` and reused.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

D = 512
# Rows = unit(common + topic + cluster + noise): like CLIP embeddings, unrelated rows still share a
# direction (cosine ~0.3), topics hold overlapping clusters, and a row is noisy around its cluster.
WEIGHTS = {"common": 0.5, "topic": 0.55, "cluster": 0.45, "noise": 0.8}
TOPIC_ROWS = 20_000  # mean rows per topic
CLUSTER_ROWS = 50  # mean rows per cluster: far fewer than an IVF partition holds, so they do not line up
QUERY_NOISE = 0.5
CHUNK = 100_000
K = 10


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- data ----------------------------------------------------------------------------------

def generate(directory: Path, n: int, seed: int = 0) -> Path:
    """A snapshot directory (CURRENT + one generation) of ``n`` clustered rows, written in chunks."""
    generation = directory / "g1-bench"
    if (directory / "CURRENT").exists():
        return generation
    generation.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w = WEIGHTS
    common = _unit(rng.standard_normal((1, D), dtype=np.float32))
    topics = _unit(rng.standard_normal((max(1, n // TOPIC_ROWS), D), dtype=np.float32))
    clusters = _unit(rng.standard_normal((max(1, n // CLUSTER_ROWS), D), dtype=np.float32))
    clusters = _unit(w["common"] * common + w["topic"] * topics[rng.integers(len(topics), size=len(clusters))]
                     + w["cluster"] * clusters)
    vectors = np.lib.format.open_memmap(generation / "vectors.npy", "w+", np.float32, (n, D))
    for a in range(0, n, CHUNK):
        m = min(CHUNK, n - a)
        noise = rng.standard_normal((m, D), dtype=np.float32) * (w["noise"] / np.sqrt(D))
        vectors[a:a + m] = _unit(clusters[rng.integers(len(clusters), size=m)] + noise)
    vectors.flush()
    del vectors
    _write_rows(generation, n)
    (directory / "CURRENT").write_text(generation.name)
    return generation


def _write_rows(generation: Path, n: int) -> None:
    """Everything but the vectors. Paths sorted by construction: /lib/<dir of 1000>/<row>.jpg"""
    from clipgrep.snapshot import FORMAT, FORMAT_VERSION

    names = [f"/lib/{i // 1000:07d}/{i:09d}.jpg".encode() for i in range(n)]
    lengths = np.fromiter(map(len, names), np.int64, n)
    np.save(generation / "path_bytes.npy", np.frombuffer(b"".join(names), np.uint8))
    np.save(generation / "path_offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    for name in ("sizes", "mtimes_ns", "indexed_ns"):
        np.save(generation / f"{name}.npy", np.zeros(n, np.int64))
    np.save(generation / "fingerprints.npy", np.full(n, b"00", dtype="S2"))
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "rows": n, "embed_dim": D, "bundle_id": "bench"}
    (generation / "meta.json").write_text(json.dumps(meta))


def grow(generation: Path, directory: Path, extra: int) -> Path:
    """A snapshot directory holding ``generation``'s rows plus ``extra`` new ones near them (new
    photos of the same subjects), as the next index run would publish it."""
    grown = directory / "g2-bench"
    if (directory / "CURRENT").exists():
        return grown
    grown.mkdir(parents=True, exist_ok=True)
    old = np.load(generation / "vectors.npy", mmap_mode="r")
    n = len(old)
    vectors = np.lib.format.open_memmap(grown / "vectors.npy", "w+", np.float32, (n + extra, D))
    for a in range(0, n, CHUNK):
        vectors[a:a + CHUNK] = old[a:a + CHUNK]
    vectors[n:] = queries(old, extra, seed=2)
    vectors.flush()
    del vectors
    _write_rows(grown, n + extra)
    (directory / "CURRENT").write_text(grown.name)
    return grown


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def queries(vectors: np.ndarray, count: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    near = np.asarray(vectors[np.sort(rng.choice(len(vectors), count, replace=False))])
    return _unit(near + rng.standard_normal(near.shape, dtype=np.float32) * (QUERY_NOISE / np.sqrt(D)))


def ground_truth(vectors: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Exact top-10 row ids per query, in chunks."""
    best_s = np.full((len(q), K), -np.inf, np.float32)
    best_i = np.zeros((len(q), K), np.int64)
    for a in range(0, len(vectors), CHUNK):
        s = q @ np.asarray(vectors[a:a + CHUNK]).T
        both_s = np.concatenate([best_s, s], axis=1)
        both_i = np.concatenate([best_i, np.arange(a, a + s.shape[1])[None].repeat(len(q), 0)], axis=1)
        top = np.argpartition(-both_s, K - 1, axis=1)[:, :K]
        best_s, best_i = np.take_along_axis(both_s, top, 1), np.take_along_axis(both_i, top, 1)
    return best_i


def recall(found: list[np.ndarray], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / K for f, t in zip(found, truth)]))


# --- methods: (build, in-process search, fresh-process script) --------------------------------

# Each child prints the wall seconds of its open+search, of everything after start, and its
# peak RSS in MB (VmHWM: ru_maxrss would carry over the forking parent's, it survives exec).
_HWM = ("HWM = lambda: int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) / 1024\n")
CHILD = {
    "exact": """
import sys, time, numpy as np; t0 = time.perf_counter()
from clipgrep.snapshot import read_snapshot; from clipgrep.ranking import rank
q = np.load(sys.argv[2])[int(sys.argv[3])]; t = time.perf_counter()
hits = rank(read_snapshot(__import__('pathlib').Path(sys.argv[1])), q, k=10)
print(time.perf_counter() - t, time.perf_counter() - t0, HWM())""",
    "int8": """
import sys, time, numpy as np; t0 = time.perf_counter(); from pathlib import Path
q = np.load(sys.argv[2])[int(sys.argv[3])]; t = time.perf_counter(); g = Path(sys.argv[1])
v = np.load(g / 'vectors.npy', mmap_mode='r'); c = np.load(g / 'ivf/codes.npy', mmap_mode='r')
r = np.load(g / 'ivf/rows.npy', mmap_mode='r'); sc = np.load(g / 'ivf/scales.npy'); qs = q * sc
s = np.concatenate([c[a:a + 65536].astype(np.float32) @ qs for a in range(0, len(c), 65536)])
top = np.sort(r[np.argpartition(-s, 199)[:200]]); ex = v[top] @ q; best = top[np.argsort(-ex)[:10]]
print(time.perf_counter() - t, time.perf_counter() - t0, HWM())""",
    "ivf": None,  # same as exact: rank() picks the IVF when the generation has one
    "ivf_pq": """
import sys, time, numpy as np; t0 = time.perf_counter(); import lancedb
q = np.load(sys.argv[2])[int(sys.argv[3])]; t = time.perf_counter()
tb = lancedb.connect(sys.argv[1]).open_table('t')
tb.search(q).distance_type('cosine').nprobes(20).refine_factor(10).limit(10).select(['row', '_distance']).to_list()
print(time.perf_counter() - t, time.perf_counter() - t0, HWM())""",
    "hnsw_sq": """
import sys, time, numpy as np; t0 = time.perf_counter(); import lancedb
q = np.load(sys.argv[2])[int(sys.argv[3])]; t = time.perf_counter()
tb = lancedb.connect(sys.argv[1]).open_table('t')
tb.search(q).distance_type('cosine').nprobes(20).ef(100).limit(10).select(['row', '_distance']).to_list()
print(time.perf_counter() - t, time.perf_counter() - t0, HWM())""",
}
CHILD["ivf"] = CHILD["exact"]
CHILD = {name: _HWM + code for name, code in CHILD.items() if code}
LABELS = {"exact": "exact f32 brute force", "int8": "int8 scan + f32 rescore",
          "ivf": "snapshot IVF (clipgrep.ann)", "ivf_pq": "LanceDB IVF_PQ + refine",
          "hnsw_sq": "LanceDB IVF_HNSW_SQ"}


def lance_table(directory: Path, vectors: np.ndarray, method: str) -> float:
    """Build (or reuse) a LanceDB table with the given index; returns the index build seconds."""
    import lancedb
    import pyarrow as pa
    from lancedb.index import HnswSq, IvfPq

    done = directory / "built.json"
    if done.exists():
        return json.loads(done.read_text())["seconds"]
    db = lancedb.connect(directory)
    schema = pa.schema([pa.field("row", pa.int64()), pa.field("vector", pa.list_(pa.float32(), D))])
    table = db.create_table("t", schema=schema, mode="overwrite")
    for a in range(0, len(vectors), CHUNK):
        chunk = np.ascontiguousarray(vectors[a:a + CHUNK])
        table.add(pa.table({"row": pa.array(np.arange(a, a + len(chunk))),
                            "vector": pa.FixedSizeListArray.from_arrays(pa.array(chunk.ravel()), D)}))
    partitions = max(1, int(np.sqrt(len(vectors))))
    config = (IvfPq(distance_type="cosine", num_partitions=partitions, num_sub_vectors=32) if method == "ivf_pq"
              else HnswSq(distance_type="cosine", num_partitions=max(1, partitions // 16)))
    t = time.perf_counter()
    table.create_index("vector", config=config)
    seconds = time.perf_counter() - t
    done.write_text(json.dumps({"seconds": seconds}))
    return seconds


def lance_search(directory: Path, method: str):
    import lancedb

    table = lancedb.connect(directory).open_table("t")

    def search(q: np.ndarray) -> np.ndarray:
        query = table.search(q).distance_type("cosine").nprobes(20).limit(K).select(["row", "_distance"])
        query = query.refine_factor(10) if method == "ivf_pq" else query.ef(100)
        return np.array([r["row"] for r in query.to_list()])
    return search


def snapshot_search(snapshot_dir: Path):
    from clipgrep.ranking import rank
    from clipgrep.snapshot import read_snapshot

    snap = read_snapshot(snapshot_dir)
    assert snap is not None
    row_of = {}

    def search(q: np.ndarray) -> np.ndarray:
        hits = rank(snap, q, k=K)
        return np.array([row_of.setdefault(h.path, int(h.path.rsplit("/", 1)[1][:9])) for h in hits])
    return search


def int8_search(generation: Path):
    v = np.load(generation / "vectors.npy", mmap_mode="r")
    c = np.load(generation / "ivf/codes.npy", mmap_mode="r")
    r = np.load(generation / "ivf/rows.npy", mmap_mode="r")
    sc = np.load(generation / "ivf/scales.npy")

    def search(q: np.ndarray) -> np.ndarray:
        s = np.concatenate([c[a:a + 65536].astype(np.float32) @ (q * sc) for a in range(0, len(c), 65536)])
        top = np.sort(r[np.argpartition(-s, 199)[:200]])
        return top[np.argsort(-(v[top] @ q))[:K]]
    return search


# --- processes -----------------------------------------------------------------------------

def evict(directory: Path) -> None:
    """Drop the page-cache pages of every file under ``directory`` (clean pages only; no root needed)."""
    for folder, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def child(method: str, target: Path, qfile: Path, i: int) -> tuple[float, float, float]:
    """(process wall s, open+search s, peak RSS MB) of one fresh process."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "LANCEDB_LOG": "error"}
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD[method], str(target), str(qfile), str(i)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out, err = proc.communicate()
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{method} child failed: {err.decode()[-2000:]}")
    search_s, _, rss_mb = map(float, out.split())
    return wall, search_s, rss_mb


def measure(n: int, out: Path, methods: list[str], nq: int, runs: int) -> list[dict]:
    log(f"== {n:,} rows")
    base = out / f"n{n}"
    snap_dir = base / "snapshot"
    t = time.perf_counter()
    generation = generate(snap_dir, n)
    log(f"data ready ({time.perf_counter() - t:.0f} s)")
    vectors = np.load(generation / "vectors.npy", mmap_mode="r")
    q = queries(vectors, nq)
    qfile = base / "queries.npy"
    np.save(qfile, q)
    truth = ground_truth(vectors, q)
    del vectors  # see evict(): this process must not keep the files mapped
    exact_dir = base / "exact"  # the same generation without ivf/, by hard links
    if not exact_dir.exists():
        (exact_dir / generation.name).mkdir(parents=True)
        for f in generation.iterdir():
            if f.is_file():
                os.link(f, exact_dir / generation.name / f.name)
        (exact_dir / "CURRENT").write_text(generation.name)
    rows = []
    for method in methods:
        log(f"-- {method}")
        build = 0.0
        if method in ("ivf", "int8"):
            from clipgrep.ann import build_ivf

            os.environ["CLIPGREP_EXACT_MAX_ROWS"] = "0"
            t = time.perf_counter()
            fresh = not (generation / "ivf").exists()
            build_ivf(generation)
            build = time.perf_counter() - t if fresh else json.loads((base / "ivf_build.json").read_text())
            (base / "ivf_build.json").write_text(json.dumps(build))
            target = snap_dir if method == "ivf" else generation
            search = snapshot_search(snap_dir) if method == "ivf" else int8_search(generation)
            files = generation
        elif method == "exact":
            target = files = exact_dir
            search = snapshot_search(exact_dir)
        else:
            target = files = base / method
            build = lance_table(target, np.load(generation / "vectors.npy", mmap_mode="r"), method)
            search = lance_search(target, method)
        found, times = [], []
        for qi in q:
            t = time.perf_counter()
            found.append(search(qi))
            times.append(time.perf_counter() - t)
        r = recall(found, truth)
        del search  # unmaps this process's view: fadvise cannot evict pages that are still mapped
        gc.collect()
        warm, cold, rss, inner = [], [], [], []
        for i in range(runs):
            child(method, target, qfile, i)  # untimed: warms the cache
            w, _, _ = child(method, target, qfile, i)
            evict(files)
            c, s, m = child(method, target, qfile, i)
            warm.append(w)
            cold.append(c)
            inner.append(s)
            rss.append(m)
        row = {"rows": n, "method": LABELS[method], "build_s": build, "recall": r,
               "warm_ms": 1000 * statistics.median(times), "process_warm_s": statistics.median(warm),
               "process_cold_s": statistics.median(cold), "cold_search_s": statistics.median(inner),
               "rss_mb": max(rss)}
        log(json.dumps(row))
        rows.append(row)
    return rows


def rebuild(n: int, out: Path, nq: int) -> list[dict]:
    """Rebuild of the inverted file after 1% more rows: k-means afresh vs reused training."""
    from clipgrep.ann import DIRECTORY, build_ivf, live_training

    log(f"== rebuild after adding 1% to {n:,} rows")
    os.environ["CLIPGREP_EXACT_MAX_ROWS"] = "0"
    base = out / f"n{n}"
    build_ivf(generate(base / "snapshot", n))  # the previous generation's inverted file (kept if built)
    previous = live_training(base / "snapshot")
    grown = grow(base / "snapshot" / "g1-bench", base / "grown", n // 100)
    vectors = np.load(grown / "vectors.npy", mmap_mode="r")
    q = np.concatenate([queries(vectors[:n], nq - nq // 2), queries(vectors[n:], nq // 2, seed=3)])  # half near new
    truth = ground_truth(vectors, q)
    del vectors
    rows = []
    for label, reuse in (("k-means afresh", None), ("previous centroids, scales and partitions reused", previous)):
        shutil.rmtree(grown / DIRECTORY, ignore_errors=True)
        t = time.perf_counter()
        build_ivf(grown, reuse)
        seconds = time.perf_counter() - t
        search = snapshot_search(base / "grown")
        row = {"rows": n, "rebuild": label, "build_s": seconds, "recall": recall([search(x) for x in q], truth)}
        del search
        log(json.dumps(row))
        rows.append(row)
    return rows


def rebuild_table(rows: list[dict]) -> str:
    lines = ["| rows before +1% | IVF rebuild | build s | recall@10 |", "|---|---|---|---|"]
    lines += [f"| {r['rows']:,} | {r['rebuild']} | {r['build_s']:.1f} | {r['recall']:.3f} |" for r in rows]
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    header = ("| rows | method | build s | recall@10 | in-process ms | process warm s | process cold s "
              "| (open+search cold s) | peak RSS MB |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['rows']:,} | {r['method']} | {r['build_s']:.1f} | {r['recall']:.3f} | "
                     f"{r['warm_ms']:.1f} | {r['process_warm_s']:.2f} | {r['process_cold_s']:.2f} | "
                     f"{r['cold_search_s']:.2f} | {r['rss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--out", type=Path, default=Path("bench-out/scale"))
    parser.add_argument("--methods", default="exact,int8,ivf,ivf_pq,hnsw_sq")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rebuild", action="store_true", help="only the rebuild after adding 1%% rows")
    args = parser.parse_args()
    if args.rebuild:
        print(rebuild_table([r for n in args.sizes.split(",") for r in rebuild(int(n), args.out, args.queries)]))
        return
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        rows += measure(n, args.out, args.methods.split(","), args.queries, args.runs)
        print(table(rows[-len(args.methods.split(",")):]), flush=True)  # partial results early
    print("\n" + table(rows))


if __name__ == "__main__":
    main()
