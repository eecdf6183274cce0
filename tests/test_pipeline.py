"""fit + build on a real local Ray over real tar shards, read back with plain pyarrow."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import safetensors.torch
import torch
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
)
from pipeline.data import decode_image
from pipeline.fit import run_fit
from pipeline.index.layout import FACTORS, MANIFEST
from pipeline.index.manifest import IndexMismatchError
from pipeline.influence.engine import InfluenceSSL
from pipeline.influence.reliability import measure as measure_reliability
from pipeline.models import build_encoder
from pipeline.storage import open_storage


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(1)
    encoder = build_encoder(model_config(None))
    path = tmp_path_factory.mktemp("ckpt") / "small.safetensors"
    save_file(encoder.state_dict(), str(path))
    return str(path)


def model_config(checkpoint: str | None) -> ModelConfig:
    return ModelConfig(
        arch="small_cnn",
        in_channels=1,
        projector_dims=[16, 8],
        checkpoint=checkpoint,
        kwargs={"width": 4, "out_dim": 16},
    )


def pipeline_config(output, shards, checkpoint, workers=1, address=None) -> PipelineConfig:
    config = PipelineConfig(output=str(output))
    config.input.shards = [str(s) for s in shards]
    config.influence = InfluenceConfig(
        model=model_config(checkpoint),
        augment=AugmentConfig(size=28, flip_p=0.0),
        loss=LossConfig(num_views=4),
        projection=ProjectionConfig(dim_in=8, dim_out=8),
        batch_size=32,
        device="cpu",
    )
    config.runtime = RuntimeConfig(num_workers=workers, cpus_per_worker=1, address=address)
    return config


def same_job(config: PipelineConfig, output) -> PipelineConfig:
    """The built fixture's job (shards, model, cluster) written to another output."""
    return pipeline_config(
        output,
        config.input.shards,
        config.influence.model.checkpoint,
        address=config.runtime.address,
    )


def read_index(output) -> tuple[dict, pa.Table]:
    """The manifest and all parts, with nothing but pyarrow and the storage bytes."""
    storage = open_storage(str(output))
    manifest = json.loads(storage.read_bytes(MANIFEST))
    parts = [pq.read_table(io.BytesIO(storage.read_bytes(s["part"]))) for s in manifest["shards"]]
    return manifest, pa.concat_tables(parts)


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_session, digit_shards, checkpoint):
    folder, urls = digit_shards
    output = tmp_path_factory.mktemp("index")
    spec = [f"{folder}/digits-{{000000..000003}}.tar"]
    config = pipeline_config(output, spec, checkpoint, address=ray_session.address)
    run_fit(config)
    summary = run_build(config)
    return config, summary, output, urls


