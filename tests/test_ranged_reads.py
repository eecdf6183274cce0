"""Per-example reads by byte range: the spans the reader records, ranged reads on both stores,
and readback (thumbnails, refinement, the report) that fetches an example, not its shard.

Real MNIST shards throughout; S3 is moto's server, traffic counted by a proxy in front of it.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.config import PipelineConfig, to_dict
from pipeline.data import ReadStats, decode_image, read_shard, write_shards
from pipeline.data.lookup import (
    COALESCE_GAP,
    scan_shard,
    shard_thumbnails,
    spans_by_shard,
    thumbnails,
)
from pipeline.storage import S3Storage, open_storage, read_uri_range
from pipeline.testing.indexes import small_config
from pipeline.testing.s3server import FlakyProxy

BLOCK = tarfile.BLOCKSIZE


class CountingProxy(FlakyProxy):
    """A well-behaved proxy that counts the response body bytes it relays."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream, max_connections=2000)
        self.body_bytes = 0

    def _forward(self, lines: list[str], body: bytes) -> bytes:
        response = super()._forward(lines, body)
        with self._lock:
            self.body_bytes += len(response.partition(b"\r\n\r\n")[2])
        return response

    def gets(self) -> list[str]:
        return [r for r in self.requests if r.startswith("GET ")]


def padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def spans_of(url: str) -> tuple[list, dict[str, tuple[int, int]]]:
    samples = list(read_shard(url, 28, 1, ReadStats()))
    return samples, {s.key: (s.tar_offset, s.tar_size) for s in samples}


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return out.getvalue()


def uint8(image: torch.Tensor) -> np.ndarray:
    return (image[0].numpy() * 255).round().astype(np.uint8)


# ----------------------------------------------------------------------------- the reader


def test_reader_records_where_each_sample_sits(digit_shards):
    _, urls = digit_shards
    raw = Path(urls[0]).read_bytes()
    samples = list(read_shard(urls[0], 28, 1, ReadStats()))
    with tarfile.open(urls[0]) as tf:
        members: dict[str, list[tarfile.TarInfo]] = {}
        for info in tf.getmembers():
            members.setdefault(info.name.split(".")[0], []).append(info)
        assert [s.key for s in samples] == list(members)
        for sample in samples:
            mine = members[sample.key]
            assert sample.tar_offset == mine[0].offset
            end = mine[-1].offset_data + padded(mine[-1].size)
            assert sample.tar_offset + sample.tar_size == end
            # The span alone is a little tar of exactly this sample's members.
            piece = raw[sample.tar_offset : end]
            with tarfile.open(fileobj=io.BytesIO(piece)) as little:
                assert little.getnames() == [m.name for m in mine]
                for info in mine:
                    copy = little.extractfile(info.name).read()
                    assert copy == tf.extractfile(info).read()
    # A plain writer's samples tile the archive up to its end-of-archive blocks.
    ends = [s.tar_offset + s.tar_size for s in samples]
    assert [s.tar_offset for s in samples[1:]] == ends[:-1] and samples[0].tar_offset == 0
    assert raw[ends[-1] :].strip(b"\0") == b""


def test_spans_include_long_name_headers_and_every_member(tmp_path, digits):
    """GNU long names and pax headers precede a member's header: the span starts at them;
    members the reader does not read (.txt, oversized) are inside the span too."""
    deep = "folder/" + "k" * 120  # over ustar's 100 characters: an extension header
    members = [
        ("plain.png", png(uint8(digits[0]))),
        ("plain.cls", b"0"),
        (f"{deep}.png", png(uint8(digits[1]))),
        (f"{deep}.txt", os.urandom(3000)),
        (f"{deep}.json", b'{"note": "long"}'),
        ("z\u00e9ro.png", png(uint8(digits[2]))),  # non-ASCII: a pax header
        ("last.png", png(uint8(digits[3]))),
    ]
    for fmt, name in ((tarfile.GNU_FORMAT, "gnu.tar"), (tarfile.PAX_FORMAT, "pax.tar")):
        path = tmp_path / name
        with tarfile.open(path, "w", format=fmt) as tf:
            tf.addfile(tarfile.TarInfo("README"), None)  # no extension: not a sample member
            for member, data in members:
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        raw = path.read_bytes()
        samples = list(read_shard(str(path), 28, 1, ReadStats()))
        assert [s.key for s in samples] == ["plain", deep, "z\u00e9ro", "last"]
        for sample in samples:
            piece = tmp_path / f"piece-{name}"
            span = raw[sample.tar_offset : sample.tar_offset + sample.tar_size]
            piece.write_bytes(span + bytes(2 * BLOCK))
            (again,) = read_shard(str(piece), 28, 1, ReadStats())
            assert (again.key, again.metadata, again.cls) == (
                sample.key,
                sample.metadata,
                sample.cls,
            )
            assert torch.equal(again.image, sample.image)
        with tarfile.open(path) as tf:
            image, text = tf.getmember(f"{deep}.png"), tf.getmember(f"{deep}.txt")
        long = samples[1]
        assert image.offset == long.tar_offset < image.offset_data - BLOCK  # extension header
        assert long.tar_offset < text.offset < long.tar_offset + long.tar_size


