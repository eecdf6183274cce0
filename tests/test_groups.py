"""`groups` on a small real index: per-group statistics and the group-by-group matrix."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.groups import MISSING, OTHER, GroupsConfig, run_groups
from pipeline.index.reader import Index
from pipeline.search import l2_normalize
from tests.indexes import write_index


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
