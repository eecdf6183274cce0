"""Query latency (one thread) and recall@10 of the stored search index, on CPU.

Vectors: clustered (`--centres` Gaussian centres plus isotropic noise of 0.5 per coordinate,
scaled by U(0.5, 2)) at `--dim` (default 1,024), written as a real index (Parquet parts of
10,000 rows, float16 w) and indexed by `build_search_index` with the default settings, as
`build` does. Latency: one query at a time through `SearchStore.search` on one thread
(`threads=1`; run under OMP_NUM_THREADS=1 so BLAS is single-threaded too), top-10 by cosine,
shards open after a warm-up query (re-rank vectors read with pread per call); recall@10 is
against the exact top-10 of a scan of every part (`brute_force_top_k`). The first row of each
size is the defaults; the others sweep nprobe and the candidates re-ranked.

    OMP_NUM_THREADS=1 python benchmarks/search_latency.py --sizes 1000000   # the issue's target
    OMP_NUM_THREADS=1 python benchmarks/search_latency.py --sizes 100000 --queries 50

The issue's target: median <= 50 ms at 10^6 vectors (D = 1,024), recall@10 >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import numpy as np

from pipeline.config import SearchConfig
from pipeline.index.layout import MANIFEST
from pipeline.index.manifest import FORMAT
from pipeline.index.parts import part_table, publish_part
from pipeline.index.reader import Index
from pipeline.index.searchstore import (
    CANDIDATES_PER_RESULT,
    SearchStore,
    brute_force_top_k,
    build_search_index,
    default_nprobe,
)
from pipeline.search import recall_at_k
from pipeline.storage import open_storage
from pipeline.testing import clustered

PART_ROWS = 10_000
K = 10
SPREAD = 0.5  # of the points around their centre


def write_index(folder: Path, n: int, d: int, centres: int, seed: int) -> tuple[Index, np.ndarray]:
    """An index of `n` clustered vectors in parts of PART_ROWS; returns it and its centres."""
    rng = np.random.default_rng(seed)
    points = rng.standard_normal((centres, d), dtype=np.float32)
    storage = open_storage(str(folder))
    shards = []
    for number, lo in enumerate(range(0, n, PART_ROWS)):
        w = clustered(min(PART_ROWS, n - lo), d, points, rng, spread=SPREAD)
        keys = [f"p{number}-{row}" for row in range(len(w))]
        zeros = np.zeros(len(w), np.float32)
        table = part_table(keys, f"s{number}", w, zeros, zeros, [None] * len(w), [{}] * len(w),
                           vector_dtype="float16")  # fmt: skip
        marker = publish_part(storage, f"s{number:05d}", table, {})
        shards.append({"part": marker["part"], "examples": len(w), "part_sha256": "-"})
    manifest = {"format": FORMAT, "dimension": d, "shards": shards}
    storage.write_bytes(MANIFEST, json.dumps(manifest).encode())
    return Index(str(folder)), points


def latencies(store: SearchStore, queries: np.ndarray, **settings) -> list[float]:
    store.search(queries[:1], K, **settings)  # warm-up: shards opened
    seconds = []
    for q in queries:
        started = time.perf_counter()
        store.search(q[None], K, **settings)
        seconds.append(time.perf_counter() - started)
    return seconds


def measure(index: Index, kind: str, queries: np.ndarray, exact: np.ndarray) -> list[dict]:
    started = time.perf_counter()
    manifest = build_search_index(index, SearchConfig(kind=kind))
    built = time.perf_counter() - started
    store = SearchStore(index, threads=1)
    nlist = store.nlist
    base = default_nprobe(nlist) if nlist else None
    sweep = [(None, None)]
    if manifest["kind"] == "ivfpq":
        sweep += [(max(8, base // 4), None), (base * 2, None), (None, 30 * K), (None, 100 * K)]
    rows = []
    for nprobe, candidates in sweep:
        seconds = latencies(store, queries, nprobe=nprobe, candidates=candidates)
        _, found = store.search(queries, K, nprobe=nprobe, candidates=candidates)
        rows.append(
            {
                "kind": manifest["kind"],
                "nlist": nlist or "-",
                "nprobe": (nprobe or base) if nlist else "-",
                "candidates": (candidates or CANDIDATES_PER_RESULT * K) if nlist else "-",
                "shards": len(manifest["shards"]),
                "build_s": round(built, 1),
                "median_ms": round(1000 * float(np.median(seconds)), 2),
                "p95_ms": round(1000 * float(np.quantile(seconds, 0.95)), 2),
                "recall_at_10": round(recall_at_k(found, exact), 3),
                "max_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            }
        )
        print(rows[-1], flush=True)
    store.close()
    return rows


def run(
    n: int, d: int, centres: int, kinds: list[str], num_queries: int, workdir: Path
) -> list[dict]:
    folder = workdir / f"n{n}"
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    index, points = write_index(folder, n, d, centres, seed=0)
    print(f"N={n:,} D={d}: index written in {time.perf_counter() - started:.0f} s", flush=True)
    queries = clustered(num_queries, points.shape[1], points, 1, spread=SPREAD)
    _, exact = brute_force_top_k(index, queries, K, normalized=True)
    rows = [
        {"n": n, "d": d, "centres": centres, **row}
        for kind in kinds
        for row in measure(index, kind, queries, exact)
    ]
    shutil.rmtree(folder, ignore_errors=True)
    return rows


COLUMNS = ["n", "d", "centres", "kind", "shards", "nlist", "nprobe", "candidates", "build_s",
           "median_ms", "p95_ms", "recall_at_10", "max_rss_gib"]  # fmt: skip


def markdown(rows: list[dict], command: str) -> str:
    lines = [f"`{command}`", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append(
            "| " + " | ".join(f"{r[c]:,}" if c == "n" else str(r[c]) for c in COLUMNS) + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--centres", type=int, default=200)
    parser.add_argument("--kinds", nargs="+", default=["auto"], help="auto, flat, ivfpq")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--workdir", default="/tmp/issl-search-bench")
    parser.add_argument("--out", default="benchmarks/results/search_latency.md")
    args = parser.parse_args()
    rows = []
    for n in args.sizes:
        rows += run(n, args.dim, args.centres, args.kinds, args.queries, Path(args.workdir))
    sizes = " ".join(map(str, args.sizes))
    command = (
        f"OMP_NUM_THREADS=1 python benchmarks/search_latency.py --sizes {sizes} --dim {args.dim} "
        f"--centres {args.centres} --kinds {' '.join(args.kinds)} --queries {args.queries}"
    )
    Path(args.out).write_text("# Search latency and recall\n\n" + markdown(rows, command))
    print(markdown(rows, command))


if __name__ == "__main__":
    main()
