"""Query latency and recall@10 of the stored search index at 10^5 and 10^6 vectors, on CPU.

Vectors: clustered (200 centres, spread in norm) at the default dimension (ResNet-18, every
Conv2d/Linear, 16x16 projections: D = 5120), written as a real index (Parquet parts, float16
w to halve the disk) and indexed by `build_search_index` exactly as `build` does. Latency is
one query at a time through `SearchStore.search` with the shards resident (a query service),
top-10 by cosine, after one warm-up query; recall@10 is against the exact top-10 from a scan
of every part (`brute_force_top_k`).

    python benchmarks/search_latency.py                      # both sizes (~40 min, ~25 GB disk)
    python benchmarks/search_latency.py --sizes 100000 --queries 50
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from pipeline.config import SearchConfig
from pipeline.index.layout import MANIFEST
from pipeline.index.manifest import FORMAT
from pipeline.index.parts import part_table, publish_part
from pipeline.index.reader import Index
from pipeline.index.searchstore import SearchStore, brute_force_top_k, build_search_index
from pipeline.search import recall_at_k
from pipeline.storage import open_storage

CENTRES = 200
PART_ROWS = 50_000


def clustered(rng: np.random.Generator, centres: np.ndarray, n: int) -> np.ndarray:
    x = centres[rng.integers(len(centres), size=n)]
    x += 0.5 * rng.standard_normal((n, centres.shape[1]), dtype=np.float32)
    return x * rng.uniform(0.5, 2.0, size=(n, 1)).astype(np.float32)


def write_index(folder: Path, n: int, d: int, seed: int) -> tuple[Index, np.ndarray]:
    """An index of `n` clustered vectors in parts of PART_ROWS; returns it and its centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CENTRES, d), dtype=np.float32)
    storage = open_storage(str(folder))
    shards = []
    for number, lo in enumerate(range(0, n, PART_ROWS)):
        w = clustered(rng, centres, min(PART_ROWS, n - lo))
        keys = [f"p{number}-{row}" for row in range(len(w))]
        zeros = np.zeros(len(w), np.float32)
        table = part_table(keys, f"s{number}", w, zeros, zeros, [None] * len(w), [{}] * len(w),
                           vector_dtype="float16")  # fmt: skip
        marker = publish_part(storage, f"s{number:05d}", table, {})
        shards.append({"part": marker["part"], "examples": len(w), "part_sha256": "-"})
    manifest = {"format": FORMAT, "dimension": d, "shards": shards}
    storage.write_bytes(MANIFEST, json.dumps(manifest).encode())
    return Index(str(folder)), centres


def latencies(store: SearchStore, queries: np.ndarray, nprobe: int | None) -> list[float]:
    store.search(queries[:1], 10, nprobe=nprobe)  # warm-up: shards loaded and resident
    seconds = []
    for q in queries:
        started = time.perf_counter()
        store.search(q[None], 10, nprobe=nprobe)
        seconds.append(time.perf_counter() - started)
    return seconds


def measure(index: Index, kind: str, queries: np.ndarray, exact: np.ndarray) -> list[dict]:
    started = time.perf_counter()
    manifest = build_search_index(index, SearchConfig(kind=kind))
    built = time.perf_counter() - started
    store = SearchStore(index)
    nlist = None
    if kind == "ivfpq":
        nlist = store.load(manifest["shards"][0])[0].index
        import faiss

        nlist = faiss.extract_index_ivf(nlist).nlist
    rows = []
    for nprobe in [None] if kind == "flat" else [8, 32, max(1, nlist // 4)]:
        seconds = latencies(store, queries, nprobe)
        _, found = store.search(queries, 10, nprobe=nprobe)
        rows.append(
            {
                "kind": kind,
                "nprobe": nprobe or "-",
                "nlist": nlist or "-",
                "shards": len(manifest["shards"]),
                "build_s": round(built, 1),
                "median_ms": round(1000 * float(np.median(seconds)), 1),
                "p95_ms": round(1000 * float(np.quantile(seconds, 0.95)), 1),
                "recall_at_10": round(recall_at_k(found, exact), 3),
            }
        )
        print(rows[-1], flush=True)
    return rows


def run(n: int, d: int, num_queries: int, kinds: list[str], workdir: Path) -> list[dict]:
    folder = workdir / f"n{n}"
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    index, centres = write_index(folder, n, d, seed=0)
    print(f"N={n:,} D={d}: index written in {time.perf_counter() - started:.0f} s", flush=True)
    queries = clustered(np.random.default_rng(1), centres, num_queries)
    _, exact = brute_force_top_k(index, queries, 10, normalized=True)
    rows = [
        {"n": n, "d": d, **row} for kind in kinds for row in measure(index, kind, queries, exact)
    ]
    shutil.rmtree(folder, ignore_errors=True)
    return rows


def markdown(rows: list[dict], command: str) -> str:
    header = "| N | D | kind | shards | nlist | nprobe | build s | median ms | p95 ms | recall@10 |"
    lines = [f"`{command}`", "", header, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['d']} | {r['kind']} | {r['shards']} | {r['nlist']} | "
            f"{r['nprobe']} | {r['build_s']} | {r['median_ms']} | {r['p95_ms']} | "
            f"{r['recall_at_10']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=5120)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--workdir", default="/tmp/issl-search-bench")
    parser.add_argument("--out", default="benchmarks/results/search_latency.md")
    args = parser.parse_args()
    rows = []
    for n in args.sizes:
        kinds = ["flat", "ivfpq"] if n <= 100_000 else ["ivfpq"]
        rows += run(n, args.dim, args.queries, kinds, Path(args.workdir))
    sizes = " ".join(map(str, args.sizes))
    command = (
        f"python benchmarks/search_latency.py --sizes {sizes} --dim {args.dim} "
        f"--queries {args.queries}"
    )
    Path(args.out).write_text("# Search latency and recall\n\n" + markdown(rows, command))
    print(markdown(rows, command))


if __name__ == "__main__":
    main()
