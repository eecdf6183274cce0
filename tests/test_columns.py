"""Projected reads of parts: row groups in what is written, only the wanted columns' (and row
groups') bytes fetched from S3, schemas from the footer, and those reads riding out faults.

S3 is moto's server on loopback; bytes are counted by a proxy in front of it.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.index.parts as parts_module
from pipeline.index.columnar import read_columns
from pipeline.index.parts import ROW_GROUP_ROWS, part_table, row_group_rows, table_bytes
from pipeline.index.reader import Index
from pipeline.rank import RankConfig, run_rank
from pipeline.storage import ObjectNotFoundError, S3Storage, open_storage
from pipeline.testing.indexes import write_synthetic_index
from pipeline.testing.s3server import CountingProxy, FlakyProxy

BUCKET = "columns-test"


@pytest.fixture(scope="module")
def s3_bucket(s3_endpoint: str) -> str:
    S3Storage(BUCKET).client.create_bucket(Bucket=BUCKET)
    return BUCKET


@pytest.fixture(scope="module")
def s3_index(s3_bucket: str) -> str:
    """2 parts of 9,000 rows (row groups 4096 + 4096 + 808), D = 256 float32."""
    return write_synthetic_index(f"s3://{BUCKET}/index", parts=2, rows=9000, dimension=256)


def row_groups(data: bytes) -> list[int]:
    meta = pq.ParquetFile(io.BytesIO(data)).metadata
    return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]


def synthetic_part(rows: int, dim: int) -> pa.Table:
    w = np.random.default_rng(0).standard_normal((rows, dim), dtype=np.float32)
    zeros = np.zeros(rows, np.float32)
    keys = [f"k{i}" for i in range(rows)]
    return part_table(keys, "s", w, zeros, zeros, [None] * rows, [{}] * rows)


def part_gets(proxy: CountingProxy) -> list[str]:
    return [r for r in proxy.requests if r.startswith("GET ") and "/parts/" in r]


# ----------------------------------------------------------------------------- writing


def test_parts_are_written_in_row_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    assert row_groups(table_bytes(synthetic_part(10_000, 8))) == [4096, 4096, 1808]
    monkeypatch.setattr(parts_module, "ROW_GROUP_BYTES", 1 << 20)  # as if D were large
    wide = synthetic_part(1000, 1024)  # ~4 KiB a row
    rows = row_group_rows(wide)
    assert 200 <= rows <= 256 < ROW_GROUP_ROWS
    groups = row_groups(table_bytes(wide))
    assert groups == [rows] * (1000 // rows) + [1000 % rows]
    meta = pq.ParquetFile(io.BytesIO(table_bytes(wide))).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"


def test_outputs_are_written_in_row_groups(tmp_path) -> None:
    uri = write_synthetic_index(str(tmp_path / "index"), parts=3, rows=3000, dimension=8)
    run_rank(RankConfig(index=uri, top=2))
    ranked = open_storage(uri).read_bytes("rank/sorted/part-00000.parquet")  # one partition
    assert row_groups(ranked) == [4096, 4096, 808]


# ----------------------------------------------------------------------------- reading


def test_take_reads_rows_in_order_across_parts_and_row_groups(tmp_path) -> None:
    uri = write_synthetic_index(str(tmp_path / "index"), parts=3, rows=5000, dimension=16)
    index = Index(uri)
    whole = index.table()
    rows = np.random.default_rng(1).integers(0, 15_000, 300)
    rows = np.concatenate([rows, rows[:5], [14_999, 0, 4096, 4095, 5000]])  # repeats, edges
    for columns in (None, ["w", "key"]):
        taken = index.take(rows, columns)
        expected = whole.take(pa.array(rows))
        assert taken.equals(expected.select(columns) if columns else expected)
    empty = index.take(np.array([], np.int64), ["key", "w"])
    assert empty.num_rows == 0 and empty.column_names == ["key", "w"]
    with pytest.raises(KeyError, match="lacks column"):
        index.take(rows, ["no_such_column"])
    with pytest.raises(IndexError):
        index.take(np.array([15_000]))


def test_column_read_on_s3_fetches_only_those_columns(
    s3_index: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = open_storage(s3_index)
    paths = storage.list("parts/")
    total = sum(storage.size(p) for p in paths)
    expected = pa.concat_tables(
        [
            pq.read_table(io.BytesIO(storage.read_bytes(p)), columns=["key", "self_influence"])
            for p in paths
        ]
    )
    with CountingProxy(storage.options.endpoint_url or "") as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        index = Index(s3_index)
        start = proxy.body_bytes  # the manifest
        table = index.table(["key", "self_influence"])
        fetched = proxy.body_bytes - start
    assert table.equals(expected)
    assert fetched < 0.05 * total, (fetched, total)
    gets = part_gets(proxy)
    assert gets and all("bytes=" in g for g in gets)  # ranged reads only, never a whole part


def test_schema_from_the_footer(s3_index: str, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = open_storage(s3_index)
    part = storage.size(storage.list("parts/")[0])
    with CountingProxy(storage.options.endpoint_url or "") as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        index = Index(s3_index)
        start = proxy.body_bytes
        columns = index.columns()
        fetched = proxy.body_bytes - start
    assert {"key", "w", "z", "self_influence", "tar_offset"} <= columns
    assert fetched <= 128 * 1024 and fetched < 0.02 * part, (fetched, part)
    assert all("bytes=" in g for g in part_gets(proxy))


def test_take_on_s3_reads_only_the_row_groups_it_needs(
    s3_index: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = open_storage(s3_index)
    part = storage.size(storage.list("parts/")[0])
    rows = np.array([9000 + 8192 + 5, 9000 + 8192 + 700])  # in part 1's last group (808 rows)
    expected = Index(s3_index).table(["w"]).take(pa.array(rows))
    with CountingProxy(storage.options.endpoint_url or "") as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        index = Index(s3_index)
        start = proxy.body_bytes
        taken = index.take(rows, ["w"])
        fetched = proxy.body_bytes - start
    assert taken.equals(expected)
    assert len({g.split(" ")[1] for g in part_gets(proxy)}) == 1  # one part touched
    # One group's w (808 x 1 KiB) and the footer, not the part's 9,000 rows.
    assert fetched < 0.15 * part, (fetched, part)


def test_arrow_reads_ride_out_faults(s3_index: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """503s and bodies cut mid-way, met by pyarrow's own (and only) retries."""
    storage = open_storage(s3_index)
    expected = read_columns(storage, "parts/shard-000001.parquet", ["key", "loss"])
    with FlakyProxy(storage.options.endpoint_url or "", slowdowns=3, truncations=3) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        flaky = open_storage(s3_index)
        assert read_columns(flaky, "parts/shard-000001.parquet", ["key", "loss"]).equals(expected)
    assert proxy.rejected == 3 and proxy.truncated == 3


def test_arrow_filesystem_of_s3(s3_index: str, s3_endpoint: str) -> None:
    storage = open_storage(s3_index)
    filesystem, root = storage.arrow_filesystem()
    assert root == f"{BUCKET}/index" and filesystem.region == "us-east-1"
    assert filesystem.get_file_info(f"{root}/manifest.json").size == storage.size("manifest.json")
    with pytest.raises(ObjectNotFoundError, match=f"s3://{BUCKET}/index/parts/missing"):
        storage.open_arrow("parts/missing.parquet")
    with pytest.raises(ValueError, match="relative"):
        storage.open_arrow("/etc/passwd")