def test_index_has_every_key_once_and_matches_in_memory_api(built, digits):
    config, summary, output, urls = built
    manifest, table = read_index(output)
    keys = table.column("key").to_pylist()
    assert sorted(keys) == [f"d{i:04d}" for i in range(240)]
    assert summary["examples"] == 240 and summary["failed"] == []
    assert [s["url"] for s in manifest["shards"]] == urls
    assert table.column("cls").to_pylist() == [i // 60 for i in range(240)]
    assert json.loads(table.column("metadata")[0].as_py()) == {"cls": 0, "source": "mnist"}

    # The same examples through the in-memory API, with the factors the job wrote.
    engine = InfluenceSSL(build_encoder(config.influence.model), config.influence)
    engine.load_factors_bytes(open_storage(str(output)).read_bytes(FACTORS))
    images = torch.stack([decode_image(png_bytes(digits[i]), 28, 1) for i in range(240)])
    expected = engine.embed(images, keys=[f"d{i:04d}" for i in range(240)]).numpy()
    w = np.stack(table.column("w").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(w, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    np.testing.assert_allclose(
        table.column("self_influence").to_numpy(), (expected**2).sum(1), rtol=1e-3
    )
    assert manifest["dimension"] == w.shape[1] == engine.dimension
    assert manifest["factors"]["examples"] == 240

    # Reliability: the same sample embedded with the independent views V..2V-1, compared.
    second = engine.use_views(4, 4).embed(images, keys=[f"d{i:04d}" for i in range(240)])
    wanted = measure_reliability(torch.from_numpy(expected), second, 4)
    recorded = manifest["reliability"]
    assert recorded["views"] == 4 and recorded["sample"] == 240
    for name in ("median_cos", "self_influence_spearman", "top10_overlap"):
        assert recorded[name] == pytest.approx(wanted[name], abs=2e-3)
    assert summary["reliability"] == recorded


def assert_same_vectors(table: pa.Table, expected: pa.Table) -> None:
    """Equal w up to float rounding: an eigendecomposition in another process (another
    thread count) may differ in the last bits, and in near-null directions of the Fisher."""
    actual = np.stack(table.column("w").to_numpy(zero_copy_only=False))
    wanted = np.stack(expected.column("w").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(actual, wanted, rtol=1e-4, atol=1e-5 * np.abs(wanted).max())


def png_bytes(image: torch.Tensor) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_rerun_after_losing_one_shard_rewrites_only_that_shard(built):
    config, _, output, _urls = built
    storage = open_storage(str(output))
    markers = sorted(storage.list("markers/"))
    before = {m: storage.read_bytes(m) for m in markers}
    parts_before = {p: storage.read_bytes(p) for p in storage.list("parts/")}
    lost_marker = markers[2]
    lost_part = "parts/" + lost_marker.split("/")[1].replace(".json", ".parquet")
    storage.delete(lost_marker)
    storage.delete(lost_part)

    summary = run_build(config)
    assert summary["examples"] == 240
    for marker in markers:
        if marker != lost_marker:
            assert storage.read_bytes(marker) == before[marker]  # untouched
    assert storage.read_bytes(lost_part) == parts_before[lost_part]  # same bytes again
    assert json.loads(storage.read_bytes(lost_marker))["rows"] == 60


def test_two_workers_give_the_same_index(built, tmp_path, digit_shards, checkpoint):
    config, _, output, urls = built
    two = pipeline_config(tmp_path / "two", urls, checkpoint, 2, config.runtime.address)
    run_fit(two)
    run_build(two)
    _, one_table = read_index(output)
    _, two_table = read_index(tmp_path / "two")
    assert one_table.column("key").to_pylist() == two_table.column("key").to_pylist()
    assert_same_vectors(two_table, one_table)


def test_build_refuses_an_index_fitted_with_other_settings(built):
    config, _, output, _ = built
    config = pipeline_config(output, config.input.shards, config.influence.model.checkpoint)
    config.influence.projection.dim_in = 4
    with pytest.raises(IndexMismatchError, match=r"projection\.dim_in"):
        run_build(config)
    with pytest.raises(IndexMismatchError, match="overwrite=true"):
        run_fit(config)


def test_ray_job_submit_builds_the_same_index(built, ray_session, tmp_path):
    """`ray job submit --working-dir . -- python -m jobs.fit/build` against the test's head."""
    import yaml
    from ray.job_submission import JobStatus, JobSubmissionClient

    from pipeline.config import to_dict

    config, _, output, _ = built
    submitted = pipeline_config(
        tmp_path / "job", config.input.shards, config.influence.model.checkpoint
    )
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(to_dict(submitted)))
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for verb in ("fit", "build"):
        result = subprocess.run(
            [
                ray_bin,
                "job",
                "submit",
                "--address",
                ray_session.dashboard,
                "--working-dir",
                repo,
                "--",
                sys.executable,
                "-m",
                f"jobs.{verb}",
                "--config",
                str(config_path),
            ],
            env=ray_session.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        log = result.stdout + result.stderr
        assert result.returncode == 0, log[-3000:]
        job_id = re.search(r"Job '(raysubmit_\w+)' succeeded", log).group(1)
        status = JobSubmissionClient(ray_session.dashboard).get_job_status(job_id)
        assert status == JobStatus.SUCCEEDED
    _, expected = read_index(output)
    _, table = read_index(tmp_path / "job")
    assert table.column("key").to_pylist() == expected.column("key").to_pylist()
    assert_same_vectors(table, expected)


def test_fit_and_build_from_and_to_s3(built, s3_endpoint, digit_shards):
    """Shards read from, and the index written to, an S3 API server on 127.0.0.1."""
    import boto3

    config, _, local_output, _ = built
    _, urls = digit_shards
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="corpus-e2e")
    for url in urls:
        s3.upload_file(url, "corpus-e2e", f"shards/{os.path.basename(url)}")
    remote = pipeline_config(
        "s3://corpus-e2e/index/run-1",
        ["s3://corpus-e2e/shards/"],
        config.influence.model.checkpoint,
        address=config.runtime.address,
    )
    run_fit(remote)
    summary = run_build(remote)
    assert summary["examples"] == 240 and summary["failed"] == []
    manifest, table = read_index("s3://corpus-e2e/index/run-1")
    _, local = read_index(local_output)
    assert table.column("key").to_pylist() == local.column("key").to_pylist()
    assert all(s["url"].startswith("s3://corpus-e2e/shards/") for s in manifest["shards"])
    assert all(s["shard_sha256"] and s["shard_complete"] for s in manifest["shards"])
    assert_same_vectors(table, local)


def test_a_killed_worker_is_replaced_and_the_index_is_complete(built, tmp_path):
    """SIGKILL a worker actor's process mid-build: its shard is retried on a new actor."""

    config, _, output, _ = built
    killed = same_job(config, tmp_path / "killed")
    run_fit(killed)
    victims: list[int] = []
    before = set(worker_pids())
    markers = tmp_path / "killed" / "markers"

    # Once the first shard is published, SIGKILL this build's worker (mid-shard).
    killer = start_killer(before, victims, lambda: markers.is_dir() and any(markers.iterdir()))
    summary = run_build(killed)
    killer.join(timeout=5)
    assert victims, "no worker process was found to kill"
    assert summary["worker_restarts_this_run"] >= 1
    assert summary["failed"] == [] and summary["examples"] == 240
    _, expected = read_index(output)
    _, table = read_index(tmp_path / "killed")
    assert table.column("key").to_pylist() == expected.column("key").to_pylist()
    assert_same_vectors(table, expected)


def test_a_worker_killed_mid_fit_gives_bit_identical_factors(built, tmp_path):
    """SIGKILL the fit's worker as soon as it exists: its blocks (both in flight) fail, are
    split into halves and rerun on a new actor, and the factors equal the clean run's to
    the last bit (one tree order)."""

    config, _, output, _ = built
    killed = same_job(config, tmp_path / "killed-fit")
    victims: list[int] = []
    before = set(worker_pids())

    killer = start_killer(before, victims, lambda: True)
    manifest = run_fit(killed)
    killer.join(timeout=5)
    assert victims, "no worker process was found to kill"
    assert manifest["factors"]["failed_shards"] == []
    assert manifest["factors"]["examples"] == 240
    clean = safetensors.torch.load(open_storage(str(output)).read_bytes(FACTORS))
    again = safetensors.torch.load(open_storage(str(tmp_path / "killed-fit")).read_bytes(FACTORS))
    assert clean.keys() == again.keys()
    assert all(torch.equal(clean[name], again[name]) for name in clean)


def start_killer(before: set[int], victims: list[int], when) -> threading.Thread:
    """A thread that SIGKILLs the first new worker process once `when()` holds."""
    import psutil

    def kill() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            fresh = [pid for pid in worker_pids() if pid not in before]
            if fresh and when():
                psutil.Process(fresh[0]).kill()
                victims.append(fresh[0])
                return
            time.sleep(0.02)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def worker_pids() -> list[int]:
    import psutil

    pids = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if "ShardWorker" in " ".join(process.info["cmdline"] or []):
            pids.append(process.pid)
    return pids


def test_rank_orders_the_index_by_self_influence(built, capsys):
    """`influence-ssl rank` on the built index: every example once, descending, written."""
    from pipeline.cli import main
    from pipeline.index.reader import Index
    from pipeline.rank import read_ranked

    _, _, output, _ = built
    assert main(["rank", "--out", str(output), "--set", "top=3"]) == 0
    printed = capsys.readouterr().out
    assert "highest self-influence" in printed and "240 examples ranked" in printed
    ranked = read_ranked(Index(str(output)))
    scores = ranked.column("self_influence").to_numpy()
    assert ranked.num_rows == 240 and sorted(ranked.column("key").to_pylist()) == [
        f"d{i:04d}" for i in range(240)
    ]
    assert (np.diff(scores) <= 0).all() and ranked.column("rank").to_pylist() == list(range(240))
    _, table = read_index(output)
    keys, values = table.column("key").to_pylist(), table.column("self_influence").to_pylist()
    by_key = dict(zip(keys, values, strict=True))
    ranked_keys = ranked.column("key").to_pylist()
    assert all(by_key[k] == s for k, s in zip(ranked_keys, scores, strict=True))
    with pytest.raises(FileNotFoundError, match="no index"):
        Index(os.path.join(output, "nothing-here"))


def test_rank_refine_reorders_the_top_by_self_influence_with_more_views(
    built, digits, capsys, tmp_path
):
    """`rank --set refine=16`: the index's top 10 re-embedded with 16 views (images read back
    from their shards), ordered by ||w_16||^2; a rank without it drops the stale file."""
    from pipeline.cli import main
    from pipeline.index.reader import Index
    from pipeline.rank import REFINED, read_rank_summary, read_ranked

    config, _, output, _ = built
    settings = ["--set", "refine=16", "--set", "refine_top=10", "--set", "top=4"]
    assert main(["rank", "--out", str(output), *settings]) == 0
    printed = capsys.readouterr().out
    assert "refined with 16 views (10 of the top 10 re-embedded" in printed
    index = Index(str(output))
    refined = pq.read_table(os.path.join(output, REFINED))
    top = read_ranked(index).slice(0, 10)
    assert sorted(refined.column("key").to_pylist()) == sorted(top.column("key").to_pylist())
    assert refined.column("refined").to_pylist() == [True] * 10
    assert refined.column("refined_rank").to_pylist() == list(range(10))
    values = refined.column("refined_self_influence").to_numpy()
    assert (np.diff(values) <= 0).all()
    # The refined values are ||w||^2 of w with 16 views, computed here in memory.
    engine = InfluenceSSL(build_encoder(config.influence.model), config.influence)
    engine.load_factors_bytes(open_storage(str(output)).read_bytes(FACTORS)).use_views(16)
    keys = refined.column("key").to_pylist()
    images = torch.stack([decode_image(png_bytes(digits[int(k[1:])]), 28, 1) for k in keys])
    expected = engine.embed(images, keys=keys).double().pow(2).sum(1).numpy()
    np.testing.assert_allclose(values, expected, rtol=1e-3)
    stored = dict(zip(top.column("key").to_pylist(), top.column("rank").to_pylist(), strict=True))
    assert refined.column("rank").to_pylist() == [stored[k] for k in keys]
    summary = read_rank_summary(index)["refined"]
    assert summary["views"] == 16 and summary["rows"] == summary["refined"] == 10
    assert -1 <= summary["spearman_stored_refined"] <= 1 and 0 <= summary["top20_kept"] <= 1
    from pipeline.report import ReportConfig, run_report

    run_report(ReportConfig(str(output), out=str(tmp_path / "report")))
    html = (tmp_path / "report" / "index.html").read_text()
    assert "highest, refined with 16 views," in html and f"(index #{stored[keys[0]]})" in html
    assert main(["rank", "--out", str(output), "--set", "top=0"]) == 0
    assert not os.path.exists(os.path.join(output, REFINED))
    assert "refined" not in read_rank_summary(index)
    assert main(["rank", "--out", str(output), "--set", "refine=1"]) == 2
    assert "refine = 0 (off) or >= 2 views" in capsys.readouterr().err


def test_query_by_key_finds_the_example_itself_first_when_asked(built, tmp_path):
    from pipeline.query import QueryConfig, run_query

    _, _, output, _ = built
    keys = ["d0005", "d0123", "d0230"]
    out = tmp_path / "query.csv"
    query = QueryConfig(index=str(output), keys=keys, top=5, out=str(out), include_self=True)
    results = run_query(query)
    kept = pq.read_table(os.path.join(output, "query", "results.parquet"))
    assert kept.equals(results)
    # By default a key's own row is left out: the same ranking from the second hit on.
    default = run_query(dataclasses.replace(query, include_self=False, out=None, save=False))
    for key in keys:
        for direction in ("proponent", "opponent"):
            mine, without = (
                [
                    r["key"]
                    for r in t.to_pylist()
                    if r["query"] == key and r["direction"] == direction
                ]
                for t in (results, default)
            )
            assert key not in without and len(without) == 5
            assert without[:4] == [k for k in mine if k != key][:4]
    rows = results.to_pylist()
    _, table = read_index(output)
    w = np.stack(table.column("w").to_numpy(zero_copy_only=False)).astype(np.float64)
    row_of = {k: i for i, k in enumerate(table.column("key").to_pylist())}
    for key in keys:
        mine = [r for r in rows if r["query"] == key]
        proponents = [r for r in mine if r["direction"] == "proponent"]
        opponents = [r for r in mine if r["direction"] == "opponent"]
        assert len(proponents) == len(opponents) == 5
        assert proponents[0]["key"] == key  # cos(w, w) = 1 is the top normalised influence
        assert proponents[0]["normalized_influence"] == pytest.approx(1.0, abs=1e-5)
        cosine = w @ w[row_of[key]] / (np.linalg.norm(w, axis=1) * np.linalg.norm(w[row_of[key]]))
        expected = [table.column("key")[int(i)].as_py() for i in np.argsort(-cosine)[:5]]
        assert [r["key"] for r in proponents] == expected
        assert [r["key"] for r in opponents] == [
            table.column("key")[int(i)].as_py() for i in np.argsort(cosine)[:5]
        ]
        for r in mine:
            exact = float(w[row_of[key]] @ w[row_of[r["key"]]])
            assert r["influence"] == pytest.approx(exact, rel=1e-4, abs=1e-6 * abs(exact) + 1e-9)
    written = out.read_text().splitlines()
    assert len(written) == 1 + 30 and written[0].startswith('"query"')
    with pytest.raises(KeyError, match="not in the index"):
        run_query(QueryConfig(index=str(output), keys=["no-such-key"]))


def test_query_refine_reembeds_candidates_read_back_from_their_shards(built, digits):
    from pipeline.query import QueryConfig, run_query

    config, _, output, _ = built
    query = QueryConfig(index=str(output), keys=["d0007"], top=4, save=False, include_self=True)
    refined = run_query(dataclasses.replace(query, refine=16, refine_candidates=12))
    assert refined.column("refined").to_pylist() == [True] * 8
    proponents = [r for r in refined.to_pylist() if r["direction"] == "proponent"]
    assert proponents[0]["key"] == "d0007"
    assert proponents[0]["normalized_influence"] == pytest.approx(1.0, abs=1e-5)
    # The refined scores are those of w with 16 views, computed here in memory.
    engine = InfluenceSSL(build_encoder(config.influence.model), config.influence)
    engine.load_factors_bytes(open_storage(str(output)).read_bytes(FACTORS)).use_views(16)
    keys = [r["key"] for r in proponents]
    images = torch.stack([decode_image(png_bytes(digits[int(k[1:])]), 28, 1) for k in keys])
    w = engine.embed(images, keys=keys).double()
    expected = (w @ w[0]).numpy()
    got = np.array([r["influence"] for r in proponents])
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4 * abs(expected).max())
    cosines = [r["normalized_influence"] for r in proponents]
    assert cosines == sorted(cosines, reverse=True)
    plain = run_query(query)
    assert plain.column("refined").to_pylist() == [False] * 8


def test_query_by_image_file_computes_w_with_the_manifest_settings(built, digits, tmp_path):
    from pipeline.index.manifest import FORMAT
    from pipeline.query import QueryConfig, run_query

    _, _, output, _ = built
    assert os.path.exists(os.path.join(output, "search", "manifest.json"))  # written by build
    # Views are common to all examples: with the index's V views, the same pixels under any
    # name give exactly the stored w.
    image = tmp_path / "a copy of five.png"
    image.write_bytes(png_bytes(digits[5]))
    query = QueryConfig(index=str(output), images=[str(image)], top=3, save=False, views=4)
    results = run_query(query)
    proponents = [r for r in results.to_pylist() if r["direction"] == "proponent"]
    assert proponents[0]["key"] == "d0005" and proponents[0]["query_source"] == str(image)
    assert proponents[0]["normalized_influence"] == pytest.approx(1.0, abs=1e-4)
    # By default a query image gets 4x the index's views (another estimate of the same w):
    # its scores are those of w with 16 views against the stored w.
    more = run_query(dataclasses.replace(query, views=0, top=240))
    config, _, _, _ = built
    engine = InfluenceSSL(build_encoder(config.influence.model), config.influence)
    engine.load_factors_bytes(open_storage(str(output)).read_bytes(FACTORS)).use_views(16)
    w_q = engine.embed(decode_image(png_bytes(digits[5]), 28, 1)[None], keys=["q"])[0].double()
    _, table = read_index(output)
    stored = np.stack(table.column("w").to_numpy(zero_copy_only=False)).astype(np.float64)
    expected = dict(zip(table.column("key").to_pylist(), stored @ w_q.numpy(), strict=True))
    got = [r for r in more.to_pylist() if r["direction"] == "proponent"]
    assert len(got) == 240
    for r in got[:20]:
        assert r["influence"] == pytest.approx(expected[r["key"]], rel=1e-3, abs=1e-6)

    # The same image from the object store (the session's S3 server on loopback).
    from pipeline.storage import S3Storage

    S3Storage("query-images").client.create_bucket(Bucket="query-images")
    open_storage("s3://query-images").write_bytes("q/d0005", png_bytes(digits[5]))
    remote = run_query(dataclasses.replace(query, images=["s3://query-images/q/d0005"]))
    assert remote.column("key").equals(results.column("key"))
    assert remote.column("influence").equals(results.column("influence"))

    with pytest.raises(IndexMismatchError, match=r"projection\.dim_in"):
        run_query(QueryConfig(index=str(output), images=[str(image)], projection={"dim_in": 4}))
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="not a usable image"):
        run_query(QueryConfig(index=str(output), images=[str(text)]))
    with pytest.raises(FileNotFoundError, match="cannot be read"):
        run_query(QueryConfig(index=str(output), images=[str(tmp_path / "missing.png")]))
    empty = open_storage(str(tmp_path / "empty"))
    empty.write_bytes(MANIFEST, json.dumps({"format": FORMAT, "shards": []}).encode())
    with pytest.raises(ValueError, match="empty"):
        run_query(QueryConfig(index=str(tmp_path / "empty"), keys=["d0005"]))


def test_build_writes_the_key_lookup_and_skips_it_when_current(built):
    from pipeline.index.keys import KEYS_MANIFEST, lookup_rows
    from pipeline.index.reader import Index

    config, _, output, _ = built
    storage = open_storage(str(output))
    written = json.loads(storage.read_bytes(KEYS_MANIFEST))
    manifest, table = read_index(output)
    assert written["keys"] == 240 and written["duplicate_keys"] == 0
    assert [p["part"] for p in written["parts_covered"]] == [s["part"] for s in manifest["shards"]]
    keys = table.column("key").to_pylist()
    assert lookup_rows(Index(str(output)), keys[::-1]).tolist() == list(range(239, -1, -1))
    files = {name: storage.read_bytes(name) for name in storage.list("keys/")}
    run_build(config)  # nothing to do: the lookup is current and not rewritten
    assert {name: storage.read_bytes(name) for name in storage.list("keys/")} == files
    storage.delete(KEYS_MANIFEST)
    run_build(config)  # missing: written again, the same
    assert json.loads(storage.read_bytes(KEYS_MANIFEST))["generation"] == written["generation"]
    assert set(storage.list("keys/")) == set(files)


def test_query_by_key_reads_the_key_lookup_not_every_key(built, monkeypatch):
    import pipeline.index.keys as keys_module
    from pipeline.index.reader import Index
    from pipeline.query import QueryConfig, run_query

    _, _, output, _ = built

    def refuse(*args, **kwargs):
        raise AssertionError("read every key")

    monkeypatch.setattr(keys_module, "scan_parts", refuse)
    monkeypatch.setattr(Index, "table", refuse)
    query = QueryConfig(index=str(output), keys=["d0200", "d0005"], top=2, save=False)
    results = run_query(dataclasses.replace(query, include_self=True))
    proponents = [r for r in results.to_pylist() if r["direction"] == "proponent"]
    assert [r["key"] for r in proponents if r["rank"] == 0] == ["d0200", "d0005"]
    with pytest.raises(KeyError, match="no-such-key"):
        run_query(QueryConfig(index=str(output), keys=["d0005", "no-such-key"]))


def test_query_many_images_on_ray_gives_the_in_process_results(built, digits, tmp_path):
    from pipeline.query import QueryConfig, run_query

    config, _, output, _ = built
    folder = tmp_path / "queries"
    folder.mkdir()
    for i in (3, 61, 130, 199, 222):
        (folder / f"q{i:04d}.png").write_bytes(png_bytes(digits[i]))
    (folder / "notes.md").write_text("not a query")  # only image files are taken
    listed = tmp_path / "queries.txt"
    listed.write_text("# five digits\n" + "".join(f"{p}\n" for p in sorted(folder.glob("*.png"))))
    query = QueryConfig(index=str(output), images_from=str(folder), top=4, views=4, image_batch=2)
    here = run_query(dataclasses.replace(query, out=str(tmp_path / "here.parquet")))
    ray_runtime = RuntimeConfig(num_workers=2, cpus_per_worker=1, address=config.runtime.address)
    with pytest.MonkeyPatch.context() as patch:  # the driver embeds nothing: the workers do
        patch.setattr("pipeline.query.embed_image_files", None)
        on_ray = run_query(dataclasses.replace(query, images_from=str(listed), runtime=ray_runtime))
    assert on_ray.num_rows == here.num_rows == 5 * 2 * 4
    for column in ("query", "query_source", "direction", "rank", "key"):
        assert on_ray.column(column).equals(here.column(column)), column
    for column in ("influence", "normalized_influence"):
        np.testing.assert_allclose(on_ray.column(column), here.column(column), rtol=1e-4, atol=1e-6)
    # Views common to all examples: each digit's own row is its top proponent, cos 1.
    first = [r for r in on_ray.to_pylist() if r["direction"] == "proponent" and r["rank"] == 0]
    assert [r["key"] for r in first] == ["d0003", "d0061", "d0130", "d0199", "d0222"]
    assert pq.read_table(tmp_path / "here.parquet").equals(here)
    kept = pq.read_table(os.path.join(output, "query", "results.parquet"))
    assert kept.column("key").equals(on_ray.column("key"))
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{sorted(folder.glob('*.png'))[0]}\n{folder / 'notes.md'}\n")
    with pytest.raises(RuntimeError, match="not a usable image"):
        run_query(dataclasses.replace(query, images_from=str(bad), runtime=ray_runtime))
    with pytest.raises(FileNotFoundError, match="no image files"):
        run_query(dataclasses.replace(query, images_from=str(tmp_path / "nothing")))


def test_a_failing_shard_leaves_no_reader_threads_behind(built, digits):
    """A compute error mid-shard (the pool then retries it): the shard's reader is closed."""
    from pipeline.config import to_dict
    from pipeline.runtime.worker import ShardWorker

    config, _, _, urls = built
    worker = ShardWorker(to_dict(config))
    worker.load_factors()

    def fail(*args, **kwargs):
        raise RuntimeError("compute failed")

    worker.engine.embed_batch_with_loss = fail
    before = threading.active_count()
    for _ in range(3):
        with pytest.raises(RuntimeError, match="compute failed"):
            worker.build_shard(urls[0])
    time.sleep(0.5)
    assert threading.active_count() == before


def test_python_api_mirrors_the_verbs(built):
    from pipeline import api
    from pipeline.query import QueryConfig, run_query

    _, _, output, _ = built
    by_api = api.query(str(output), keys=["d0005"], top=3, save=False)
    assert by_api.equals(run_query(QueryConfig(index=str(output), keys=["d0005"], top=3)))
    ends = api.rank(str(output), top=1, top_k=5)  # the top and bottom rows, with rank
    assert ends.column("rank").to_pylist() == [*range(5), *range(235, 240)]
    with pytest.raises(ValueError, match="unknown setting"):
        api.rank(str(output), topp=1)


@pytest.fixture
def second_node(ray_session, tmp_path):
    """Another Ray node on this machine, joined with `ray start --address` (own ports and
    resources), as a worker machine joins a cluster; stopped (and gone) after the test."""
    import ray

    from tests.conftest import free_port

    before = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    ports = {
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--metrics-export-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
    }
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    log = open(tmp_path / "ray-node.log", "wb")  # noqa: SIM115 (closed at teardown)
    node = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--address",
            # Ray rewrites a literal 127.0.0.1 to the machine's external address, where
            # the head (bound to loopback) does not listen; the IPv4-mapped form is kept.
            "[::ffff:127.0.0.1]:" + ray_session.address.rsplit(":", 1)[1],
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            "1",
            "--resources",
            '{"second_node": 1}',
            "--temp-dir",  # short: Ray's socket paths must fit in 107 bytes
            f"/tmp/issl-ray-node-{os.getpid()}",
            "--disable-usage-stats",
            *[str(part) for item in ports.items() for part in item],
        ],
        # Ray refuses to join a head at 127.0.0.1 unless told a one-machine cluster is meant.
        env={**ray_session.env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while not ({n["NodeID"] for n in ray.nodes() if n["Alive"]} - before):
            exited = node.poll() is not None
            assert not exited, (tmp_path / "ray-node.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the second node did not join"
            time.sleep(0.5)
        (added,) = {n["NodeID"] for n in ray.nodes() if n["Alive"]} - before
        yield added
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGTERM)
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(f"/tmp/issl-ray-node-{os.getpid()}", ignore_errors=True)


def test_fit_and_build_submitted_to_a_two_node_cluster(built, ray_session, second_node, tmp_path):
    """`ray job submit` of fit and build onto a head plus a joined node: shards run on both,
    and the index equals the one-node run's."""
    import yaml

    from pipeline.config import to_dict

    config, _, output, _ = built
    submitted = pipeline_config(
        tmp_path / "two-nodes", config.input.shards, config.influence.model.checkpoint, workers=3
    )
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(to_dict(submitted)))
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    submit = [ray_bin, "job", "submit", "--address", ray_session.dashboard, "--working-dir", repo]
    for verb in ("fit", "build"):
        result = subprocess.run(
            [*submit, "--", sys.executable, "-m", f"jobs.{verb}", "--config", str(config_path)],
            env=ray_session.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    storage = open_storage(str(tmp_path / "two-nodes"))
    markers = [json.loads(storage.read_bytes(p)) for p in storage.list("markers/")]
    build_nodes = {m["node"] for m in markers}
    fit_nodes = set(json.loads(storage.read_bytes(MANIFEST))["factors"]["nodes"])
    assert second_node in build_nodes and len(build_nodes) == 2, build_nodes
    assert second_node in fit_nodes and len(fit_nodes) == 2, fit_nodes
    _, expected = read_index(output)
    _, table = read_index(tmp_path / "two-nodes")
    assert table.column("key").to_pylist() == expected.column("key").to_pylist()
    assert_same_vectors(table, expected)
