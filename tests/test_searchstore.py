"""The stored, sharded search index against brute force over every part."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.config import SearchConfig
from pipeline.index.layout import MANIFEST
from pipeline.index.manifest import FORMAT
from pipeline.index.parts import part_table, publish_part
from pipeline.index.reader import Index
from pipeline.index.searchstore import (
    SEARCH_MANIFEST,
    SearchStore,
    StaleSearchIndexError,
    brute_force_top_k,
    build_search_index,
)
from pipeline.search import recall_at_k
from pipeline.storage import open_storage


def clustered(n: int, d: int, clusters: int, seed: int) -> np.ndarray:
    """Points around random centres, with spread in norm (so inner product != cosine)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    x = centres[rng.integers(clusters, size=n)] + 0.3 * rng.normal(size=(n, d))
    return (x * rng.uniform(0.5, 2.0, size=(n, 1))).astype(np.float32)


def write_vector_index(folder, parts: list[np.ndarray]) -> Index:
    """An index whose parts hold the given vectors (keys p<part>-<row>), manifest included."""
    storage = open_storage(str(folder))
    shards = []
    for number, w in enumerate(parts):
        keys = [f"p{number}-{row}" for row in range(len(w))]
        table = part_table(
            keys, f"shard{number}.tar", w, (w**2).sum(1), np.zeros(len(w)), [None] * len(w),
            [{}] * len(w),
        )  # fmt: skip
        marker = publish_part(storage, f"shard{number}", table, {"shard_id": f"shard{number}"})
        shards.append(
            {"part": marker["part"], "examples": len(w), "part_sha256": marker["part_sha256"]}
        )
    manifest = {"format": FORMAT, "dimension": parts[0].shape[1], "shards": shards}
    storage.write_bytes(MANIFEST, json.dumps(manifest).encode())
    return Index(str(folder))


def test_flat_shards_give_the_exact_top_k(tmp_path):
    vectors = clustered(900, 24, 6, seed=0)
    index = write_vector_index(tmp_path, np.split(vectors, [200, 450, 700]))
    # ~250 vectors of 24 float32 per search shard: several shards, merged.
    config = SearchConfig(kind="flat", max_shard_bytes=250 * 24 * 4)
    manifest = build_search_index(index, config)
    assert manifest["kind"] == "flat" and len(manifest["shards"]) >= 3
    queries = clustered(7, 24, 6, seed=1)
    store = SearchStore(index)
    for opponents in (False, True):
        scores, rows = store.search(queries, 10, opponents=opponents)
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        cosine = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ unit.T
        expected = np.argsort(cosine if opponents else -cosine, axis=1)[:, :10]
        np.testing.assert_array_equal(rows, expected)
        np.testing.assert_allclose(scores, np.take_along_axis(cosine, expected, 1), atol=1e-5)
        ref_scores, ref_rows = brute_force_top_k(index, queries, 10, True, opponents)
        np.testing.assert_array_equal(rows, ref_rows)
        np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_inner_product_metric_ranks_by_raw_influence(tmp_path):
    vectors = clustered(300, 16, 4, seed=2)
    index = write_vector_index(tmp_path, [vectors[:150], vectors[150:]])
    build_search_index(index, SearchConfig(kind="flat", metric="inner_product"))
    queries = clustered(5, 16, 4, seed=3)
    scores, rows = SearchStore(index).search(queries, 5)
    expected = np.argsort(-(queries @ vectors.T), axis=1)[:, :5]
    np.testing.assert_array_equal(rows, expected)
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_ivfpq_recall_against_exact_on_a_clustered_set(tmp_path):
    vectors = clustered(6000, 64, 40, seed=4)
    index = write_vector_index(tmp_path, np.split(vectors, 4))
    config = SearchConfig(kind="ivfpq", max_shard_bytes=3000 * 64 * 4, train_rows=4000)
    manifest = build_search_index(index, config)
    assert manifest["kind"] == "ivfpq" and len(manifest["shards"]) == 2
    queries = clustered(50, 64, 40, seed=5)
    _, approx = SearchStore(index).search(queries, 10)
    _, exact = brute_force_top_k(index, queries, 10, normalized=True)
    recall = recall_at_k(approx, exact)
    print(f"ivfpq recall@10 against exact (N=6000, D=64, 40 clusters, re-ranked): {recall:.3f}")
    assert recall >= 0.9


def test_search_index_is_rebuilt_only_when_the_parts_change(tmp_path):
    vectors = clustered(400, 8, 3, seed=6)
    index = write_vector_index(tmp_path, [vectors[:200], vectors[200:]])
    config = SearchConfig(kind="flat")
    first = build_search_index(index, config)
    stored = index.storage.read_bytes(SEARCH_MANIFEST)
    assert build_search_index(index, config) == first
    assert index.storage.read_bytes(SEARCH_MANIFEST) == stored  # not rewritten

    grown = write_vector_index(tmp_path, [vectors[:200], vectors[200:], vectors[:50] * 2])
    with pytest.raises(StaleSearchIndexError, match="rerun `build`"):
        SearchStore(grown)
    rebuilt = build_search_index(grown, config)
    assert rebuilt["rows"] == 450 and SearchStore(grown).rows == 450
    # New files under a new generation, then the manifest; the previous build's files go.
    assert first["shards"][0]["file"] != rebuilt["shards"][0]["file"]
    listed = set(grown.storage.list("search/"))
    assert listed == {SEARCH_MANIFEST} | {shard["file"] for shard in rebuilt["shards"]}


def test_no_search_index_is_a_clear_error_and_none_writes_nothing(tmp_path):
    index = write_vector_index(tmp_path, [clustered(50, 4, 2, seed=7)])
    assert build_search_index(index, SearchConfig(kind="none")) is None
    assert not index.storage.exists(SEARCH_MANIFEST)
    with pytest.raises(FileNotFoundError, match="no search index"):
        SearchStore(index)
    with pytest.raises(ValueError, match=r"search\.kind"):
        build_search_index(index, SearchConfig(kind="hnsw"))


def test_an_s3_index_searches_through_a_local_cache_of_the_rerank_vectors(
    s3_endpoint, tmp_path, monkeypatch
):
    from pipeline.storage import S3Storage

    monkeypatch.setenv("INFLUENCE_SSL_CACHE", str(tmp_path / "cache"))
    S3Storage("search-test").client.create_bucket(Bucket="search-test")
    vectors = clustered(1200, 16, 8, seed=8)
    parts = np.split(vectors, 3)
    remote = write_vector_index("s3://search-test/run", parts)
    local = write_vector_index(tmp_path / "local", parts)
    config = SearchConfig(kind="ivfpq", max_shard_bytes=800 * 16 * 4, train_rows=1200)
    for index in (remote, local):
        assert len(build_search_index(index, config)["shards"]) == 2
    queries = clustered(6, 16, 8, seed=9)
    found = SearchStore(remote).search(queries, 5)
    cached = sorted((tmp_path / "cache" / "search").glob("*.npy"))
    assert len(cached) == 2  # one per search shard, named by content hash
    np.testing.assert_array_equal(found[1], SearchStore(local).search(queries, 5)[1])
    again = SearchStore(remote).search(queries, 5)  # a new store: served from the cache
    np.testing.assert_array_equal(found[1], again[1])
    assert sorted((tmp_path / "cache" / "search").glob("*.npy")) == cached
