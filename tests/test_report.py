"""The `report` verb's library code and reading images back from shards by key.

A small real index (real MNIST digits in real WebDataset shards, embedded in memory), real
rank / query / dedup / groups outputs computed from it, then the report parsed back with the
stdlib HTML parser: every image exists and is the right digit, keys are escaped, missing
outputs omit their section, a vanished shard gives a placeholder.
"""

from __future__ import annotations

import io
import json
import os
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from PIL import Image

from pipeline.data import write_shards
from pipeline.data.lookup import (
    MISSING_SHARD,
    NOT_IN_SHARD,
    placeholder,
    read_images,
    thumbnails,
)
from pipeline.index.layout import DEDUP_DIR, GROUPS_DIR
from pipeline.index.reader import Index
from pipeline.rank import RankConfig, read_ranked, run_rank
from pipeline.report import QUERY_RESULTS, ReportConfig, run_report
from pipeline.storage import S3Storage, open_storage
from pipeline.testing.indexes import small_engine, write_index

EVIL = "x/<img src=zz onerror=alert(1)>&\"'"  # a valid WebDataset key, hostile as HTML
DUP_OF = "d0001"  # EVIL is an exact copy of this digit
THUMB = 56  # twice the digits' side: nearest upscaling, so thumb[::2, ::2] is the digit
PER_SHARD = 20


