"""Ordinary mistakes through the CLI: one or two lines on stderr, exit code 2, no traceback
(unless --debug), nothing left behind; and the defaults a user expects (issue 13)."""

from __future__ import annotations

import dataclasses
import http.server
import threading
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from pipeline.cli import main
from pipeline.config import (
    InputConfig,
    LayerConfig,
    ModelConfig,
    PipelineConfig,
    load_config,
    split_list,
)
from pipeline.dedup import DedupConfig, grouped_rows, read_dedup_groups, read_keep_list
from pipeline.index.reader import Index
from pipeline.query import QueryConfig
from pipeline.testing.indexes import image_hashes, small_config, small_engine, write_index

ROWS = 60


@pytest.fixture(scope="module")
def images(digits) -> torch.Tensor:
    return digits[::10][:ROWS]  # 60 digits, 6 of each class


@pytest.fixture(scope="module")
def index_uri(images, tmp_path_factory) -> str:
    """60 digits without `cls` (shards with .json only): fields `label` and `source`."""
    labels = [i // 6 for i in range(ROWS)]
    metadata = [{"label": str(c), "source": "mnist"} for c in labels]
    keys = [f"d{i:04d}" for i in range(ROWS)]
    folder = str(tmp_path_factory.mktemp("user-errors-index"))
    return write_index(folder, images, keys, None, metadata, shards=2)


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(code: int, err: str, *needles: str) -> str:
    """Exit code 2, at most two lines (`error: ...`, `hint: ...`), no traceback."""
    lines = err.strip().splitlines()
    assert code == 2, err
    assert 1 <= len(lines) <= 2 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


# -- errors -----------------------------------------------------------------------------------


def test_missing_index_is_one_line_and_writes_nothing(capsys, tmp_path):
    missing = tmp_path / "no-index-here"
    for verb in ("rank", "query", "dedup", "groups"):
        code, _, err = cli(capsys, verb, "--out", str(missing), "--set", "keys=a")
        if verb != "query":  # `keys` is a query setting: the others refuse it first
            assert_user_error(code, err, "unknown setting 'keys'")
            code, _, err = cli(capsys, verb, "--out", str(missing))
        assert_user_error(code, err, f"no index at {missing}", "influence-ssl fit")
    assert not missing.exists()


def test_debug_adds_the_traceback(capsys, tmp_path):
    code, _, err = cli(capsys, "rank", "--out", str(tmp_path / "nope"), "--debug")
    assert code == 2 and "Traceback" in err and "IndexNotFoundError" in err
    assert err.strip().splitlines()[-1].startswith("error: no index at")
    code, _, err = cli(capsys, "--debug", "rank", "--out", str(tmp_path / "nope"))
    assert code == 2 and "Traceback" in err


def test_unknown_key_names_the_closest_keys(index_uri, capsys):
    code, _, err = cli(capsys, "query", "--out", index_uri, "--set", "keys=d0o12")
    assert_user_error(code, err, "'d0o12'", "closest to 'd0o12': 'd0012'")
    assert "['d'," not in err  # never split into characters


def test_a_single_key_without_brackets_is_one_key(index_uri, capsys):
    code, out, _ = cli(capsys, "query", "--out", index_uri, "--set", "keys=d0012")
    assert code == 0 and "query d0012:" in out
    assert "query d:" not in out and "query 0:" not in out


def test_bad_settings(index_uri, capsys):
    code, _, err = cli(capsys, "query", "--out", index_uri, "--set", "tpo=3")
    assert_user_error(code, err, "unknown setting 'tpo'", "did you mean 'top'?")
    code, _, err = cli(capsys, "query", "--out", index_uri, "--set", "top=many")
    assert_user_error(code, err, "top takes a whole number", "'many'")
    code, _, err = cli(capsys, "query", "--out", index_uri, "--set", "top")
    assert_user_error(code, err, "not of the form key=value")
    code, _, err = cli(capsys, "query", "--out", index_uri, "--set", "keys=[d0001, d0002")
    assert_user_error(code, err, "not valid YAML", "quote it")
    code, _, err = cli(capsys, "query", "--out", index_uri, "--set", "runtime=2")
    assert_user_error(code, err, "runtime is a section")
    code, _, err = cli(capsys, "dedup", "--out", index_uri, "--set", "keep=newest")
    assert_user_error(code, err, "unknown keep policy 'newest'")
    code, _, err = cli(capsys, "query", "--out", index_uri)
    assert_user_error(code, err, "no query", "keys=key1,key2")


def test_groups_field_absent_lists_the_fields_there(index_uri, capsys):
    code, _, err = cli(capsys, "groups", "--out", index_uri, "--set", "field=cls")
    assert_user_error(code, err, "has the field 'cls'", "label, source")
    code, _, err = cli(capsys, "groups", "--out", index_uri, "--set", "field=lable")
    assert_user_error(code, err, "did you mean 'label'?")


def test_build_before_fit_leaves_nothing(capsys, tmp_path, digit_shards):
    _, urls = digit_shards
    output = tmp_path / "never-fitted"
    code, _, err = cli(capsys, "build", "--out", str(output), "--shards", urls[0])
    assert_user_error(code, err, "no fitted factors", "influence-ssl fit --out")
    assert not output.exists()


def test_a_checkpoint_that_does_not_fit_the_arch(capsys, tmp_path, digit_shards):
    _, urls = digit_shards
    checkpoint = tmp_path / "other.pt"
    torch.save({"features.0.weight": torch.zeros(3, 3)}, checkpoint)
    output = tmp_path / "fit-out"
    code, _, err = cli(
        capsys,
        "fit",
        "--out",
        str(output),
        "--shards",
        *urls,
        "--set",
        "influence.model.arch=small_cnn",
        "--set",
        "influence.model.in_channels=1",
        "--set",
        f"influence.model.checkpoint={checkpoint}",
    )
    assert_user_error(code, err, "does not fit the encoder", "missing keys", "hint:")
    assert not output.exists()


def test_an_index_of_other_settings_is_two_lines(index_uri, images, capsys, tmp_path):
    from PIL import Image

    image = tmp_path / "five.png"
    Image.fromarray((images[5, 0].numpy() * 255).round().astype(np.uint8)).save(image)
    code, _, err = cli(
        capsys, "query", "--out", index_uri, "--set", f"images={image}",
        "--set", "projection.dim_in=4", "--set", "projection.dim_out=2",
    )  # fmt: skip
    assert_user_error(
        code, err, "built with other settings", "projection.dim_in", "projection.dim_out", "hint:"
    )


def test_a_held_lease_is_one_line_and_the_output_stays(capsys, tmp_path, digit_shards):
    from pipeline.index.lease import Lease
    from pipeline.storage import open_storage

    _, urls = digit_shards
    output = tmp_path / "leased"
    holder = Lease(open_storage(str(output)), "build")
    holder.acquire()  # this process, alive, unexpired: a live holder
    try:
        code, _, err = cli(
            capsys, "fit", "--out", str(output), "--shards", urls[0],
            "--set", "influence.model.arch=small_cnn", "--set", "influence.model.in_channels=1",
        )  # fmt: skip
        assert_user_error(code, err, "is held by", "--force")
        assert (output / "lease.json").exists()
    finally:
        holder.release()


def test_a_failed_first_run_removes_the_folder_it_created(tmp_path):
    from pipeline.index.lease import hold_lease
    from pipeline.storage import open_storage

    fresh, kept = tmp_path / "fresh", tmp_path / "kept"
    kept.mkdir()
    for folder in (fresh, kept):
        with pytest.raises(RuntimeError), hold_lease(open_storage(str(folder)), "fit"):
            assert (folder / "lease.json").exists()
            raise RuntimeError("a worker failed")
    assert not fresh.exists()
    assert kept.exists() and not (kept / "lease.json").exists()  # a folder given stays


class Forbidden(http.server.BaseHTTPRequestHandler):
    """Every request answered 403 AccessDenied, as S3 does for credentials without rights."""

    body = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"

    def _deny(self) -> None:
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(self.body)

    do_GET = do_HEAD = do_PUT = do_POST = _deny

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def forbidding_endpoint(monkeypatch) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forbidden)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    aws_env(monkeypatch, endpoint)
    try:
        yield endpoint
    finally:
        server.shutdown()
        server.server_close()


