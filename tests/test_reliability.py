"""Reliability (issue 6): leases, object-store faults, bad input, killed drivers, reruns.

Everything runs on loopback against the session Ray and the moto S3 server; the reference
for "equal to a clean run" is one fit + build of the real digit shards (module fixture).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from pipeline.build import run_build
from pipeline.config import to_dict
from pipeline.data import shard_id
from pipeline.fit import run_fit
from pipeline.index.layout import FACTORS, LEASE, MANIFEST, SUMMARY, marker_path, part_path
from pipeline.index.lease import Lease, LeaseHeldError, LeaseLostError
from pipeline.runtime import pool as pool_module
from pipeline.storage import LocalStorage, S3Storage, open_storage
from pipeline.testing.s3server import FAULTS, SECRET_KEY, FaultProxy
from tests.test_pipeline import (  # noqa: F401 (checkpoint is a fixture)
    assert_same_vectors,
    checkpoint,
    pipeline_config,
    png_bytes,
    read_index,
    worker_pids,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def clean(tmp_path_factory, ray_session, digit_shards, checkpoint):  # noqa: F811
    """A clean fit + build of the 4 digit shards: the reference index."""
    _, urls = digit_shards
    output = tmp_path_factory.mktemp("clean")
    config = pipeline_config(output, urls, checkpoint, address=ray_session.address)
    run_fit(config)
    run_build(config)
    return config, output


def keyed(table: pa.Table) -> pa.Table:
    """Rows sorted by key (a rerun may finish shards in another order)."""
    return table.sort_by("key")


def copy_fitted(src: Path, dst: Path) -> None:
    """An output with src's factors and manifest but nothing built, as `fit` would leave it."""
    storage, target = open_storage(str(src)), open_storage(str(dst))
    manifest = json.loads(storage.read_bytes(MANIFEST))
    manifest["shards"], manifest["stats"] = [], {}
    target.write_bytes(FACTORS, storage.read_bytes(FACTORS))
    target.write_bytes(MANIFEST, json.dumps(manifest).encode())


# ------------------------------------------------------------------------- storage + lease


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "out")
    request.getfixturevalue("s3_endpoint")
    import boto3

    bucket = f"lease-{os.getpid()}-{time.monotonic_ns()}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return S3Storage(bucket, "out")


def test_create_is_atomic_and_replace_if_compares(store) -> None:
    """Eight threads create one object at once: exactly one wins; CAS needs the exact bytes."""
    barrier = threading.Barrier(8)
    wins: list[int] = []

    def race(i: int) -> None:
        barrier.wait()
        if store.create("lease.json", f"owner {i}".encode()):
            wins.append(i)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(wins) == 1
    assert store.read_bytes("lease.json") == f"owner {wins[0]}".encode()
    assert not store.create("lease.json", b"late")
    assert not store.replace_if("lease.json", b"owner stale", b"x")
    assert store.replace_if("lease.json", f"owner {wins[0]}".encode(), b"next")
    assert store.read_bytes("lease.json") == b"next"
    assert store.replace_if("lease.json", b"next", None) and not store.exists("lease.json")
    assert not store.replace_if("lease.json", b"next", b"again")  # missing: no swap
    assert store.list() == []  # no lock or temp file is visible


def test_a_live_lease_is_refused_forced_and_then_lost(store, caplog) -> None:
    first = Lease(store, "build", ttl=30)
    first.acquire()
    holder = json.loads(store.read_bytes(LEASE))
    assert holder["owner"] == {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "id": first.id,
        "verb": "build",
    }
    with pytest.raises(LeaseHeldError) as refused:
        Lease(store, "fit").acquire()
    message = str(refused.value)
    assert f"pid {os.getpid()} on {socket.gethostname()}" in message and "--force" in message
    assert holder["expires_utc"] in message
    assert store.read_bytes(LEASE) == first.current  # the refused job changed nothing

    with (
        caplog.at_level(logging.WARNING, logger="pipeline.index.lease"),
        Lease(store, "fit", force=True) as second,
    ):
        assert "forced" in caplog.text
        assert not first.renew() and "now held by `fit`" in first.lost
        first.release()  # not ours any more: left alone
        assert json.loads(store.read_bytes(LEASE))["owner"]["id"] == second.id
    assert not store.exists(LEASE)  # released at the end
    with pytest.raises(LeaseLostError, match="taken over"):
        first.__exit__(None, None, None)