@pytest.fixture(scope="module")
def corpus(digits) -> tuple[torch.Tensor, list[str], list[int]]:
    """59 real digits (6 per class, one left out for the image query) plus EVIL = a copy."""
    picks = [c * 60 + j for c in range(10) for j in range(6)][:59]
    images = torch.cat([digits[picks], digits[picks[1]][None]])
    keys = [f"d{i:04d}" for i in range(59)] + [EVIL]
    cls = [p // 60 for p in picks] + [picks[1] // 60]
    return images, keys, cls


@pytest.fixture(scope="module")
def engine(corpus):
    return small_engine(corpus[0])


def uint8(image: torch.Tensor) -> np.ndarray:
    return (image[0].numpy() * 255).round().astype(np.uint8)


def make_index(root: str, corpus, engine) -> tuple[Index, list[str]]:
    """Real shards of the corpus under root/shards, its index under root/index."""
    images, keys, cls = corpus
    samples = [(k, uint8(x), {"cls": c}) for k, x, c in zip(keys, images, cls, strict=True)]
    sep = "" if root.endswith("/") else "/"
    urls = write_shards(f"{root}{sep}shards", samples, per_shard=PER_SHARD, prefix="digits")
    uri = write_index(
        f"{root}{sep}index",
        images,
        keys,
        cls,
        [{"cls": c} for c in cls],
        shards=urls,
        engine=engine,
    )
    return Index(uri), urls


# ----------------------------------------------------------------------------- outputs


def write_rank(index: Index) -> pa.Table:
    """The real `rank` verb's output (small partitions, so the ends span several); every row."""
    run_rank(RankConfig(index.storage.uri, top=0, top_k=4, partition_rows=16))
    return read_ranked(index)


def write_queries(index: Index, engine, query_image: torch.Tensor, query_path: str) -> pa.Table:
    """Top-3 proponents/opponents by cosine for two keys and one image file outside the index."""
    table = index.table(["key", "shard", "w"])
    w = index.vectors(table)
    keys = table.column("key").to_pylist()
    queries = [(EVIL, w[keys.index(EVIL)], None), ("d0010", w[keys.index("d0010")], None)]
    w_image = engine.embed(query_image[None], ["query.png"])[0].numpy()
    queries.append(("query.png", w_image, query_path))
    rows = []
    for name, wq, source in queries:
        influence = w @ wq
        cosine = influence / (np.linalg.norm(w, axis=1) * np.linalg.norm(wq))
        order = np.argsort(-cosine, kind="stable")
        for direction, ids in (("proponent", order[:3]), ("opponent", order[::-1][:3])):
            for rank, i in enumerate(ids):
                rows.append(
                    {
                        "query": name,
                        "direction": direction,
                        "rank": rank,
                        "key": keys[i],
                        "shard": table.column("shard")[int(i)].as_py(),
                        "influence": float(influence[i]),
                        "normalized_influence": float(cosine[i]),
                        "query_source": source,
                    }
                )
    results = pa.Table.from_pylist(rows)
    index.write_table(QUERY_RESULTS, results)
    return results


def write_dedup(index: Index) -> pa.Table:
    """Exact duplicates by pixel hash; the first key (sorted) of a group is kept."""
    table = index.table(["key", "shard", "pixel_hash", "w"])
    w = index.vectors(table)
    unit = w / np.linalg.norm(w, axis=1, keepdims=True)
    rows = table.select(["key", "shard", "pixel_hash"]).to_pylist()
    by_hash: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_hash.setdefault(row["pixel_hash"], []).append(i)
    groups = [sorted(m, key=lambda i: rows[i]["key"]) for m in by_hash.values() if len(m) > 1]
    out = [
        {"key": r["key"], "shard": r["shard"], "group": -1, "kept": True, "reason": "unique",
         "similarity": None, "kept_key": None}
        for r in rows
    ]  # fmt: skip
    for g, members in enumerate(groups):
        kept = members[0]
        for i in members:
            out[i].update(
                group=g,
                kept=i == kept,
                reason="kept" if i == kept else "exact_duplicate",
                similarity=float(unit[i] @ unit[kept]),
                kept_key=rows[kept]["key"],
            )
    schema = pa.schema(
        [("key", pa.string()), ("shard", pa.string()), ("group", pa.int64()),
         ("kept", pa.bool_()), ("reason", pa.string()), ("similarity", pa.float32()),
         ("kept_key", pa.string())]
    )  # fmt: skip
    result = pa.Table.from_pylist(out, schema)
    index.write_table(f"{DEDUP_DIR}/exact.parquet", result)
    summary = {"mode": "exact", "groups": len(groups), "removed": sum(not r["kept"] for r in out)}
    index.storage.write_bytes(f"{DEDUP_DIR}/exact.summary.json", json.dumps(summary).encode())
    return result


def write_groups(index: Index) -> None:
    """Per-class self-influence statistics and the class x class influence matrix."""
    table = index.table(["cls", "self_influence", "w"])
    w = index.vectors(table)
    unit = w / np.linalg.norm(w, axis=1, keepdims=True)
    cls = np.array(table.column("cls").to_pylist())
    s = table.column("self_influence").to_numpy()
    top = s >= np.quantile(s, 0.9)
    stats, matrix = [], []
    for c in np.unique(cls):
        mine = cls == c
        share = float(top[mine].sum() / top.sum())
        stats.append(
            {"group": str(c), "count": int(mine.sum()),
             "self_influence_mean": float(s[mine].mean()),
             "self_influence_median": float(np.median(s[mine])),
             "self_influence_max": float(s[mine].max()),
             "top_share": share, "top_ratio": share / float(mine.mean())}
        )  # fmt: skip
        for d in np.unique(cls):
            other = cls == d
            matrix.append(
                {"group_a": str(c), "group_b": str(d),
                 "mean_influence": float((w[mine] @ w[other].T).mean()),
                 "mean_cosine": float((unit[mine] @ unit[other].T).mean())}
            )  # fmt: skip
    index.write_table(f"{GROUPS_DIR}/cls.stats.parquet", pa.Table.from_pylist(stats))
    index.write_table(f"{GROUPS_DIR}/cls.matrix.parquet", pa.Table.from_pylist(matrix))


# ----------------------------------------------------------------------------- parsing


class Page(HTMLParser):
    """Sections, and every <img> with its section, alt and the classes of its <figure>."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[dict] = []
        self.tags: list[str] = []
        self.figure = ""

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "section":
            self.sections.append(attrs["id"])
        elif tag == "figure":
            self.figure = attrs.get("class", "")
        elif tag == "img":
            section = self.sections[-1] if self.sections else ""
            self.images.append({**attrs, "section": section, "figure": self.figure})

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure":
            self.figure = ""


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    page.close()
    return page


def read_report(url: str) -> tuple[str, Page, object]:
    folder, name = url.rsplit("/", 1)
    assert name == "index.html"
    storage = open_storage(folder)
    text = storage.read_bytes(name).decode("utf-8")
    return text, parse(text), storage


def png(storage, src: str) -> np.ndarray:
    with Image.open(io.BytesIO(storage.read_bytes(src))) as im:
        im.load()
        return np.asarray(im.convert("L"))


def tiles(page: Page, section: str) -> list[dict]:
    return [i for i in page.images if i["section"] == section and "tile" in i["figure"]]


# ----------------------------------------------------------------------------- tests


def test_read_images_and_thumbnails(tmp_path, corpus, engine):
    images, keys, _ = corpus
    _, urls = make_index(str(tmp_path), corpus, engine)
    found = read_images(urls[1], ["d0021", "d0039", "d0000", "absent"])
    assert sorted(found) == ["d0021", "d0039"]  # d0000 lives in the first shard
    for key, data in found.items():
        assert isinstance(data, bytes)
        decoded = np.asarray(Image.open(io.BytesIO(data)))
        assert np.array_equal(decoded, uint8(images[keys.index(key)]))
    fitted = read_images(urls[2], [EVIL], side=THUMB)[EVIL]
    assert fitted.size == (THUMB, THUMB)
    assert np.array_equal(np.asarray(fitted)[::2, ::2], uint8(images[keys.index(DUP_OF)]))

    gone = str(tmp_path / "shards" / "gone.tar")
    table = pa.table(
        {"key": ["d0005", "nope", "d0045", "lost"], "shard": [urls[0], urls[0], urls[2], gone]}
    )
    thumbs = thumbnails(table, THUMB, max_workers=2)
    assert thumbs.missing == {"nope": NOT_IN_SHARD, "lost": MISSING_SHARD}
    assert thumbs["nope"] == thumbs["lost"] == placeholder(THUMB)
    for key in ("d0005", "d0045"):
        thumb = np.asarray(Image.open(io.BytesIO(thumbs[key])))
        assert np.array_equal(thumb[::2, ::2], uint8(images[keys.index(key)]))


def test_photos_are_fitted_into_the_box(tmp_path):
    """Real RGB photos (scikit-image), JPEG in a shard: downscaled, aspect kept, same picture."""
    from skimage import data

    photos = {"astronaut": data.astronaut(), "coffee": data.coffee()}  # 512x512, 400x600
    samples = [(key, image, {}) for key, image in photos.items()]
    (url,) = write_shards(str(tmp_path), samples, per_shard=2, fmt="jpg")
    fitted = read_images(url, list(photos), side=64)
    assert {k: (im.mode, im.size) for k, im in fitted.items()} == {
        "astronaut": ("RGB", (64, 64)),
        "coffee": ("RGB", (64, 43)),
    }
    for key, image in photos.items():
        expected = Image.fromarray(image).resize(fitted[key].size, Image.Resampling.BOX)
        error = np.abs(np.asarray(fitted[key], float) - np.asarray(expected, float)).mean()
        assert error < 4.0, (key, error)


def test_full_report(tmp_path, corpus, engine, digits):
    images, keys, _ = corpus
    index, _ = make_index(str(tmp_path), corpus, engine)
    # Only the rank so far: the other sections must be absent, not broken.
    ranked = write_rank(index)
    first = read_report(run_report(ReportConfig(index.storage.uri, out=str(tmp_path / "r1"))))
    assert first[1].sections == ["summary", "self-influence"]

    query_image = digits[599]  # not in the index
    query_path = str(tmp_path / "query.png")
    Image.fromarray(uint8(query_image)).save(query_path)
    results = write_queries(index, engine, query_image, query_path)
    dedup = write_dedup(index)
    write_groups(index)
    config = ReportConfig(index.storage.uri, thumb_size=THUMB, extremes=5, workers=2)
    url = run_report(config)
    assert url == index.storage.url("report/index.html")  # default: inside the index
    text, page, storage = read_report(url)
    assert page.sections == ["summary", "queries", "self-influence", "dedup-exact", "groups-cls"]

    # Every image exists and is a PNG; no script, no external reference.
    assert page.images and all(i["src"].endswith(".png") for i in page.images)
    for image in page.images:
        with Image.open(io.BytesIO(storage.read_bytes(image["src"]))) as im:
            im.verify()
    assert "<script" not in text and "http://" not in text and "https://" not in text

    # Thumbnails are the right digits (and the query image is the file's digit).
    for tile in [t for t in page.images if "tile" in t["figure"]]:
        source = query_image if tile["alt"] == "query.png" else images[keys.index(tile["alt"])]
        assert np.array_equal(png(storage, tile["src"])[::2, ::2], uint8(source)), tile["alt"]

    # The listed examples are the outputs' rows, in their order.
    shown = [t["alt"] for t in tiles(page, "self-influence")]
    top = ranked.column("key").to_pylist()
    assert shown == top[:5] + top[::-1][:5]
    expected = []  # per query: itself, its proponents, its opponents (the file's order)
    for query in (EVIL, "d0010", "query.png"):
        rows = results.filter(pc.equal(results.column("query"), query))
        expected += [query, *rows.column("key").to_pylist()]
    assert [t["alt"] for t in tiles(page, "queries")] == expected
    dup = tiles(page, "dedup-exact")
    assert [(t["alt"], "kept" in t["figure"]) for t in dup] == [(DUP_OF, True), (EVIL, False)]
    assert dedup.filter(pc.equal(dedup.column("key"), EVIL))["kept_key"][0].as_py() == DUP_OF
    assert len([i for i in page.images if i["section"] == "groups-cls"]) == 2  # bars, heatmaps

    # The hostile key is escaped everywhere: its tag never became an element.
    assert EVIL not in text and "<img src=zz" not in text
    assert "x/&lt;img src=zz onerror=alert(1)&gt;&amp;&quot;&#x27;" in text
    assert not [i for i in page.images if i["src"] == "zz"]
    assert {"queries", "dedup-exact"} <= {t["section"] for t in page.images if t["alt"] == EVIL}


def test_vanished_shard_gives_placeholders(tmp_path, corpus, engine):
    images, keys, _ = corpus
    index, urls = make_index(str(tmp_path), corpus, engine)
    ranked = write_rank(index)
    os.remove(urls[0])  # keys d0000..d0019 can no longer be shown
    config = ReportConfig(index.storage.uri, out=str(tmp_path / "r"), thumb_size=THUMB, extremes=30)
    url = run_report(config)
    text, page, storage = read_report(url)
    shown = tiles(page, "self-influence")
    assert len(shown) == 60
    blank = np.asarray(Image.open(io.BytesIO(placeholder(THUMB))))
    lost = {t["alt"] for t in shown if "missing" in t["figure"]}
    assert lost == set(keys[:PER_SHARD])
    for tile in shown:
        thumb = png(storage, tile["src"])
        if tile["alt"] in lost:
            assert np.array_equal(thumb, blank)
        else:
            assert np.array_equal(thumb[::2, ::2], uint8(images[keys.index(tile["alt"])]))
    assert "image unavailable: missing_shard" in text
    assert ranked.num_rows == 60


def test_missing_column_is_a_clear_error(tmp_path, corpus, engine):
    index, _ = make_index(str(tmp_path), corpus, engine)
    broken = pa.table({"key": ["d0000"], "shard": ["x"], "group": [0]})
    index.write_table(f"{DEDUP_DIR}/influence.parquet", broken)
    with pytest.raises(ValueError, match=r"dedup/influence.parquet lacks column\(s\) \['kept'"):
        run_report(ReportConfig(index.storage.uri, out=str(tmp_path / "r")))


def test_report_of_an_s3_index(s3_endpoint, corpus, engine):
    S3Storage("report-test").client.create_bucket(Bucket="report-test")
    index, _ = make_index("s3://report-test/run", corpus, engine)
    write_rank(index)
    write_dedup(index)
    url = run_report(ReportConfig(index.storage.uri, thumb_size=THUMB, extremes=3))
    assert url == "s3://report-test/run/index/report/index.html"
    _, page, storage = read_report(url)
    assert page.sections == ["summary", "self-influence", "dedup-exact"]
    images, keys, _ = corpus
    for tile in [t for t in page.images if "tile" in t["figure"]]:
        digit = uint8(images[keys.index(tile["alt"])])
        assert np.array_equal(png(storage, tile["src"])[::2, ::2], digit)
    assert "missing" not in {c for t in page.images for c in t["figure"].split()}


def test_report_reads_only_what_it_shows(tmp_path, corpus, engine, monkeypatch):
    """Dedup's groups file (grouped rows only), a query key that is not among its own results
    (its shard looked up), the rank ends: and never a whole-index table."""
    images, keys, _ = corpus
    index, _ = make_index(str(tmp_path), corpus, engine)
    ranked = write_rank(index)
    full = write_dedup(index)
    index.storage.delete(f"{DEDUP_DIR}/exact.parquet")
    grouped = full.filter(pc.greater_equal(full.column("group"), 0))
    grouped = grouped.sort_by([("group", "ascending"), ("kept", "descending")])
    index.write_table(f"{DEDUP_DIR}/exact/groups.parquet", grouped)
    summary = {"mode": "exact", "examples": 60, "groups": 1}  # as dedup writes it
    index.storage.write_bytes(f"{DEDUP_DIR}/exact.summary.json", json.dumps(summary).encode())
    shard = {k: s for k, s in zip(full["key"].to_pylist(), full["shard"].to_pylist(), strict=True)}
    results = pa.Table.from_pylist(
        [
            {"query": "d0033", "direction": d, "rank": 0, "key": k, "shard": shard[k],
             "influence": 1.0, "normalized_influence": 0.5}
            for d, k in (("proponent", "d0034"), ("opponent", "d0002"))
        ]
    )  # fmt: skip
    index.write_table(QUERY_RESULTS, results)

    def whole(*_, **__):
        raise AssertionError("the report read a whole-index table")

    monkeypatch.setattr(Index, "table", whole)
    config = ReportConfig(index.storage.uri, out=str(tmp_path / "r"), thumb_size=THUMB, extremes=3)
    text, page, storage = read_report(run_report(config))
    assert page.sections == ["summary", "queries", "self-influence", "dedup-exact"]
    assert [t["alt"] for t in tiles(page, "queries")] == ["d0033", "d0034", "d0002"]
    dup = tiles(page, "dedup-exact")
    assert [(t["alt"], "kept" in t["figure"]) for t in dup] == [(DUP_OF, True), (EVIL, False)]
    assert "reason: unique" in text and ">58<" in text  # 60 examples (summary), 2 grouped
    top = ranked.column("key").to_pylist()
    assert [t["alt"] for t in tiles(page, "self-influence")] == top[:3] + top[::-1][:3]
    for tile in tiles(page, "queries") + tiles(page, "self-influence"):
        digit = uint8(images[keys.index(tile["alt"])])
        assert np.array_equal(png(storage, tile["src"])[::2, ::2], digit)


def test_rank_output_of_an_older_version_is_named_not_read(tmp_path, corpus, engine):
    index, _ = make_index(str(tmp_path), corpus, engine)
    index.storage.write_bytes("rank/self_influence.parquet", b"not read")
    text, page, _ = read_report(
        run_report(ReportConfig(index.storage.uri, out=str(tmp_path / "r")))
    )
    assert page.sections == ["summary", "self-influence"]
    assert "predates the partitioned rank: rerun rank" in text