def aws_env(monkeypatch, endpoint: str) -> None:
    for name, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "user-errors",
        "AWS_SECRET_ACCESS_KEY": "user-errors-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)


def test_forbidden_s3_is_one_error_and_a_hint(capsys, forbidding_endpoint):
    code, _, err = cli(capsys, "rank", "--out", "s3://locked-bucket/index")
    assert_user_error(code, err, "access denied", "s3://locked-bucket/index", "hint:")
    assert "user-errors-secret" not in err


def test_unreachable_s3_is_one_error_and_a_hint(capsys, monkeypatch):
    from pipeline import storage

    monkeypatch.setattr(storage.RetryPolicy, "delay", lambda self, retry: 0.0)
    aws_env(monkeypatch, "http://127.0.0.1:9")  # discard port: nothing listens
    code, _, err = cli(capsys, "rank", "--out", "s3://any-bucket/index")
    assert_user_error(code, err, "s3://any-bucket/index", "failed", "AWS_ENDPOINT_URL")


def test_a_bug_keeps_its_traceback(index_uri, monkeypatch):
    def broken(config):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("pipeline.rank.run_rank", broken)
    with pytest.raises(ZeroDivisionError):
        main(["rank", "--out", index_uri])


# -- list settings ----------------------------------------------------------------------------


