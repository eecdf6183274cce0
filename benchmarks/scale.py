"""Wall time and peak memory of every offline verb against the index size N.

An index of N synthetic rows (D = 1,024, float16 w) is written through the real part writer
(`pipeline.index.parts`: the columns `build` writes, row groups, zstd) with a manifest the
verbs accept. The rows have structure the verbs can find: w is a mixture of 2,000 clusters
with the eigenvalue spectrum of real w, 1% of the rows are near-copies (cos ~0.99) of a row
of the previous part and 0.2% share a pixel hash with one, z is a fixed projection of w, and
metadata names one of 50 sources.

Each verb then runs in a fresh process (so peak RSS, from getrusage, is the verb's own):
the search index and the key lookup (the end of `build`), query by key, rank, groups,
dedup (influence and embedding), report, and a latency probe: 100 fresh queries searched one
at a time on one thread (median ms), recall@10 against an exact scan.

    python benchmarks/scale.py                       # N = 10^5, 10^6, 4 x 10^6
    python benchmarks/scale.py --sizes 100000 --s3   # also from and to S3 (moto on loopback)

Writes `benchmarks/results/scale.md` (appends a section; `--results` elsewhere). Needs
~2.1 N D bytes of disk. One verb on an index already written (`--keep`), in this process:

    OMP_NUM_THREADS=1 python benchmarks/scale.py --child latency --root /tmp/issl-scale/n1000000
    OMP_NUM_THREADS=1 python benchmarks/scale.py --child dedup_batch --root ...   # one batch
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

import numpy as np

RESULTS = Path(__file__).parent / "results" / "scale.md"
REPO = Path(__file__).resolve().parent.parent
PART_ROWS = 10_000
CLUSTERS = 2_000
SOURCES = 50
Z_DIM = 128
QUERY_KEYS = 3
LATENCY_QUERIES = 100
VERBS = (
    "search",
    "keys",
    "query",
    "latency",
    "rank",
    "groups",
    "dedup_influence",
    "dedup_embedding",
    "report",
)
# Also a child verb, not in the table: "dedup_batch", one edge batch timed alone.


# -- the synthetic index -------------------------------------------------------------------------


class Rows:
    """A seeded generator of index rows with clusters, near-copies and exact copies."""

    def __init__(self, dimension: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.dimension = dimension
        self.centres = unit(rng.standard_normal((CLUSTERS, dimension), dtype=np.float32))
        self.to_z = rng.standard_normal((dimension, Z_DIM), dtype=np.float32)
        # Coordinate i scaled by sqrt(lambda_i), lambda_i = 1 / (1 + (i / 16)^2.2): the
        # spectrum of real w (unit rows of benchmarks/real_recall.py's index, D = 1,424:
        # 49 / 87 / 98% of the energy in the top 16 / 64 / 256 directions; this: 56 / 90 /
        # 98%). Isotropic rows (41% in 256) cost dedup more: its bound on the cosine from
        # the top 256 directions prunes no candidate there.
        order = np.arange(1, dimension + 1, dtype=np.float64)
        self.spectrum = np.sqrt(1.0 / (1.0 + (order / 16.0) ** 2.2)).astype(np.float32)

    def vectors(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """w [n, D] (cluster centre + noise, with real w's spectrum, lognormal scale) and
        each row's cluster."""
        cluster = rng.integers(0, CLUSTERS, n)
        noise = rng.standard_normal((n, self.dimension), dtype=np.float32) / np.sqrt(self.dimension)
        scale = rng.lognormal(0.0, 0.5, (n, 1)).astype(np.float32)
        return scale * (self.centres[cluster] + 0.8 * noise) * self.spectrum, cluster

    def part(self, number: int, previous: dict | None) -> dict:
        rng = np.random.default_rng([number, 17])
        w, cluster = self.vectors(rng, PART_ROWS)
        # 32 uniform hex digits, as a real digest: dedup buckets hashes by their first ones.
        digest = rng.bytes(16 * PART_ROWS).hex()
        hashes = np.array([digest[32 * r : 32 * (r + 1)] for r in range(PART_ROWS)], dtype=object)
        if previous is not None:  # near-copies and exact copies of the previous part's rows
            near = rng.choice(PART_ROWS, PART_ROWS // 100, replace=False)
            source = rng.integers(0, PART_ROWS, len(near))
            jitter = rng.standard_normal((len(near), self.dimension), dtype=np.float32)
            w[near] = previous["w"][source] + 0.02 * jitter * np.linalg.norm(
                previous["w"][source], axis=1, keepdims=True
            ) / np.sqrt(self.dimension)
            cluster[near] = previous["cluster"][source]
            exact = near[: PART_ROWS // 500]
            hashes[exact] = previous["hashes"][source[: len(exact)]]
        return {"w": w, "cluster": cluster, "hashes": hashes}

    def z(self, w: np.ndarray) -> np.ndarray:
        return unit(w @ self.to_z)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_index(root: str, n: int, dimension: int) -> dict:
    """N rows in parts of PART_ROWS through the real writer; returns timings."""
    from pipeline.index.manifest import FORMAT, write_manifest
    from pipeline.index.parts import part_table, publish_part
    from pipeline.storage import open_storage

    started = time.perf_counter()
    storage = open_storage(root)
    rows = Rows(dimension)
    shards, previous = [], None
    for number in range(n // PART_ROWS):
        data = rows.part(number, previous)
        w = data["w"]
        start = number * PART_ROWS
        url = f"s3://corpus/shard-{number:06d}.tar"
        table = part_table(
            [f"img-{start + r:010d}" for r in range(PART_ROWS)],
            url,
            w,
            np.einsum("nd,nd->n", w, w),
            np.random.default_rng(number).uniform(0.0, 2.0, PART_ROWS).astype(np.float32),
            (data["cluster"] % 10).tolist(),
            [{"source": f"site-{c % SOURCES:02d}", "cluster": int(c)} for c in data["cluster"]],
            "float16",
            pixel_hashes=data["hashes"].tolist(),
            z=rows.z(w),
            tar_spans=(list(range(0, 4096 * PART_ROWS, 4096)), [4096] * PART_ROWS),
        )
        shard_id = f"shard-{number:06d}"
        marker = publish_part(storage, shard_id, table, {"shard": url, "shard_id": shard_id})
        shards.append(
            {
                "url": url,
                "id": shard_id,
                "examples": PART_ROWS,
                "part": marker["part"],
                "part_sha256": marker["part_sha256"],
            }
        )
        previous = data
    manifest = {
        "format": FORMAT,
        "dimension": dimension,
        "vector_dtype": "float16",
        "config": {"index": {"search": {}}},
        "shards": shards,
    }
    write_manifest(storage, manifest)
    return {"seconds": round(time.perf_counter() - started, 1)}


# -- one verb in this process -----------------------------------------------------------------


def run_verb(verb: str, root: str, dimension: int) -> dict:
    """Run `verb` on the index at `root`; returns what it measured beside time and memory."""
    from pipeline.index.reader import Index

    if verb == "search":
        from pipeline.index.searchstore import build_search_index, search_config_of

        index = Index(root)
        manifest = build_search_index(index, search_config_of(index.manifest))
        return {"kind": manifest["kind"], "shards": len(manifest["shards"])}
    if verb == "keys":
        from pipeline.index.keys import build_key_lookup

        return {"buckets": build_key_lookup(Index(root))["buckets"]}
    if verb == "query":
        from pipeline.query import QueryConfig, run_query

        n = Index(root).offsets()[-1]
        keys = [f"img-{row:010d}" for row in np.linspace(0, n - 1, QUERY_KEYS).astype(int)]
        results = run_query(QueryConfig(index=root, keys=keys, top=10))
        return {"rows": results.num_rows}
    if verb == "latency":
        return latency(root, dimension)
    if verb == "rank":
        from pipeline.rank import RankConfig, run_rank

        run_rank(RankConfig(index=root, top=10))
        return {}
    if verb == "groups":
        from pipeline.groups import GroupsConfig, run_groups

        stats, _ = run_groups(GroupsConfig(index=root, field="source"))
        return {"groups": stats.num_rows}
    if verb == "dedup_batch":
        return dedup_batch(root)
    if verb.startswith("dedup_"):
        from pipeline.dedup import DedupConfig, run_dedup
        from pipeline.index.layout import DEDUP_DIR

        mode = verb.removeprefix("dedup_")
        run_dedup(DedupConfig(index=root, mode=mode, refine=0))
        index = Index(root)
        summary = json.loads(index.storage.read_bytes(f"{DEDUP_DIR}/{mode}.summary.json"))
        keep = ("removed", "removed_exact", "removed_near", "groups", "examples_per_second")
        return {k: summary[k] for k in keep}
    if verb == "report":
        from pipeline.report import ReportConfig, run_report

        run_report(ReportConfig(index=root))
        return {}
    raise ValueError(f"unknown verb {verb!r}")


def dedup_batch(root: str) -> dict:
    """One of dedup's edge batches (the middle one, influence mode, default settings) as a
    worker runs it after another (the one before it, not counted: its imports and file
    checks warm): its rows per second of wall time and of this process's CPU time (the
    figure that holds on a shared machine). Its edges are written as dedup writes them."""
    from pipeline.dedup import DedupConfig
    from pipeline.dedup.edges import (
        batch_settings,
        edge_batch,
        ensure_search,
        fingerprint,
        manifest_digest,
        plan_batches,
    )
    from pipeline.index.reader import Index

    index = Index(root)
    config = DedupConfig(index=root, mode="influence", refine=0)
    directory, search = ensure_search(index, config, None)
    settings = batch_settings(config, directory, search, threads=1)
    batches = plan_batches(index, config.chunk)
    for batch in batches[len(batches) // 2 - 1 : len(batches) // 2 + 1]:
        task = {"batch": batch.id, "parts": list(batch.parts), "first_row": batch.first_row}
        task["rows"] = batch.rows
        task["fingerprint"] = fingerprint(settings, index, batch)
        wall, cpu = time.perf_counter(), time.process_time()
        marker = edge_batch(root, manifest_digest(index.manifest), settings, task)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "rows": marker["rows"],
        "edges": marker["edges"],
        "rows_per_s": round(marker["rows"] / wall),
        "rows_per_cpu_s": round(marker["rows"] / cpu),
    }


def latency(root: str, dimension: int) -> dict:
    """Median ms of a top-10 search, one query at a time on one thread, and recall@10."""
    import faiss

    from pipeline.index.reader import Index
    from pipeline.index.searchstore import SearchStore, brute_force_top_k
    from pipeline.search import recall_at_k

    faiss.omp_set_num_threads(1)
    index = Index(root)
    store = SearchStore(index)
    queries, _ = Rows(dimension).vectors(np.random.default_rng(999), LATENCY_QUERIES)
    seconds, found = timed_searches(store, queries, 10)
    _, exact = brute_force_top_k(index, queries, 10, normalized=store.normalized)
    return {
        "median_ms": round(1000 * float(np.median(seconds)), 2),
        "p90_ms": round(1000 * float(np.percentile(seconds, 90)), 2),
        "recall_at_10": round(recall_at_k(found, exact), 4),
    }


def peak_rss_mib() -> int:
    """This process's peak resident set (VmHWM). Not getrusage: Linux carries ru_maxrss over
    fork and exec, so a child would report at least its parent's size at the fork."""
    with open("/proc/self/status") as status:
        line = next(x for x in status if x.startswith("VmHWM:"))
    return round(int(line.split()[1]) / 1024)


def timed_searches(store, queries: np.ndarray, k: int) -> tuple[list[float], np.ndarray]:
    """Each query searched alone (after one warm-up search): seconds per query, rows [Q, k]."""
    store.search(queries[:1], k)  # load the shared parts once
    seconds, found = [], []
    for q in queries:
        started = time.perf_counter()
        _, rows = store.search(q[None], k)
        seconds.append(time.perf_counter() - started)
        found.append(rows[0])
    return seconds, np.stack(found)


def child(verb: str, root: str, dimension: int) -> None:
    started = time.perf_counter()
    found = run_verb(verb, root, dimension)
    found["seconds"] = round(time.perf_counter() - started, 2)
    found["max_rss_mib"] = peak_rss_mib()
    print("RESULT " + json.dumps(found), flush=True)


def measure(verb: str, root: str, dimension: int, env: dict | None = None) -> dict:
    command = [sys.executable, __file__, "--child", verb, "--root", root, "--dim", str(dimension)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode or not lines:
        tail = (done.stdout + done.stderr)[-3000:]
        return {"error": f"exit {done.returncode}: {tail}"}
    return json.loads(lines[-1].removeprefix("RESULT "))


# -- the benchmark --------------------------------------------------------------------------------


def run_size(n: int, dimension: int, folder: Path, verbs: list[str]) -> dict:
    root = str(folder / f"n{n}")
    shutil.rmtree(root, ignore_errors=True)
    print(f"\nN = {n:,}: writing the index ...", flush=True)
    results = {"write": {"write_seconds": write_index(root, n, dimension)["seconds"]}}
    for verb in verbs:
        results[verb] = measure(verb, root, dimension)
        print(f"  {verb}: {results[verb]}", flush=True)
    return results


def s3_agreement(n: int, dimension: int, folder: Path, verbs: list[str]) -> dict:
    """The same verbs on a copy of the index in S3 (moto on loopback); outputs compared."""
    from pipeline.testing.s3server import start_s3_server

    server, endpoint = start_s3_server()
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "INFLUENCE_SSL_CACHE": str(folder / "cache"),
    }
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    try:
        return run_on_s3(folder, n, dimension, verbs, env, endpoint)
    finally:  # later sizes must not meet the stopped endpoint (the synthetic shards are s3://)
        server.stop()
        os.environ.clear()
        os.environ.update(saved)


def run_on_s3(folder: Path, n: int, dimension: int, verbs: list[str], env: dict, endpoint: str):
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="scale")
    local = folder / f"n{n}"
    for path in sorted(local.rglob("*")):
        if path.is_file() and path.relative_to(local).parts[0] in ("manifest.json", "parts"):
            client.upload_file(str(path), "scale", f"index/{path.relative_to(local)}")
    results = {}
    for verb in verbs:
        results[verb] = measure(verb, "s3://scale/index", dimension, env)
        print(f"  s3 {verb}: {results[verb]}", flush=True)
    results["same_outputs"] = compare_outputs(str(local), "s3://scale/index")
    return results


def compare_outputs(local: str, remote: str) -> dict:
    """Each Parquet output the verbs wrote, local against S3: equal tables or not."""
    import pyarrow.parquet as pq

    from pipeline.storage import open_storage

    a, b = open_storage(local), open_storage(remote)
    same = {}
    for prefix in ("rank/", "groups/", "dedup/", "keys/", "query/"):
        for name in sorted(a.list(prefix)):
            if name.endswith(".parquet"):
                left = pq.read_table(a.local_path(name))
                right = pq.read_table(__import__("io").BytesIO(b.read_bytes(name)))
                same[name] = left.equals(right)
    return same


def write_results(dimension: int, sizes: list[int], found: dict, results: Path = RESULTS) -> None:
    verbs = [v for v in VERBS if any(v in found[n] for n in sizes)]
    lines = [
        f"\n## {time.strftime('%Y-%m-%d %H:%M')}: D = {dimension:,} (float16 w), "
        f"{os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}\n",
        "| verb | " + " | ".join(f"N = {n:,}: s / peak MiB" for n in sizes) + " | RSS ratio |",
        "|---" * (len(sizes) + 2) + "|",
    ]
    for verb in verbs:
        cells, rss = [], []
        for n in sizes:
            r = found[n].get(verb, {})
            if "error" in r:
                cells.append("error")
                continue
            cells.append(f"{r['seconds']} / {r['max_rss_mib']:,}")
            rss.append(r["max_rss_mib"])
        ratio = f"{rss[-1] / rss[0]:.2f}" if len(rss) > 1 else "-"
        lines.append(f"| {verb} | " + " | ".join(cells) + f" | {ratio} |")
    lines.append("")
    for n in sizes:
        timed = ("seconds", "max_rss_mib")
        extra = {v: {k: x for k, x in r.items() if k not in timed} for v, r in found[n].items()}
        lines.append(f"- N = {n:,}: {json.dumps(extra)}")
    if "s3" in found:
        lines.append(f"- S3 (N = {sizes[0]:,}): {json.dumps(found['s3'])}")
    results.parent.mkdir(parents=True, exist_ok=True)
    with results.open("a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100000,1000000,4000000")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--verbs", default=",".join(VERBS))
    parser.add_argument("--folder", default="/tmp/issl-scale")
    parser.add_argument("--s3", action="store_true", help="also run at the smallest N from S3")
    parser.add_argument("--keep", action="store_true", help="keep the indexes on disk")
    parser.add_argument("--results", default=str(RESULTS), help="where to append the table")
    parser.add_argument("--child", help="run one verb (or dedup_batch) on --root, print it")
    parser.add_argument("--root")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.root, args.dim)
        return
    folder = Path(args.folder)
    sizes = [int(s) for s in args.sizes.split(",")]
    verbs = args.verbs.split(",")
    found: dict = {}
    for n in sizes:
        found[n] = run_size(n, args.dim, folder, verbs)
        if args.s3 and n == sizes[0]:
            found["s3"] = s3_agreement(n, args.dim, folder, verbs)
        if not args.keep:
            shutil.rmtree(folder / f"n{n}", ignore_errors=True)
    write_results(args.dim, sizes, found, Path(args.results))


if __name__ == "__main__":
    main()