def test_compressed_shards_have_no_spans(tmp_path, digits):
    samples = [(f"d{i}", uint8(digits[i]), {"cls": 0}) for i in range(3)]
    (url,) = write_shards(str(tmp_path), samples, per_shard=3)
    gz = tmp_path / "digits.tar.gz"
    with tarfile.open(url) as tf, tarfile.open(gz, "w:gz") as dst:
        for info in tf.getmembers():
            dst.addfile(info, tf.extractfile(info))
    read = list(read_shard(str(gz), 28, 1, ReadStats()))
    assert len(read) == 3 and {(s.tar_offset, s.tar_size) for s in read} == {(None, None)}


# ----------------------------------------------------------------------------- ranged reads


def test_read_range_on_both_stores(tmp_path, s3_endpoint):
    data = os.urandom(5000)
    S3Storage("range-test").client.create_bucket(Bucket="range-test")
    for root in (str(tmp_path), "s3://range-test/x"):
        store = open_storage(root)
        store.write_bytes("blob.bin", data)
        url = store.url("blob.bin")
        assert read_uri_range(url, 0, 5000) == data
        assert read_uri_range(url, 1234, 100) == data[1234:1334]
        assert store.read_range("blob.bin", 4990, 100) == data[4990:]  # cut at the end
        assert store.read_range("blob.bin", 5000, 10) == b""
        assert store.read_range("blob.bin", 7000, 10) == b""
        assert store.read_range("blob.bin", 10, 0) == b""
        with pytest.raises(ValueError):
            store.read_range("blob.bin", -1, 10)
        with pytest.raises(FileNotFoundError):
            store.read_range("absent.bin", 0, 10)


def test_a_ranged_read_decodes_to_the_streamed_image(digit_shards):
    _, urls = digit_shards
    samples, spans = spans_of(urls[1])
    keys = [s.key for s in samples[::25]]  # > COALESCE_GAP apart: one read each
    scan = scan_shard(urls[1], keys, spans=spans)
    assert not scan.streamed and scan.ranged_reads == len(keys) and sorted(scan.images) == keys
    assert scan.ranged_bytes == sum(spans[k][1] for k in keys)
    # Near ones share one read, from the first wanted header to the last wanted data block.
    near = [s.key for s in samples[10:40:3]]
    merged = scan_shard(urls[1], near, spans=spans)
    assert merged.ranged_reads == 1 and sorted(merged.images) == near and not merged.streamed
    assert merged.ranged_bytes == sum(spans[k][1] for k in (s.key for s in samples[10:38]))
    by_key = {s.key: s for s in samples}
    for key, data in {**scan.images, **merged.images}.items():
        assert torch.equal(decode_image(data, 28, 1), by_key[key].image)


def test_stale_spans_fall_back_to_streaming(tmp_path, digit_shards):
    _, urls = digit_shards
    samples, spans = spans_of(urls[2])
    first, second, last = samples[3].key, samples[40].key, samples[-1].key
    wrong = {
        first: spans[second],  # another example's span: its key differs
        second: (spans[second][0] + BLOCK, spans[second][1]),  # mid-sample: not a header
        last: (spans[last][0], spans[last][1] + 10 * BLOCK),  # past the end of the shard
    }
    scan = scan_shard(urls[2], [first, second, last], spans=wrong)
    assert scan.streamed and sorted(scan.images) == sorted([first, second, last])
    by_key = {s.key: s for s in samples}
    for key, data in scan.images.items():
        assert torch.equal(decode_image(data, 28, 1), by_key[key].image)
    # A shard rewritten since the build (other order): found by streaming, still correct.
    reordered = tmp_path / "reordered.tar"
    with tarfile.open(urls[2]) as src, tarfile.open(reordered, "w") as dst:
        for info in reversed(src.getmembers()):
            dst.addfile(info, src.extractfile(info))
    scan = scan_shard(str(reordered), [first], spans=spans)
    assert scan.streamed and torch.equal(
        decode_image(scan.images[first], 28, 1), by_key[first].image
    )