def test_every_list_setting_takes_one_value_or_a_comma_list():
    one = load_config(QueryConfig, None, ["keys=c0000", "images=a.png"])
    assert (one.keys, one.images) == (["c0000"], ["a.png"])
    many = load_config(QueryConfig, None, ["keys=a, b,c", "images=[x.png, y.png]"])
    assert (many.keys, many.images) == (["a", "b", "c"], ["x.png", "y.png"])
    assert load_config(QueryConfig, None, ["keys=007"]).keys == ["007"]  # text, not YAML 7
    assert load_config(QueryConfig, None, ["keys="]).keys == []
    config = load_config(
        PipelineConfig,
        None,
        [
            "input.shards=data/s-{000..003}.tar",
            "influence.model.projector_dims=16,8",
            "influence.augment.mean=0.5",
            "influence.augment.crop_scale=0.5,1",
            "influence.layers.include=backbone.*",
            "influence.layers.exclude=*.bn,head.*",
            "influence.projection.per_layer.layer4*=32,16",
            "index.group_fields=label",
        ],
    )
    assert config.input.shards == ["data/s-{000..003}.tar"]
    assert config.influence.model.projector_dims == [16, 8]
    assert config.influence.augment.mean == [0.5]
    assert config.influence.augment.crop_scale == (0.5, 1.0)
    assert config.influence.layers == LayerConfig(
        include=["backbone.*"], exclude=["*.bn", "head.*"]
    )
    assert config.influence.projection.per_layer == {"layer4*": [32, 16]}
    assert config.index.group_fields == ["label"]
    from pipeline.demo.validate import ValidateConfig

    assert load_config(ValidateConfig, None, ["methods=tracin"]).methods == ["tracin"]


def test_commas_inside_brace_patterns_do_not_split():
    assert split_list("s-{a,b}.tar, t.tar") == ["s-{a,b}.tar", "t.tar"]
    shards = load_config(InputConfig, None, ["shards=s-{a,b}-{0..3}.tar,u.tar"]).shards
    assert shards == ["s-{a,b}-{0..3}.tar", "u.tar"]


