"""The key -> row lookup (`keys/`): equal to a dict over every key, one row group read per
bucket, duplicates reported, rebuilt only when the parts change, the same on S3 (moto's
server on loopback, bytes counted by a proxy) as in a local folder."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest

import pipeline.index.keys as keys_module
from pipeline.index.keys import (
    KEYS_MANIFEST,
    DuplicateKeyWarning,
    bucket_path,
    build_key_lookup,
    key_hashes,
    lookup_rows,
    read_key_manifest,
)
from pipeline.index.manifest import FORMAT, write_manifest
from pipeline.index.parts import part_table, publish_part
from pipeline.index.reader import Index
from pipeline.storage import S3Storage, open_storage
from pipeline.testing.indexes import write_synthetic_index
from pipeline.testing.s3server import CountingProxy

BUCKET = "keys-test"
SMALL = {"bucket_rows": 200, "row_group_rows": 32, "spill_rows": 100}  # 1,200 rows: 6 buckets


def every_key(index: Index) -> dict[str, int]:
    """The reference: every key's global row, from a dict built in memory (small index)."""
    return {key: row for row, key in enumerate(index.table(["key"]).column("key").to_pylist())}


def write_keyed_index(uri: str, parts: list[list[str]]) -> str:
    """An index whose parts hold exactly these keys (the same key may be in two parts)."""
    storage = open_storage(uri)
    shards = []
    for number, keys in enumerate(parts):
        n = len(keys)
        w = np.ones((n, 2), np.float32)
        table = part_table(keys, f"s{number}", w, w.sum(1), w[:, 0], [None] * n, [{}] * n)
        marker = publish_part(storage, f"s{number}", table, {"shard": f"s{number}"})
        shards.append({"url": f"s{number}", "id": f"s{number}", "examples": n})
        shards[-1] |= {"part": marker["part"], "part_sha256": marker["part_sha256"]}
    write_manifest(storage, {"format": FORMAT, "dimension": 2, "shards": shards})
    return storage.uri


@pytest.fixture
def index(tmp_path) -> Index:
    return Index(write_synthetic_index(str(tmp_path / "index"), parts=4, rows=300, dimension=4))


def test_lookup_equals_a_dict_of_every_key(index: Index) -> None:
    manifest = build_key_lookup(index, **SMALL)
    assert manifest["buckets"] == 6 and manifest["rows"] == manifest["keys"] == 1200
    assert manifest["duplicate_keys"] == 0
    reference = every_key(index)
    keys = list(reference)
    np.random.default_rng(0).shuffle(keys)
    assert lookup_rows(index, keys).tolist() == [reference[k] for k in keys]
    assert lookup_rows(index, [keys[3], keys[3], keys[0]]).tolist() == [
        reference[keys[3]],
        reference[keys[3]],
        reference[keys[0]],
    ]
    assert lookup_rows(index, []).dtype == np.int64
    # Each bucket: sorted by key, in small row groups, part/row agreeing with global_row.
    offsets = index.offsets()
    for bucket, count in enumerate(manifest["bucket_keys"]):
        data = index.storage.read_bytes(bucket_path(manifest["generation"], bucket))
        file = pq.ParquetFile(io.BytesIO(data))
        assert all(file.metadata.row_group(g).num_rows <= 32 for g in range(file.num_row_groups))
        table = file.read()
        bucket_keys = table.column("key").to_pylist()
        assert bucket_keys == sorted(bucket_keys) and len(bucket_keys) == count
        part, row = table.column("part").to_numpy(), table.column("row").to_numpy()
        assert (offsets[part] + row == table.column("global_row").to_numpy()).all()


def test_unknown_keys_are_a_key_error_naming_them(index: Index) -> None:
    build_key_lookup(index, **SMALL)
    with pytest.raises(KeyError, match=r"not in the index: \['nope'\]"):
        lookup_rows(index, ["p000000-0000001", "nope"])
    unknown = [f"missing-{i:02d}" for i in range(12)]
    with pytest.raises(KeyError, match=r"missing-09'\] \(12 in all\)") as error:
        lookup_rows(index, unknown)
    assert "missing-10" not in str(error.value)