def test_expired_or_dead_leases_are_taken_over(store, caplog) -> None:
    """A lease from another host past its expiry, and one of a dead local process."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = {
        "other-host": {"host": "elsewhere", "pid": 1, "expires": time.time() - 1},
        "dead-pid": {"host": socket.gethostname(), "pid": gone.pid, "expires": time.time() + 600},
    }
    for name, owner in stale.items():
        body = {
            "owner": {"host": owner["host"], "pid": owner["pid"], "id": name, "verb": "build"},
            "acquired": time.time() - 700,
            "expires": owner["expires"],
        }
        store.write_bytes(LEASE, json.dumps(body).encode())
        caplog.clear()
        with (
            caplog.at_level(logging.WARNING, logger="pipeline.index.lease"),
            Lease(store, "build") as lease,
        ):
            assert json.loads(store.read_bytes(LEASE))["owner"]["id"] == lease.id
        assert ("expired at" if name == "other-host" else "process is gone") in caplog.text
        assert not store.exists(LEASE)
    # A live lease on another host is not taken over just because its pid is unknown here.
    live = {"owner": {"host": "elsewhere", "pid": 1, "id": "x", "verb": "fit"}}
    body = {**live, "acquired": 0, "expires": time.time() + 60}
    store.write_bytes(LEASE, json.dumps(body).encode())
    with pytest.raises(LeaseHeldError, match="elsewhere"):
        Lease(store, "build").acquire()


def test_the_heartbeat_renews_and_the_end_releases(tmp_path) -> None:
    store = LocalStorage(tmp_path)
    with Lease(store, "build", ttl=0.4):
        first = json.loads(store.read_bytes(LEASE))
        time.sleep(1.0)  # 0.4 s would have expired it: only renewals keep it live
        later = json.loads(store.read_bytes(LEASE))
        assert later["expires"] > first["expires"] and later["acquired"] == first["acquired"]
        with pytest.raises(LeaseHeldError):
            Lease(store, "build").acquire()
    assert not store.exists(LEASE)


def test_a_second_build_into_a_leased_output_is_refused(clean) -> None:
    config, output = clean
    other = Lease(open_storage(str(output)), "build")
    other.acquire()
    with pytest.raises(LeaseHeldError, match="another job is writing this output"):
        run_build(config)
    assert open_storage(str(output)).read_bytes(LEASE) == other.current
    forced = pipeline_config(output, config.input.shards, config.influence.model.checkpoint)
    forced.runtime, forced.force = config.runtime, True
    assert run_build(forced)["examples"] == 240  # nothing left to do; takes the lease over
    assert not other.renew() and other.lost == "removed"  # released by the forced build
    assert not open_storage(str(output)).exists(LEASE)


# --------------------------------------------------------------------- object-store faults


def test_fit_and_build_through_a_faulty_s3_equal_a_clean_run(
    clean, s3_endpoint, digit_shards, monkeypatch, caplog, ray_session
) -> None:
    """503s, 500s, resets and stalls past the read timeout on about a fifth of all requests
    (driver and workers alike): the index equals the clean run's, and no credential leaks
    into the logs (DEBUG) or the outputs."""
    import boto3

    config, clean_output = clean
    _, urls = digit_shards
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="faulty")
    for url in urls:
        s3.upload_file(url, "faulty", f"shards/{os.path.basename(url)}")
    with FaultProxy(s3_endpoint, rate=0.2, seed=6, stall=4.0) as proxy:
        env = {"AWS_ENDPOINT_URL": proxy.endpoint_url, "INFLUENCE_SSL_S3_READ_TIMEOUT": "1.5"}
        for name, value in env.items():
            monkeypatch.setenv(name, value)
            monkeypatch.setitem(pool_module.WORKER_ENV, name, value)  # the workers' env
        remote = pipeline_config(
            "s3://faulty/index",
            ["s3://faulty/shards/"],
            config.influence.model.checkpoint,
            address=config.runtime.address,
        )
        with caplog.at_level(logging.DEBUG):
            run_fit(remote)
            summary = run_build(remote)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)  # read back directly
    assert all(proxy.counts[kind] >= 1 for kind in FAULTS), proxy.counts
    assert summary["failed"] == [] and summary["examples"] == 240
    manifest, table = read_index("s3://faulty/index")
    _, expected = read_index(clean_output)
    assert table.column("key").to_pylist() == expected.column("key").to_pylist()
    assert_same_vectors(table, expected)
    assert manifest["stats"]["read"]["skipped"] == {}

    assert "x-amz" in caplog.text.lower()  # botocore's DEBUG output was captured
    written = open_storage("s3://faulty/index")
    texts = [caplog.text, *(written.read_bytes(p).decode("latin-1") for p in written.list())]
    logs = Path(f"/tmp/issl-ray-test-{os.getpid()}/session_latest/logs")
    texts += [p.read_text("latin-1") for p in logs.rglob("*") if p.is_file()]
    assert not [t for t in texts if SECRET_KEY in t]


# ------------------------------------------------------------------------------ bad input


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def member(tar: bytes, name: str) -> tarfile.TarInfo:
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        return tf.getmember(name)


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def digit_members(digits: torch.Tensor, keys: range) -> list[tuple[str, bytes]]:
    return [(f"g{i:04d}.png", png_bytes(digits[i])) for i in keys]


def test_a_mix_of_bad_input_is_skipped_and_counted(tmp_path, clean, digits) -> None:
    """Good digits mixed with each kind of broken input, through `build`: every good example
    is indexed once, every bad one counted under its reason in the summary and manifest."""
    config, clean_output = clean
    folder = tmp_path / "shards"
    folder.mkdir()
    gray = (digits[7, 0].numpy() * 255).astype(np.uint8)
    modes = {  # unexpected modes: converted and indexed, not skipped
        "cmyk": encoded(Image.fromarray(gray).convert("CMYK"), "JPEG"),
        "sixteen": encoded(Image.fromarray(gray.astype(np.uint16) * 257)),
        "palette": encoded(Image.fromarray(gray).convert("P")),
    }
    mixed = [
        *digit_members(digits, range(0, 5)),
        ("notimage.png", b"plain text, not an image"),  # undecodable_image
        ("cut.png", png_bytes(digits[5])[:40]),  # undecodable_image
        ("onlymeta.json", b'{"a": 1}'),  # missing_image
        ("onlytext.txt", b"no image field"),  # missing_image
        ("huge.png", encoded(Image.new("1", (3000, 3000)))),  # image_too_large
        *[(f"{name}.{'jpg' if name == 'cmyk' else 'png'}", data) for name, data in modes.items()],
        ("../../etc/passwd.png", png_bytes(digits[6])),  # a hostile key: indexed as data
        *digit_members(digits, range(10, 15)),
    ]
    good_tail = tar_bytes(digit_members(digits, range(20, 30)))
    cut_at = member(good_tail, "g0026.png").offset_data
    whole = tar_bytes(digit_members(digits, range(30, 40)))
    third = member(whole, "g0032.png").offset
    shards = {
        "s-0.tar": tar_bytes(mixed),
        "s-1.tar": good_tail[: cut_at + 100],  # truncated_shard: g0020..g0025 survive
        "s-2.tar": whole[:third] + b"\xff" * 512 + whole[third + 512 :],  # corrupt_tar
        "s-3.tar": b"",  # empty_shard
        # s-4.tar does not exist: missing_shard
        "s-5.tar": tar_bytes(digit_members(digits, range(40, 60))),
    }
    for name, data in shards.items():
        (folder / name).write_bytes(data)
    output = tmp_path / "index"
    copy_fitted(clean_output, output)
    bad = pipeline_config(output, [f"{folder}/s-{{0..5}}.tar"], config.influence.model.checkpoint)
    bad.runtime, bad.input.max_pixels = config.runtime, 1_000_000

    summary = run_build(bad)
    expected_keys = {
        *[f"g{i:04d}" for i in [*range(0, 5), *range(10, 15), *range(20, 26)]],
        *[f"g{i:04d}" for i in [*range(30, 32), *range(40, 60)]],
        *modes,
        "../../etc/passwd",
    }
    reasons = {
        "undecodable_image": 2,
        "missing_image": 2,
        "image_too_large": 1,
        "truncated_shard": 1,
        "corrupt_tar": 1,
        "empty_shard": 1,
        "missing_shard": 1,
    }
    stored = json.loads(open_storage(str(output)).read_bytes(SUMMARY))
    manifest, table = read_index(output)
    keys = table.column("key").to_pylist()
    assert sorted(keys) == sorted(expected_keys)  # every good example, once
    assert summary["failed"] == [] and summary["shards_done"] == 6
    for stats in (summary, stored, manifest["stats"]):
        assert stats["read"]["skipped"] == reasons
        assert stats["read"]["decoded"] == len(expected_keys) == stats["examples"]
    # Keys are data, never object names: everything written has a safe name.
    written = open_storage(str(output)).list()
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*", p) for p in written)
    assert not (tmp_path / "etc").exists()

    # The missing shard turns up: the rerun builds it (and only it), nothing is lost.
    parts_before = {p: (output / p).read_bytes() for p in written if p.startswith("parts/")}
    (folder / "s-4.tar").write_bytes(tar_bytes(digit_members(digits, range(60, 65))))
    rerun = run_build(bad)
    _, table = read_index(output)
    assert sorted(table.column("key").to_pylist()) == sorted(
        expected_keys | {f"g{i:04d}" for i in range(60, 65)}
    )
    assert "missing_shard" not in rerun["read"]["skipped"]
    assert not any(p.endswith(".retry") for p in open_storage(str(output)).list("markers/"))
    changed = [p for p, data in parts_before.items() if (output / p).read_bytes() != data]
    assert changed == [p for p in parts_before if "s-4" in p]


# ----------------------------------------------------------------------- crashes and reruns


def test_a_part_without_its_marker_is_redone_without_duplicates(clean, tmp_path) -> None:
    """A crash between part and marker: the rerun rewrites that part; no row twice."""
    config, clean_output = clean
    output = tmp_path / "crashed"
    shutil.copytree(clean_output, output)
    storage = open_storage(str(output))
    victim = shard_id(config.input.shards[1])
    good_part = storage.read_bytes(part_path(victim))
    doubled = pq.read_table(io.BytesIO(good_part))
    sink = io.BytesIO()
    pq.write_table(pa.concat_tables([doubled, doubled]), sink)  # a half-written-twice part
    storage.write_bytes(part_path(victim), sink.getvalue())
    storage.delete(marker_path(victim))
    others = {m: storage.read_bytes(m) for m in storage.list("markers/")}

    rerun = pipeline_config(output, config.input.shards, config.influence.model.checkpoint)
    rerun.runtime = config.runtime
    assert run_build(rerun)["examples"] == 240
    assert storage.read_bytes(part_path(victim)) == good_part
    assert {m: storage.read_bytes(m) for m in others} == others
    _, table = read_index(output)
    keys = table.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 240


def test_a_killed_driver_is_finished_by_the_rerun(
    clean, tmp_path, digits, ray_session, capfd
) -> None:
    """kill -9 `python -m jobs.build` once some shards are done; the rerun takes over the
    dead driver's lease, processes only the rest, and the index equals a clean build."""
    from pipeline.data import write_shards

    config, clean_output = clean
    samples = [
        (f"d{i:04d}", (digits[i, 0].numpy() * 255).round().astype(np.uint8), {"cls": i // 60})
        for i in range(240)
    ]
    urls = write_shards(str(tmp_path / "shards"), samples, per_shard=10, prefix="many")
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    for output in (reference, killed):
        copy_fitted(clean_output, output)
    job = pipeline_config(killed, urls, config.influence.model.checkpoint)
    job.runtime.address = ray_session.address
    job.runtime.queue_depth = 1
    job.influence.batch_size = 2  # slower shards: a wide window to kill in
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(to_dict(job)))

    before = set(worker_pids())
    driver = subprocess.Popen(
        [sys.executable, "-m", "jobs.build", "--config", str(path)],
        cwd=REPO,
        env={k: v for k, v in ray_session.env.items() if k != "RAY_ADDRESS"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    markers = killed / "markers"
    deadline = time.monotonic() + 240
    while not (markers.is_dir() and len(list(markers.iterdir())) >= 3):
        assert driver.poll() is None, "the build ended before it could be killed"
        assert time.monotonic() < deadline, "no shard finished in time"
        time.sleep(0.05)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    # Its actors die with its job; wait for them, so nothing writes behind the rerun's back.
    deadline = time.monotonic() + 60
    while set(worker_pids()) - before and time.monotonic() < deadline:
        time.sleep(0.2)
    storage = open_storage(str(killed))
    done = {m: storage.read_bytes(m) for m in storage.list("markers/")}
    assert 3 <= len(done) < len(urls), len(done)
    assert storage.exists(LEASE)  # the dead driver's lease is still there

    capfd.readouterr()
    rerun = pipeline_config(killed, urls, config.influence.model.checkpoint)
    rerun.runtime = config.runtime
    summary = run_build(rerun)
    printed = capfd.readouterr().out
    assert f"{len(done)} of {len(urls)} shards already done, {len(urls) - len(done)}" in printed
    assert {m: storage.read_bytes(m) for m in done} == done  # finished shards untouched
    assert summary["examples"] == 240 and summary["failed"] == []

    fresh = pipeline_config(reference, urls, config.influence.model.checkpoint)
    fresh.runtime = config.runtime
    run_build(fresh)
    _, expected = read_index(reference)
    _, table = read_index(killed)
    assert keyed(table).column("key").to_pylist() == keyed(expected).column("key").to_pylist()
    assert_same_vectors(keyed(table), keyed(expected))


# ------------------------------------------------------------------------------ guard rails


class Payload:
    """A pickle that runs code when loaded (here: creates a file)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_pickled_checkpoint_never_runs_code(tmp_path) -> None:
    from pipeline.models import build_encoder
    from pipeline.models.loading import CheckpointError
    from tests.test_pipeline import model_config

    touched = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": Payload(touched)}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        build_encoder(model_config(str(path)))
    assert not touched.exists()


def test_nothing_reads_pickles() -> None:
    """Every torch.load passes weights_only=True; no pickle/marshal/np.load(allow_pickle)."""
    import ast

    for path in (REPO / "pipeline").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            flags = {k.arg: ast.unparse(k.value) for k in node.keywords}
            assert name not in ("pickle.load", "pickle.loads", "marshal.loads"), path
            assert not (name == "torch.load" and flags.get("weights_only") != "True"), path
            assert flags.get("allow_pickle") != "True", path