def test_string_settings_keep_their_text_and_numbers_convert():
    config = load_config(PipelineConfig, None, ["influence.autocast=none", "fit.max_shards=1e2"])
    assert config.influence.autocast == "none" and config.fit.max_shards == 100
    model = load_config(ModelConfig, None, ["representation=off"])
    assert model.representation == "off"  # YAML would have read False
    assert load_config(PipelineConfig, None, ["runtime.address=null"]).runtime.address is None


# -- defaults ---------------------------------------------------------------------------------


def hits(results: pa.Table, query: str, direction: str = "proponent") -> list[str]:
    mask = pc.and_(pc.equal(results["query"], query), pc.equal(results["direction"], direction))
    return results.filter(mask).column("key").to_pylist()


def test_a_query_by_key_leaves_itself_out_unless_asked(index_uri, capsys, tmp_path):
    from pipeline.query import run_query

    plain = run_query(QueryConfig(index=index_uri, keys=["d0012", "d0030"], top=4, save=False))
    out = capsys.readouterr().out
    assert "include_self=true" in out
    with_self = run_query(
        QueryConfig(index=index_uri, keys=["d0012", "d0030"], top=5, save=False, include_self=True)
    )
    for key in ("d0012", "d0030"):
        assert key not in hits(plain, key) and len(hits(plain, key)) == 4
        assert hits(with_self, key)[0] == key  # cos(w, w) = 1: its own top proponent
        assert hits(plain, key) == hits(with_self, key)[1:]  # the same ranking otherwise
        assert len(hits(plain, key, "opponent")) == 4
    ranks = plain.filter(pc.equal(plain["direction"], "proponent"))["rank"].to_pylist()
    assert ranks == [0, 1, 2, 3] * 2
    listed = tmp_path / "keys.txt"
    listed.write_text("# two keys\nd0012\n\nd0030\n")
    from_file = run_query(QueryConfig(index=index_uri, keys_file=str(listed), top=4, save=False))
    assert from_file.equals(plain)
    capsys.readouterr()


def test_groups_picks_an_existing_field_and_says_which(index_uri, capsys):
    code, out, _ = cli(capsys, "groups", "--out", index_uri)
    assert code == 0
    assert "no `cls`; grouping by 'label'" in out and "groups over 'label'" in out
    assert Index(index_uri).storage.exists("groups/label.stats.parquet")


@pytest.fixture(scope="module")
def copies_uri(images, tmp_path_factory) -> tuple[str, list[tuple[str, str]]]:
    """40 digits, then exact copies of five of them whose keys sort *before* the originals'
    (`a-...` < `d...`), embedded with per-key views: a copy's w differs from its original's."""
    config = small_config()
    config.loss.view_seeding = "key"
    base = images[:40]
    picks = [3, 9, 17, 25, 38]
    stacked = torch.cat([base, base[picks]])
    keys = [f"d{i:04d}" for i in range(40)] + [f"a-copy-{i:02d}" for i in picks]
    engine = small_engine(stacked, config)
    folder = str(tmp_path_factory.mktemp("copies-index"))
    uri = write_index(folder, stacked, keys, [0] * len(keys), None, shards=2, engine=engine)
    assert len(set(image_hashes(stacked))) == 40
    return uri, [(f"d{i:04d}", f"a-copy-{i:02d}") for i in picks]