def test_a_lookup_reads_one_row_group_per_bucket(index: Index, monkeypatch) -> None:
    manifest = build_key_lookup(index, **SMALL)
    reads: list[list[int]] = []
    original = pq.ParquetFile.read_row_groups

    def counted(self, row_groups, *args, **kwargs):
        reads.append(list(row_groups))
        return original(self, row_groups, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", counted)
    reference = every_key(index)
    one_per_bucket: dict[int, str] = {}
    for key in reference:
        one_per_bucket.setdefault(int(key_hashes([key])[0] % 6), key)
    wanted = list(one_per_bucket.values())
    assert len(wanted) == manifest["buckets"]
    reads.clear()
    assert lookup_rows(index, wanted).tolist() == [reference[k] for k in wanted]
    assert len(reads) == 6 and all(len(groups) == 1 for groups in reads)  # of ~7 groups each
    reads.clear()
    with pytest.raises(KeyError):
        lookup_rows(index, ["nope"])
    assert sum(map(len, reads)) <= 1  # a key between groups' ranges reads none


def test_duplicate_keys_are_counted_and_their_first_row_returned(tmp_path, capsys) -> None:
    uri = write_keyed_index(str(tmp_path / "dup"), [["a", "b", "c"], ["d", "b", "e"], ["c"]])
    index = Index(uri)
    manifest = build_key_lookup(index, bucket_rows=2)
    assert (manifest["duplicate_keys"], manifest["duplicate_rows"]) == (2, 2)
    assert sorted(manifest["duplicate_examples"]) == ["b", "c"] and manifest["keys"] == 5
    assert "2 key(s) occur in more than one row" in capsys.readouterr().out
    with pytest.warns(DuplicateKeyWarning, match=r"b \(2 rows\)"):
        assert lookup_rows(index, ["b", "e"]).tolist() == [1, 5]  # b's first row
    with pytest.warns(DuplicateKeyWarning, match=r"c \(2 rows\)"):
        assert lookup_rows(index, ["c"]).tolist() == [2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lookup_rows(index, ["a", "d"]).tolist() == [0, 3]


def test_non_ascii_keys_in_many_row_groups(tmp_path) -> None:
    """Parquet's min/max (unsigned bytes), Arrow's sort and Python's str order agree."""
    keys = ["é", "z", "Z", "ä", "a/b", "a", "日本", "😀", "e\u0301", " ", "~", "ß"]
    index = Index(write_keyed_index(str(tmp_path / "utf8"), [keys[:5], keys[5:]]))
    build_key_lookup(index, bucket_rows=4, row_group_rows=2)
    assert lookup_rows(index, keys[::-1]).tolist() == list(range(len(keys)))[::-1]


def test_rebuilt_only_when_the_parts_change(tmp_path, capsys) -> None:
    uri = write_keyed_index(str(tmp_path / "grow"), [["a", "b"], ["c"]])
    first = build_key_lookup(Index(uri), bucket_rows=1)
    storage = open_storage(uri)
    files = set(storage.list("keys/"))
    assert files == {KEYS_MANIFEST} | {bucket_path(first["generation"], b) for b in range(3)}
    assert build_key_lookup(Index(uri), bucket_rows=1) == first  # current: not rewritten
    assert set(storage.list("keys/")) == files
    # A part changed: the lookup is stale, so lookups scan the parts (with a hint) and a
    # build writes a new generation, removing the old one.
    write_keyed_index(uri, [["a", "b"], ["c", "x"]])
    capsys.readouterr()
    assert lookup_rows(Index(uri), ["x", "a"]).tolist() == [3, 0]
    assert "rerun `build`" in capsys.readouterr().out
    second = build_key_lookup(Index(uri), bucket_rows=1)
    assert second["parts_covered"] != first["parts_covered"] and second["keys"] == 4
    assert not files & set(storage.list("keys/")) - {KEYS_MANIFEST}
    assert lookup_rows(Index(uri), ["x", "a"]).tolist() == [3, 0]
    assert "rerun" not in capsys.readouterr().out
    # A lookup of another format (an older version's) is likewise scanned around and rebuilt.
    storage.write_bytes(KEYS_MANIFEST, json.dumps({**second, "format": "old"}).encode())
    assert lookup_rows(Index(uri), ["c"]).tolist() == [2]
    assert "rerun `build`" in capsys.readouterr().out
    assert build_key_lookup(Index(uri), bucket_rows=1)["format"] == keys_module.FORMAT


def test_an_index_without_a_lookup_streams_the_key_column(index: Index, capsys) -> None:
    assert read_key_manifest(index) is None
    reference = every_key(index)
    keys = ["p000003-0000299", "p000000-0000000", "p000002-0000017"]
    assert lookup_rows(index, keys).tolist() == [reference[k] for k in keys]
    assert "no current key lookup" in capsys.readouterr().out
    with pytest.raises(KeyError, match="nope"):
        lookup_rows(index, ["nope"])


def test_the_hash_is_pinned() -> None:
    """Stored lookups depend on it: a change would silently send keys to the wrong bucket."""
    assert key_hashes(["", "a", "p000000-0000001"]).tolist() == [
        13020603013274838756,
        3405396810240292928,
        5673316377324870481,
    ]


@pytest.fixture(scope="module")
def s3_bucket(s3_endpoint: str) -> str:
    S3Storage(BUCKET).client.create_bucket(Bucket=BUCKET)
    return BUCKET


def test_s3_lookup_equals_local_and_fetches_little(s3_bucket, tmp_path, monkeypatch) -> None:
    shape = {"parts": 2, "rows": 15_000, "dimension": 2, "z_dim": 2}
    local = Index(write_synthetic_index(str(tmp_path / "index"), **shape))
    uri = write_synthetic_index(f"s3://{BUCKET}/index", **shape)
    settings = {"bucket_rows": 15_000, "row_group_rows": 1024}  # 2 buckets of ~15 groups
    local_manifest = build_key_lookup(local, **settings)
    remote = Index(uri)
    remote_manifest = build_key_lookup(remote, **settings)
    generation = local_manifest["generation"]
    assert (remote_manifest["generation"], remote_manifest["buckets"]) == (generation, 2)
    for bucket in range(2):
        name = bucket_path(generation, bucket)
        expected = pq.read_table(io.BytesIO(local.storage.read_bytes(name)))
        assert pq.read_table(io.BytesIO(remote.storage.read_bytes(name))).equals(expected)
    keys = list(every_key(local))[::37]
    assert lookup_rows(remote, keys).tolist() == lookup_rows(local, keys).tolist()
    key, row = "p000001-0000123", 15_123
    bucket = bucket_path(generation, int(key_hashes([key])[0] % 2))
    spans = group_spans(pq.ParquetFile(io.BytesIO(remote.storage.read_bytes(bucket))).metadata)
    storage = open_storage(uri)
    with CountingProxy(storage.options.endpoint_url or "") as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        index = Index(uri)
        start = len(proxy.requests)
        assert lookup_rows(index, [key]).tolist() == [row]
        seen = proxy.requests[start:]
    gets = [r for r in seen if r.startswith("GET ")]
    assert gets[0].split(" ")[1].endswith("/keys/manifest.json")
    assert all(bucket in r for r in gets[1:]) and not any("/parts/" in r for r in seen)
    # Besides the footer (pyarrow reads the file's tail), the bytes of one row group only.
    ranges = [tuple(map(int, r.rsplit("bytes=", 1)[1].split("-"))) for r in gets[1:]]
    size = remote.storage.size(bucket)
    body = [(first, last) for first, last in ranges if last < size - 1]
    assert len(body) == 1 and len(spans) >= 10
    inside = [g for g, (lo, hi) in enumerate(spans) if lo <= body[0][0] and body[0][1] < hi]
    assert len(inside) == 1, (body, spans)
    with pytest.raises(KeyError, match="nope"):
        lookup_rows(remote, ["nope"])


def test_spill_files_hold_several_streams(tmp_path) -> None:
    """Small buffers: a bucket's spill file grows by one IPC stream per spill."""
    spill = keys_module.Spill(str(tmp_path), buckets=2, spill_rows=3)
    index = Index(write_synthetic_index(str(tmp_path / "i"), parts=2, rows=5, dimension=2))
    for table in keys_module.key_tables(index):
        spill.add(table, np.arange(table.num_rows) % 2)
        spill.add(table.slice(0, 0), np.empty(0, np.int64))  # a part whose rows were skipped
    spill.flush()
    rows = sorted(spill.read(0).column("global_row").to_pylist())
    assert rows == [0, 2, 4, 5, 7, 9]
    assert spill.read(1).num_rows == 4


def group_spans(metadata: pq.FileMetaData) -> list[tuple[int, int]]:
    """[start, end) bytes of each row group's column chunks."""
    spans = []
    for g in range(metadata.num_row_groups):
        chunks = [metadata.row_group(g).column(c) for c in range(metadata.num_columns)]
        starts = [c.dictionary_page_offset or c.data_page_offset for c in chunks]
        ends = [s + c.total_compressed_size for s, c in zip(starts, chunks, strict=True)]
        spans.append((min(starts), max(ends)))
    return spans
