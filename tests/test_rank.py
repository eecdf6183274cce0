"""`rank` streamed part by part: range partitions, each sorted alone, equal a full sort.

Synthetic indexes (pipeline/testing/indexes.py, the real part writer) with heavy ties and
NaN, so the tie order by key, the ends' cuts and the partition boundaries are all exercised;
S3 is moto's server on loopback.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.index.parts import table_bytes
from pipeline.index.reader import Index
from pipeline.rank import (
    COLUMNS,
    LEGACY,
    SUMMARY,
    TOP,
    RankConfig,
    order_key,
    read_rank_ends,
    read_rank_summary,
    read_ranked,
    run_rank,
)
from pipeline.storage import S3Storage, open_storage
from pipeline.testing.indexes import write_synthetic_index

BUCKET = "rank-test"


def tied_index(uri: str, parts: int = 4, rows: int = 600) -> str:
    """A synthetic index whose self_influence takes 40 values (ties within and across parts),
    with a few NaN; keys are listed out of order within each part."""
    write_synthetic_index(uri, parts=parts, rows=rows, dimension=4)
    storage = open_storage(uri)
    rng = np.random.default_rng(1)
    for number, path in enumerate(sorted(storage.list("parts/"))):
        table = pq.read_table(io.BytesIO(storage.read_bytes(path)))
        s = rng.integers(0, 40, rows).astype(np.float32) / 4
        s[rng.choice(rows, 3, replace=False)] = np.nan
        position = table.schema.get_field_index("self_influence")
        table = table.set_column(position, "self_influence", pa.array(s))
        order = rng.permutation(rows) if number % 2 else np.arange(rows)
        storage.write_bytes(path, table_bytes(table.take(pa.array(order))))
    return uri


def full_sort(index: Index) -> pa.Table:
    table = index.table(COLUMNS)
    keys = [("self_influence", "descending"), ("key", "ascending")]
    return table.take(pc.sort_indices(table, sort_keys=keys))


def same(a: pa.Table, b: pa.Table) -> bool:
    """Equal columns and values, NaN equal to NaN (Table.equals says NaN != NaN)."""
    if a.column_names != b.column_names:
        return False
    for name in a.column_names:
        x, y = a.column(name), b.column(name)
        if pa.types.is_floating(x.type):
            if not np.array_equal(x.to_numpy(), y.to_numpy(), equal_nan=True):
                return False
        elif x.to_pylist() != y.to_pylist():
            return False
    return True


def quiet_rank(capsys, **settings) -> pa.Table:
    ends = run_rank(RankConfig(**settings))
    capsys.readouterr()
    return ends


def test_partitions_equal_a_full_sort(tmp_path, capsys):
    uri = tied_index(str(tmp_path / "index"))
    storage = open_storage(uri)
    storage.write_bytes(LEGACY, b"old")  # the single-file output of earlier versions
    ends = quiet_rank(capsys, index=uri, top=3, top_k=25, partition_rows=500)
    index = Index(uri)
    expected = full_sort(index)
    ranked = read_ranked(index)
    assert same(ranked.drop_columns(["rank"]), expected)
    assert ranked.column("rank").to_pylist() == list(range(2400))
    summary = read_rank_summary(index)
    partitions = summary["partitions"]
    assert len(partitions) >= 3 and summary["rows"] == 2400
    first = 0
    for entry in partitions:  # each file sorted alone, contiguous ranks, its range recorded
        table = pq.read_table(io.BytesIO(storage.read_bytes(entry["file"])))
        assert entry["rows"] == table.num_rows and entry["first_rank"] == first
        assert table.column("rank").to_pylist() == list(range(first, first + table.num_rows))
        s = table.column("self_influence").to_numpy()
        finite = s[~np.isnan(s)]
        if len(finite):
            assert entry["max_self_influence"] == finite.max()
            assert entry["min_self_influence"] == finite.min()
        first += table.num_rows
    # Heavy ties never straddle partitions: the key order stays exact at every boundary.
    lows = [e["min_self_influence"] for e in partitions[:-1]]
    highs = [e["max_self_influence"] for e in partitions[1:]]
    assert all(lo > hi for lo, hi in zip(lows, highs, strict=False))
    # The ends: per-part top-k merged, ties at the cut broken by key, equal the sorted ends.
    head, tail = ranked.slice(0, 25), ranked.slice(2400 - 25, 25)
    assert same(ends, pa.concat_tables([head, tail]))
    assert same(read_rank_ends(index), ends)
    assert same(read_rank_ends(index, 5), pa.concat_tables([head.slice(0, 5), tail.slice(20)]))
    wide = read_rank_ends(index, 40)  # more than top.parquet keeps: from the partitions
    assert same(wide, pa.concat_tables([ranked.slice(0, 40), ranked.slice(2360, 40)]))
    assert np.isnan(ranked.column("self_influence").to_numpy()[-12:]).all()  # NaN last
    # Quantiles over the non-NaN values, as numpy computes them.
    values = expected.column("self_influence").to_numpy().astype(np.float64)
    values = values[~np.isnan(values)]
    quantiles = summary["quantiles"]
    assert quantiles["median"] == pytest.approx(np.median(values))
    assert quantiles["p99"] == pytest.approx(np.quantile(values, 0.99))
    assert quantiles["max"] == values.max() and quantiles["from"] == "sorted"
    counts = summary["histogram"]
    assert sum(counts["counts"]) + counts["non_positive"] == len(values)
    assert counts["nan"] == 12
    assert not storage.exists(LEGACY)


def test_rerun_replaces_every_partition(tmp_path, capsys):
    uri = tied_index(str(tmp_path / "index"), parts=2, rows=500)
    quiet_rank(capsys, index=uri, partition_rows=100)
    storage = open_storage(uri)
    many = storage.list("rank/sorted/")
    quiet_rank(capsys, index=uri, partition_rows=10_000)
    assert len(many) > 1 and storage.list("rank/sorted/") == ["rank/sorted/part-00000.parquet"]
    assert same(read_ranked(Index(uri)).drop_columns(["rank"]), full_sort(Index(uri)))


def test_ends_only(tmp_path, capsys):
    uri = write_synthetic_index(str(tmp_path / "index"), parts=3, rows=300, dimension=8)
    ends = quiet_rank(capsys, index=uri, top=5, top_k=10, write_sorted=False)
    index = Index(uri)
    expected = full_sort(index)
    assert ends.drop_columns(["rank"]).equals(
        pa.concat_tables([expected.slice(0, 10), expected.slice(890, 10)])
    )
    assert ends.column("rank").to_pylist() == [*range(10), *range(890, 900)]
    storage = index.storage
    assert storage.list("rank/") == [SUMMARY, TOP]
    assert read_rank_summary(index)["quantiles"]["from"] == "sample"
    with pytest.raises(ValueError, match="write_sorted=false"):
        read_ranked(index)
    with pytest.raises(ValueError, match="no sorted output"):
        read_rank_ends(index, 500)


def test_small_index_keeps_every_row_once_in_the_ends(tmp_path, capsys):
    uri = write_synthetic_index(str(tmp_path / "index"), parts=2, rows=7, dimension=4)
    ends = quiet_rank(capsys, index=uri, top_k=10)
    assert ends.column("rank").to_pylist() == list(range(14))
    assert ends.drop_columns(["rank"]).equals(full_sort(Index(uri)))


def test_order_key_sorts_like_floats():
    values = np.array([np.nan, -np.inf, -2.5, -0.0, 0.0, 1e-30, 3.0, np.inf], np.float32)
    keys = order_key(values)
    assert keys[0] == 0 and (np.diff(keys[1:].astype(np.int64)) >= 0).all()
    assert keys[3] == keys[4]  # -0.0 and 0.0 compare equal, as pyarrow sorts them


def test_no_rank_output_is_a_clear_error(tmp_path):
    uri = write_synthetic_index(str(tmp_path / "index"), parts=1, rows=5, dimension=4)
    with pytest.raises(FileNotFoundError, match="run rank"):
        read_rank_ends(Index(uri))
    with pytest.raises(ValueError, match="partition_rows"):
        run_rank(RankConfig(index=uri, partition_rows=0))


def test_s3_rank_equals_local(tmp_path, s3_endpoint, capsys):
    S3Storage(BUCKET).client.create_bucket(Bucket=BUCKET)
    local = tied_index(str(tmp_path / "index"), parts=3, rows=400)
    remote = open_storage(f"s3://{BUCKET}/index")
    source = open_storage(local)
    for path in source.list():
        remote.write_bytes(path, source.read_bytes(path))
    for uri in (local, remote.uri):
        quiet_rank(capsys, index=uri, top_k=15, partition_rows=300)
    assert same(read_ranked(Index(remote.uri)), read_ranked(Index(local)))
    assert same(read_rank_ends(Index(remote.uri)), read_rank_ends(Index(local)))
    assert len(read_rank_summary(Index(remote.uri))["partitions"]) >= 3