def test_dedup_keeps_the_originals_and_calls_pixel_copies_exact(copies_uri, capsys):
    from pipeline.dedup import run_dedup

    uri, pairs = copies_uri
    summary = run_dedup(DedupConfig(index=uri, tau=0.999, refine=0))
    capsys.readouterr()
    table = {r["key"]: r for r in read_keep_list(Index(uri), "influence").to_pylist()}
    index = Index(uri)
    w = index.vectors()
    unit = w / np.linalg.norm(w, axis=1, keepdims=True)
    row = {k: i for i, k in enumerate(index.table(["key"]).column("key").to_pylist())}
    for original, copy in pairs:
        assert table[original]["kept"] and table[original]["reason"] == "kept"
        assert not table[copy]["kept"] and table[copy]["kept_key"] == original
        assert table[copy]["reason"] == "exact_duplicate"
        assert table[copy]["similarity"] == 1.0
        assert float(unit[row[original]] @ unit[row[copy]]) < 0.999  # w differ: views by key
    assert summary["removed_exact"] == len(pairs) and summary["chained_groups"] == 0
    groups = read_dedup_groups(Index(uri), "influence")
    assert "chained" in groups.column_names and not any(groups["chained"].to_pylist())


def test_chained_members_are_flagged():
    """0-1 and 1-2 are edges (cos 0.95 each); 0 and 2 are 0.81 apart, below tau: member 2 is
    in the group only through member 1."""
    angle = np.arccos(0.95)
    unit = np.array([[np.cos(a), np.sin(a)] for a in (0.0, angle, 2 * angle)], np.float32)
    info = pa.table(
        {
            "key": ["r0", "r1", "r2"],
            "shard": ["s"] * 3,
            "self_influence": pa.array([3.0, 2.0, 1.0], pa.float32()),
        }
    )
    config = DedupConfig(index="unused", tau=0.9, refine=0, exact=False)
    grouped = grouped_rows(
        np.array([0, 1]), np.array([1, 2]), lambda rows: info.take(pa.array(rows)),
        lambda rows: unit[rows], config,
    )  # fmt: skip
    by_key = {r["key"]: r for r in grouped.to_pylist()}
    assert by_key["r0"]["kept"] and not by_key["r0"]["chained"]
    assert not by_key["r1"]["chained"] and by_key["r1"]["similarity"] == pytest.approx(0.95)
    assert by_key["r2"]["chained"] and by_key["r2"]["similarity"] == pytest.approx(0.805, 1e-3)
    lowest = grouped_rows(
        np.array([0, 1]), np.array([1, 2]), lambda rows: info.take(pa.array(rows)),
        lambda rows: unit[rows], dataclasses.replace(config, keep="lowest_self_influence"),
    )  # fmt: skip
    assert [r["key"] for r in lowest.to_pylist() if r["kept"]] == ["r2"]


# -- Ray ----------------------------------------------------------------------------------------


def test_the_embedded_ray_starts_without_token_auth(monkeypatch):
    """No token auth (its warning, ~/.ray/auth_token) for an embedded Ray; a mode the user
    set, and a cluster joined by address, are left alone. ray.init is recorded, not run: the
    session's one Ray stays the only one."""
    import os

    from pipeline.config import RuntimeConfig
    from pipeline.runtime import pool

    seen: list[tuple[dict, str | None]] = []
    monkeypatch.setattr(pool.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(
        pool.ray, "init", lambda **kw: seen.append((kw, os.environ.get("RAY_AUTH_MODE")))
    )
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    pool.connect(RuntimeConfig(address="10.0.0.1:6379"))
    assert seen[-1] == ({"address": "10.0.0.1:6379", "log_to_driver": True}, None)
    pool.connect(RuntimeConfig())
    assert seen[-1][0]["address"] == "local" and seen[-1][1] == "disabled"
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    pool.connect(RuntimeConfig())
    assert seen[-1][1] == "token"


def test_text_yaml_cannot_read_is_taken_as_text():
    layers = load_config(LayerConfig, None, ["include=*.conv", "exclude=*.bn,head.*"])
    assert layers == LayerConfig(include=["*.conv"], exclude=["*.bn", "head.*"])
    shards = load_config(InputConfig, None, ["shards={a,b}.tar"]).shards
    assert shards == ["{a,b}.tar"]