def test_thumbnails_use_span_columns_and_tolerate_tables_without(digit_shards):
    _, urls = digit_shards
    samples, spans = spans_of(urls[0])
    keys = [samples[5].key, samples[50].key]
    base = pa.table({"key": keys, "shard": [urls[0]] * 2})
    spanned = base.append_column(
        "tar_offset", pa.array([spans[k][0] for k in keys], pa.int64())
    ).append_column("tar_size", pa.array([spans[k][1] for k in keys], pa.int64()))
    assert spans_by_shard(base) == {}
    assert spans_by_shard(spanned) == {urls[0]: {k: spans[k] for k in keys}}
    a, b = thumbnails(base, 56), thumbnails(spanned, 56)
    assert dict(a) == dict(b) and not a.missing and not b.missing


def test_s3_thumbnails_fetch_the_examples_not_the_shard(s3_endpoint, digit_shards, monkeypatch):
    _, urls = digit_shards
    S3Storage("thumbs-test").client.create_bucket(Bucket="thumbs-test")
    store = open_storage("s3://thumbs-test/shards")
    store.write_bytes("digits.tar", Path(urls[3]).read_bytes())
    url, size = store.url("digits.tar"), os.path.getsize(urls[3])
    samples, spans = spans_of(urls[3])
    keys = [s.key for s in samples[9::25]]  # 3 examples, more than COALESCE_GAP apart
    pairs = [(url, k) for k in keys]
    with CountingProxy(s3_endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        ranged, missing = shard_thumbnails(pairs, 56, spans={url: spans})
        assert not missing
        gets, fetched = proxy.gets(), proxy.body_bytes
        assert len(gets) == len(keys) and all("bytes=" in g for g in gets)
        assert fetched == sum(spans[k][1] for k in keys) < size / 10
        streamed, missing = shard_thumbnails(pairs, 56)
        assert not missing and streamed == ranged
        assert proxy.body_bytes - fetched > 0.9 * size  # the last key: the whole shard


# ----------------------------------------------------------------------------- a built index


@pytest.fixture(scope="module")
def s3_index(tmp_path_factory, s3_endpoint, digit_shards):
    """A real index of the digit shards on S3, parts written by ShardWorker.build_shard
    (the code a Ray worker runs), manifest as `build` writes it; no Ray."""
    from pipeline.index.layout import FACTORS
    from pipeline.index.manifest import new_manifest, write_manifest
    from pipeline.influence.engine import InfluenceSSL
    from pipeline.models import model_identity
    from pipeline.runtime.worker import ShardWorker, build_model

    _, local = digit_shards
    S3Storage("index-test").client.create_bucket(Bucket="index-test")
    shards = open_storage("s3://index-test/shards")
    for path in local:
        shards.write_bytes(os.path.basename(path), Path(path).read_bytes())
    urls = [shards.url(os.path.basename(p)) for p in local]
    output = str(tmp_path_factory.mktemp("spanned"))
    config = PipelineConfig(output=output, influence=small_config(num_views=4))
    config.runtime.cpus_per_worker = 2
    threads = torch.get_num_threads()
    images = torch.stack([s.image for u in local for s in read_shard(u, 28, 1, ReadStats())])
    engine = InfluenceSSL(build_model(config.influence.model), config.influence).fit(images)
    storage = open_storage(output)
    storage.write_bytes(FACTORS, engine.factors_bytes())
    worker = ShardWorker(to_dict(config))
    torch.set_num_threads(threads)
    worker.load_factors()
    markers = [worker.build_shard(url) for url in urls]
    layers = [layer.describe() for layer in engine.tracker.layers]
    identity = model_identity(engine.encoder, config.influence.model)
    manifest = new_manifest(config, identity, layers, engine.dimension)
    manifest["shards"] = [
        {"url": m["shard"], "id": m["shard_id"], "examples": m["examples"], "part": m["part"]}
        for m in markers
    ]
    write_manifest(storage, manifest)
    return output, urls, images


def test_built_parts_carry_the_spans_the_reader_records(s3_index, digit_shards):
    from pipeline.index.reader import Index

    output, urls, _ = s3_index
    _, local = digit_shards
    index = Index(output)
    table = index.table(["key", "shard", "tar_offset", "tar_size"])
    assert table.schema.field("tar_offset").type == pa.int64()
    recorded = spans_by_shard(table)
    for url, path in zip(urls, local, strict=True):
        assert recorded[url] == spans_of(path)[1]


def test_refine_reads_each_example_by_range(s3_index, s3_endpoint, monkeypatch, tmp_path):
    from pipeline.index.reader import Index
    from pipeline.refine import Refiner

    output, _, images = s3_index
    rows = np.array([3, 77, 150, 239])  # one example in each shard
    refiner = Refiner(Index(output), views=8)
    with CountingProxy(s3_endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        refined, ok = refiner.rows(rows)
        gets, fetched = proxy.gets(), proxy.body_bytes
    assert ok.all() and len(gets) == 4 and all("bytes=" in g for g in gets)
    table = Index(output).take(rows, ["tar_size"])
    assert fetched == sum(table.column("tar_size").to_pylist())
    keys = Index(output).take(rows, ["key"]).column("key").to_pylist()
    expected = refiner.engine.embed(images[rows], keys=keys).numpy()
    np.testing.assert_allclose(refined, expected, rtol=1e-5, atol=1e-6)

    # The same index as an older build wrote it (no span columns): the shards are streamed;
    # likewise where only some parts predate the columns (a build resumed by newer code).
    second = sorted(open_storage(output).list("parts/"))[1]
    for name, stripped in (("old", None), ("mixed", second)):
        older = Refiner(Index(copy_index(output, str(tmp_path / name), stripped)), views=8)
        assert older.spanned == (name == "mixed")
        with CountingProxy(s3_endpoint) as proxy:
            monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
            again, ok = older.rows(rows)
            assert ok.all() and not any("bytes=" in g for g in proxy.gets())
            assert proxy.body_bytes > 20 * fetched
        np.testing.assert_allclose(again, refined, rtol=1e-6, atol=1e-7)


def copy_index(source: str, target: str, stripped: str | None) -> str:
    """A copy of an index whose parts (or only part `stripped`) lack the span columns."""
    old, new = open_storage(target), open_storage(source)
    for path in new.list():
        data = new.read_bytes(path)
        if path.startswith("parts/") and stripped in (None, path):
            table = pq.read_table(io.BytesIO(data)).drop_columns(["tar_offset", "tar_size"])
            sink = io.BytesIO()
            pq.write_table(table, sink)
            data = sink.getvalue()
        old.write_bytes(path, data)
    return old.uri


def test_report_thumbnails_by_range(s3_index, s3_endpoint, monkeypatch):
    from pipeline.index.reader import Index
    from pipeline.rank import RankConfig, run_rank
    from pipeline.report import ReportConfig, run_report

    output, _, images = s3_index
    index = Index(output)
    run_rank(RankConfig(output, top=0))
    with CountingProxy(s3_endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        url = run_report(ReportConfig(output, thumb_size=56, extremes=2))
        gets = proxy.gets()
    report = open_storage(os.path.dirname(url))
    thumbs = report.list("thumbs/")
    assert len(thumbs) == 4
    # One ranged read per example, or fewer where near ones (< COALESCE_GAP apart) merged.
    assert gets and all("bytes=" in g for g in gets) and len(gets) <= 4
    shown = sum(sorted(index.table(["tar_size"]).column("tar_size").to_pylist())[-4:])
    assert proxy.body_bytes <= shown + (4 - len(gets)) * COALESCE_GAP
    assert proxy.body_bytes < len({g.split(" ")[1] for g in gets}) * 60 * 3072 / 2
    digits = {uint8(x).tobytes() for x in images}
    for path in thumbs:
        thumb = np.asarray(Image.open(io.BytesIO(report.read_bytes(path))))
        assert thumb[::2, ::2].tobytes() in digits


def test_thumbnails_stop_trying_an_unreachable_store(s3_endpoint, digit_shards, monkeypatch):
    """After one shard's store refuses every connection (retries spent), the other shards
    there are not tried: each would wait out the retry budget to fail the same way."""
    from pipeline.data import lookup
    from pipeline.storage import S3Options, StoreUnreachableError
    from tests.conftest import free_port
    from tests.test_storage import FAST

    dead = S3Storage(
        "gone", options=S3Options(endpoint_url=f"http://127.0.0.1:{free_port()}", retry=FAST)
    )
    with pytest.raises(StoreUnreachableError, match="unreachable"):
        dead.read_bytes("anything")
    real_scan, tried = lookup.scan_shard, []

    def scan(shard, keys, spans=None):
        tried.append(shard)
        if shard.startswith("s3://gone/"):
            dead.read_range(shard.removeprefix("s3://gone/"), 0, 512)  # raises
        return real_scan(shard, keys, spans=spans)

    monkeypatch.setattr(lookup, "scan_shard", scan)
    _, urls = digit_shards
    key = next(iter(spans_of(urls[0])[1]))
    pairs = [(f"s3://gone/shard-{i}.tar", "k") for i in range(12)] + [(urls[0], key)]
    images, missing = shard_thumbnails(pairs, 56, max_workers=1)
    assert tried == ["s3://gone/shard-0.tar", urls[0]]
    assert {missing[(f"s3://gone/shard-{i}.tar", "k")] for i in range(12)} == {lookup.UNREACHABLE}
    assert (urls[0], key) in images
