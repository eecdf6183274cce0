"""`groups` on a small real index: per-group statistics and the group-by-group matrix."""

from __future__ import annotations

import io
import json
import math
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.groups import MISSING, OTHER, GroupsConfig, run_groups
from pipeline.index.parts import META_PREFIX, part_table, stored_meta_fields, table_bytes
from pipeline.index.reader import Index
from pipeline.search import l2_normalize
from pipeline.storage import S3Storage, open_storage
from pipeline.testing.indexes import write_index, write_synthetic_index
from pipeline.testing.s3server import CountingProxy
from tests.test_rank import tied_index


@pytest.fixture(scope="module")
def index_uri(digits, tmp_path_factory) -> str:
    """120 real digits (12 per class); `pen` is missing on every fifth row."""
    picks = np.concatenate([np.arange(c * 60, c * 60 + 12) for c in range(10)])
    cls = (picks // 60).tolist()
    metadata = [
        {"cls": c, **({} if i % 5 == 0 else {"pen": "thin" if c % 3 else "bold"})}
        for i, c in enumerate(cls)
    ]
    keys = [f"d{i:04d}" for i in range(len(picks))]
    folder = str(tmp_path_factory.mktemp("groups-index"))
    return write_index(folder, digits[picks], keys, cls, metadata, shards=3)


def test_per_class_statistics_match_numpy(index_uri, capsys):
    stats, _ = run_groups(GroupsConfig(index=index_uri, field="cls", top_fraction=0.1))
    capsys.readouterr()
    table = Index(index_uri).table(["cls", "self_influence", "loss"])
    cls = table.column("cls").to_numpy()
    s = table.column("self_influence").to_numpy().astype(np.float64)
    loss = table.column("loss").to_numpy().astype(np.float64)
    top = np.zeros(len(s), bool)
    top[np.argsort(-s, kind="stable")[:12]] = True  # 10% of 120
    assert sorted(stats.column("group").to_pylist()) == [str(c) for c in range(10)]
    for row in stats.to_pylist():
        mask = cls == int(row["group"])
        assert row["count"] == mask.sum() == 12
        assert row["self_influence_mean"] == pytest.approx(s[mask].mean(), rel=1e-6)
        assert row["self_influence_median"] == pytest.approx(np.median(s[mask]), rel=1e-6)
        assert row["self_influence_p90"] == pytest.approx(np.percentile(s[mask], 90), rel=1e-6)
        assert row["self_influence_max"] == pytest.approx(s[mask].max(), rel=1e-6)
        assert row["loss_mean"] == pytest.approx(loss[mask].mean(), rel=1e-6)
        assert row["top_count"] == (top & mask).sum()
        assert row["top_ratio"] == pytest.approx((top & mask).sum() / 12 / (12 / 120))
    assert sum(stats.column("share").to_pylist()) == pytest.approx(1.0)
    assert sum(stats.column("top_share").to_pylist()) == pytest.approx(1.0)


def test_matrix_is_the_mean_of_pairwise_inner_products(index_uri, capsys):
    _, matrix = run_groups(GroupsConfig(index=index_uri, field="pen"))
    capsys.readouterr()
    index = Index(index_uri)
    table = index.table(["metadata", "w"])
    w = index.vectors(table).astype(np.float64)
    u = l2_normalize(w).astype(np.float64)
    pens = [json.loads(m).get("pen", MISSING) for m in table.column("metadata").to_pylist()]
    pens = np.asarray(pens)
    assert set(matrix.column("group_a").to_pylist()) == {"thin", "bold", MISSING}
    assert matrix.num_rows == 9
    for row in matrix.to_pylist():
        a, b = pens == row["group_a"], pens == row["group_b"]
        assert row["count_a"] == a.sum() and row["count_b"] == b.sum()
        brute = (w[a] @ w[b].T).mean()
        assert row["mean_influence"] == pytest.approx(brute, rel=1e-6, abs=1e-9)
        assert row["mean_cosine"] == pytest.approx((u[a] @ u[b].T).mean(), rel=1e-5, abs=1e-7)


def test_outputs_written_and_rare_groups_lumped(index_uri, capsys):
    stats, matrix = run_groups(GroupsConfig(index=index_uri, field="cls", max_groups=3))
    out = capsys.readouterr().out
    assert "groups over 'cls'" in out
    names = stats.column("group").to_pylist()
    assert names[-1] == OTHER and len(names) == 4
    assert dict(zip(names, stats.column("count").to_pylist(), strict=True))[OTHER] == 84
    assert matrix.num_rows == 16
    storage = Index(index_uri).storage
    assert storage.exists("groups/cls.stats.parquet")
    assert storage.exists("groups/cls.matrix.parquet")


def test_sampled_matrix_uses_only_the_sample(index_uri, capsys):
    _, matrix = run_groups(GroupsConfig(index=index_uri, field="cls", sample=50, seed=1))
    capsys.readouterr()
    counts = {r["group_a"]: r["count_a"] for r in matrix.to_pylist()}
    assert sum(counts.values()) == 50


def test_missing_field_everywhere_is_a_clear_error(index_uri):
    with pytest.raises(ValueError, match="has the field 'colour'"):
        run_groups(GroupsConfig(index=index_uri, field="colour"))
    with pytest.raises(ValueError, match="top_fraction"):
        run_groups(GroupsConfig(index=index_uri, top_fraction=0))


# -- group fields as columns, streaming, sampling ----------------------------------------------


def old_style(uri: str) -> str:
    """The index rewritten as an older build wrote it: no meta.* columns, no footer record."""
    storage = open_storage(uri)
    for path in storage.list("parts/"):
        table = pq.read_table(io.BytesIO(storage.read_bytes(path)))
        table = table.select([c for c in table.column_names if not c.startswith(META_PREFIX)])
        storage.write_bytes(path, table_bytes(table.replace_schema_metadata(None)))
    return uri


def test_group_columns_are_written_per_part():
    rows = [{"source": "a", "n": 3, "ok": True, "tags": ["x"]}, {"source": "b", "n": 0.5}, {}]
    keys, w = ["k0", "k1", "k2"], np.ones((3, 2), np.float32)
    auto = part_table(keys, "s", w, np.ones(3), np.ones(3), [None] * 3, rows)
    assert auto.column("meta.source").to_pylist() == ["a", "b", None]
    assert auto.column("meta.n").to_pylist() == ["3", "0.5", None]  # as group names
    assert auto.column("meta.ok").to_pylist() == ["true", None, None]
    assert "meta.tags" not in auto.column_names  # not a scalar: left to the JSON
    assert stored_meta_fields(auto.schema) == ({"n", "ok", "source"}, {"n", "ok", "source", "tags"})
    chosen = part_table(
        keys, "s", w, np.ones(3), np.ones(3), [None] * 3, rows, group_fields=["tags"]
    )
    assert [c for c in chosen.column_names if c.startswith(META_PREFIX)] == ["meta.tags"]
    assert chosen.column("meta.tags").to_pylist() == ['["x"]', None, None]


def test_field_columns_are_read_without_the_json(index_uri, monkeypatch, capsys):
    def refuse(*_):
        raise AssertionError("metadata JSON parsed")

    monkeypatch.setattr("pipeline.groups.group_value", refuse)
    stats, _ = run_groups(GroupsConfig(index=index_uri, field="pen"))
    capsys.readouterr()
    texts = Index(index_uri).table(["metadata"]).column("metadata").to_pylist()
    expected = Counter(json.loads(m).get("pen", MISSING) for m in texts)
    assert dict(zip(stats["group"].to_pylist(), stats["count"].to_pylist(), strict=True)) == (
        expected
    )
    with pytest.raises(ValueError, match="has the field 'colour'"):  # known absent, unparsed
        run_groups(GroupsConfig(index=index_uri, field="colour"))


def test_json_fallback_equals_the_field_columns(index_uri, tmp_path, capsys):
    old = str(tmp_path / "old")
    source, target = open_storage(index_uri), open_storage(old)
    for path in source.list():
        if not path.startswith("groups/"):
            target.write_bytes(path, source.read_bytes(path))
    old_style(old)
    assert not any(c.startswith(META_PREFIX) for c in Index(old).columns())
    for field in ("pen", "cls"):
        new = run_groups(GroupsConfig(index=index_uri, field=field, top_fraction=0.2))
        fallback = run_groups(GroupsConfig(index=old, field=field, top_fraction=0.2))
        assert new[0].equals(fallback[0]) and new[1].equals(fallback[1])
    capsys.readouterr()


def reference_top(s: np.ndarray, fraction: float) -> np.ndarray:
    top = np.zeros(len(s), bool)
    top[np.argsort(-s.astype(np.float64), kind="stable")[: math.ceil(fraction * len(s))]] = True
    return top


def test_ties_and_reservoir_medians(tmp_path, monkeypatch, capsys):
    """Tied self-influence (the top threshold's ties go by row order) and groups larger than
    the reservoir (median and p90 from a uniform sample; mean and max stay exact)."""
    uri = tied_index(str(tmp_path / "index"), parts=3, rows=1000)
    monkeypatch.setattr("pipeline.groups.RESERVOIR", 200)
    stats, matrix = run_groups(GroupsConfig(index=uri, field="cls", top_fraction=0.13))
    capsys.readouterr()
    table = Index(uri).table(["cls", "self_influence"])
    cls = table.column("cls").to_numpy()
    s = table.column("self_influence").to_numpy().astype(np.float64)
    top = reference_top(s, 0.13)
    for row in stats.to_pylist():
        mask = cls == int(row["group"])
        values = s[mask]
        assert row["count"] == mask.sum() > 200
        assert row["top_count"] == (top & mask).sum()
        finite = values[~np.isnan(values)]
        if len(finite) == len(values):  # groups holding a NaN have NaN mean and max
            assert row["self_influence_mean"] == pytest.approx(values.mean(), rel=1e-9)
            assert row["self_influence_max"] == values.max()
        if not np.isnan(row["self_influence_median"]):
            below = (finite <= row["self_influence_median"]).mean()
            assert below > 0.35 and (finite < row["self_influence_median"]).mean() < 0.65
    assert sum(stats["top_count"].to_pylist()) == math.ceil(0.13 * 3000)
    assert matrix.num_rows == 100


def test_reservoir_is_a_uniform_sample_without_repeats():
    from pipeline.groups import Reservoir

    reservoir = Reservoir(500, np.random.default_rng(0))
    values = np.arange(20_000, dtype=np.float32)
    for chunk in np.array_split(values, 37):
        reservoir.add(chunk)
    kept = reservoir.values
    assert len(kept) == 500 == len(np.unique(kept)) and reservoir.seen == 20_000
    assert abs(kept.mean() - values.mean()) < 4 * values.std() / np.sqrt(500)
    assert np.histogram(kept, bins=4, range=(0, 20_000))[0].min() > 90


def stored_column_bytes(uri: str, column: str) -> tuple[int, int]:
    """Compressed bytes of a column in all parts, and in the largest row group."""
    index = Index(uri)
    sizes = []
    for entry in index.manifest["shards"]:
        meta = pq.ParquetFile(io.BytesIO(index.storage.read_bytes(entry["part"]))).metadata
        for g in range(meta.num_row_groups):
            chunks = [meta.row_group(g).column(c) for c in range(meta.num_columns)]
            sizes += [
                c.total_compressed_size for c in chunks if c.path_in_schema.startswith(column + ".")
            ]
    return sum(sizes), max(sizes)


def test_sampled_matrix_reads_only_the_sample(s3_endpoint, monkeypatch, capsys):
    S3Storage("groups-test").client.create_bucket(Bucket="groups-test")
    uri = write_synthetic_index("s3://groups-test/index", parts=2, rows=9000, dimension=256)
    read = {}
    for sample in (0, 2):
        with CountingProxy(s3_endpoint) as proxy:
            monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
            stats, matrix = run_groups(GroupsConfig(index=uri, field="cls", sample=sample))
            read[sample] = proxy.body_bytes
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
        counts = {r["group_a"]: r["count_a"] for r in matrix.to_pylist()}
        assert sum(counts.values()) == (sample or 18_000)
        assert sum(stats["count"].to_pylist()) == 18_000  # statistics always cover every row
    capsys.readouterr()
    w_bytes, group_bytes = stored_column_bytes(uri, "w")
    assert read[0] > w_bytes  # all of w
    # The rest of what is read (labels, self_influence, loss, footers) plus at most the two
    # row groups of w holding the two sampled rows.
    assert read[2] < read[0] - w_bytes + 2 * group_bytes * 1.05
