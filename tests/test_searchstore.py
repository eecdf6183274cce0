"""The stored, sharded search index (v2) against brute force over every part."""

from __future__ import annotations

import io
import json
import os
import warnings

import faiss
import numpy as np
import pytest

import pipeline.index.searchstore as searchstore
from pipeline.config import PipelineConfig, SearchConfig, from_dict
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
    files_of,
    layout,
    plan_shards,
    sample_row_groups,
    search_config_of,
)
from pipeline.index.searchstore import blocks as blocks_module
from pipeline.index.searchstore import build as build_module
from pipeline.index.searchstore import scan as scan_module
from pipeline.search import l2_normalize, recall_at_k, rerank
from pipeline.storage import S3Storage, open_storage
from pipeline.testing import clustered

IVF = {"kind": "ivfpq", "train_rows": 4000, "reduce_dim": 32}


def write_vector_index(folder, parts: list[np.ndarray], z: list[np.ndarray] | None = None) -> Index:
    """An index whose parts hold the given vectors (keys p<part>-<row>), manifest included;
    `z`, when given, as the parts' float16 z column."""
    storage = open_storage(str(folder))
    shards = []
    for number, w in enumerate(parts):
        keys = [f"p{number}-{row}" for row in range(len(w))]
        table = part_table(
            keys, f"shard{number}.tar", w, (w**2).sum(1), np.zeros(len(w)), [None] * len(w),
            [{}] * len(w), z=None if z is None else z[number],
        )  # fmt: skip
        marker = publish_part(storage, f"shard{number}", table, {"shard_id": f"shard{number}"})
        shards.append(
            {"part": marker["part"], "examples": len(w), "part_sha256": marker["part_sha256"]}
        )
    manifest = {"format": FORMAT, "dimension": parts[0].shape[1], "shards": shards}
    storage.write_bytes(MANIFEST, json.dumps(manifest).encode())
    return Index(str(folder))


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int, opponents: bool = False):
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cosine = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ unit.T
    rows = np.argsort(cosine if opponents else -cosine, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(cosine, rows, 1), rows


@pytest.fixture(scope="module")
def ivf_index(tmp_path_factory) -> tuple[Index, np.ndarray, dict]:
    """6,000 clustered vectors (D = 64) in 4 parts; IVF-PQ on 32 principal directions in 2
    shards of 3,000."""
    vectors = clustered(6000, 64, 40, seed=4)
    index = write_vector_index(tmp_path_factory.mktemp("ivf"), np.split(vectors, 4))
    manifest = build_search_index(index, SearchConfig(**IVF, shard_rows=3000))
    return index, vectors, manifest


# -- shards by rows; flat ---------------------------------------------------------------------


def test_shards_are_runs_of_whole_parts_by_rows():
    parts = [{"rows": r} for r in (100, 100, 100, 400, 50, 100)]
    assert plan_shards(parts, 250) == [[0, 1], [2], [3], [4, 5]]
    assert plan_shards(parts, 10_000) == [[0, 1, 2, 3, 4, 5]]
    with pytest.raises(ValueError, match="shard_rows"):
        plan_shards(parts, 0)


def test_flat_shards_give_the_exact_top_k(tmp_path):
    vectors = clustered(900, 24, 6, seed=0)
    index = write_vector_index(tmp_path, np.split(vectors, [200, 450, 700]))
    manifest = build_search_index(index, SearchConfig(kind="flat", shard_rows=250))
    assert manifest["kind"] == "flat" and manifest["trained"] is None
    assert [s["parts"] for s in manifest["shards"]] == [[0], [1], [2], [3]]
    assert [s["offset"] for s in manifest["shards"]] == [0, 200, 450, 700]
    queries = clustered(7, 24, 6, seed=1)
    for threads in (1, 3):
        store = SearchStore(index, threads=threads)
        for opponents in (False, True):
            scores, rows = store.search(queries, 10, opponents=opponents)
            expected_scores, expected = exact_top(vectors, queries, 10, opponents)
            np.testing.assert_array_equal(rows, expected)
            np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
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


# -- IVF-PQ -----------------------------------------------------------------------------------


def test_ivfpq_trained_once_and_shards_hold_only_codes(ivf_index):
    index, _, manifest = ivf_index
    listed = index.storage.list("search/")
    assert [n for n in listed if n.endswith("-trained.faiss")] == [manifest["trained"]["file"]]
    assert sorted(listed) == sorted([SEARCH_MANIFEST, *files_of(manifest)])
    assert len(manifest["shards"]) == 2 and [s["rows"] for s in manifest["shards"]] == [3000] * 2
    trained = searchstore.Trained.from_bytes(index.storage.read_bytes(manifest["trained"]["file"]))
    assert trained.transform is not None and trained.transform.d_out == 32
    assert trained.ivf.quantizer.ntotal == trained.ivf.nlist == manifest["trained"]["nlist"]
    for shard in manifest["shards"]:
        path = index.storage.local_path(shard["file"])
        mapped = faiss.read_index(path, faiss.IO_FLAG_MMAP)
        lists = faiss.downcast_InvertedLists(mapped.invlists)
        assert isinstance(lists, faiss.OnDiskInvertedLists)  # memory-mapped, not read in
        assert mapped.ntotal == 3000 and mapped.quantizer.ntotal == 0  # no quantiser copy
        # Codes (m bytes) and ids (8 bytes) per vector, the PQ codebooks and a header per
        # list: no room for the quantiser's nlist x d floats.
        codebooks = mapped.pq.centroids.size() * 4
        overhead = 48 * mapped.nlist + 1024
        assert shard["bytes"] <= 3000 * (mapped.pq.M + 8) + codebooks + overhead
        assert trained.ivf.nlist * trained.ivf.d * 4 > overhead


def test_ivfpq_recall_parallel_subsets_and_memory_maps(ivf_index):
    index, vectors, _ = ivf_index
    queries = clustered(50, 64, 40, seed=5)
    _, exact = brute_force_top_k(index, queries, 10, normalized=True)
    sequential = SearchStore(index, threads=1)
    scores, rows = sequential.search(queries, 10)
    recall = recall_at_k(rows, exact)
    print(f"ivfpq recall@10 against exact (N=6000, D=64, 40 clusters, re-ranked): {recall:.3f}")
    assert recall >= 0.95
    # Scores are exact cosines against the float16 copies of the rows found.
    np.testing.assert_allclose(scores, exact_cosines(vectors, queries, rows), atol=2e-3)
    parallel = SearchStore(index, threads=4)
    for found, again in zip((scores, rows), parallel.search(queries, 10), strict=True):
        np.testing.assert_array_equal(found, again)
    remapped = SearchStore(index, threads=2, resident=False).search(queries, 10)
    np.testing.assert_array_equal(rows, remapped[1])
    halves = [SearchStore(index, shards=[n]).search(queries, 10) for n in (0, 1)]
    merged = searchstore.merge_top_k(
        np.hstack([h[0] for h in halves]), np.hstack([h[1] for h in halves]), 10, False
    )
    np.testing.assert_array_equal(rows, merged[1])
    assert ((halves[0][1] < 3000) & (halves[1][1] >= 3000)).all()
    # Re-rank blocks are mapped for a call only; the shard files stay mapped while open.
    with open("/proc/self/maps") as f:
        maps = f.read()
    assert "-vectors-" not in maps and "-shard-00000.faiss" in maps
    opp_scores, opp_rows = sequential.search(queries, 10, opponents=True)
    _, exact_opp = brute_force_top_k(index, queries, 10, normalized=True, opponents=True)
    assert recall_at_k(opp_rows, exact_opp) >= 0.95
    assert (np.diff(opp_scores, axis=1) >= 0).all()
    few = sequential.search(queries, 3, candidates=4, nprobe=2)  # dedup's few candidates
    assert few[1].shape == (50, 3) and (few[1] >= 0).all()


def test_a_floor_skips_re_ranking_but_keeps_every_hit_above_it(tmp_path, monkeypatch):
    # Rows near a 24-dimensional subspace (the 32 principal directions keep ~all of their
    # energy, so the bound is tight) and near-copies of some of them.
    rng = np.random.default_rng(8)
    basis = rng.normal(size=(24, 64))
    vectors = rng.normal(size=(6000, 24)) @ basis + 0.1 * rng.normal(size=(6000, 64))
    vectors[1::50] = vectors[::50] + 0.05 * rng.normal(size=(120, 64)) @ np.eye(64)
    vectors = vectors.astype(np.float32)
    index = write_vector_index(tmp_path, np.split(vectors, 4))
    build_search_index(index, SearchConfig(**IVF, shard_rows=3000))
    store = SearchStore(index, threads=1)
    queries = vectors[::50][:60]
    fetched: list[int] = []
    fetch = blocks_module.BlockReader.fetch

    def counted(self, ids):
        fetched.append(len(ids))
        return fetch(self, ids)

    monkeypatch.setattr(blocks_module.BlockReader, "fetch", counted)
    scores, rows = store.search(queries, 8, candidates=64)
    full = sum(fetched)
    for floor in (0.5, 0.9):
        fetched.clear()
        got_scores, got_rows = store.search(queries, 8, candidates=64, floor=floor)
        print(f"floor {floor}: {sum(fetched)} of {full} candidate rows read")
        assert floor < 0.9 or sum(fetched) < full / 4  # those bounded below it were not read
        for q in range(len(queries)):
            want = {r for r, s in zip(rows[q], scores[q], strict=True) if s >= floor}
            got = {r for r, s in zip(got_rows[q], got_scores[q], strict=True) if s >= floor}
            assert want == got and len(want) >= 2  # itself and its near-copy at least
    # The bound itself, over every (query, row) pair: nothing it would skip has a cosine (with
    # the float16 row re-ranking scores) at or above the floor, with the stored per-row
    # bounds and with the older fixed slack.
    q = l2_normalize(queries)
    small = store.trained.reduce(q)
    unit = l2_normalize(vectors)
    ivf = store.trained.ivf
    reconstructed = ivf.sa_decode(ivf.sa_encode(store.trained.reduce(unit)))
    approx = small @ reconstructed.T  # each row's PQ score, as the scan computes it
    cosine = q @ l2_normalize(unit.astype(np.float16)).T
    ids = np.broadcast_to(np.arange(len(vectors)), approx.shape)
    bounds = np.concatenate([store.load_bounds(shard) for shard in store.shards])
    whole = {"bounds": {"max": bounds.max(axis=0).tolist()}}  # one shard of every row
    for floor in (0.5, 0.9, 0.99):
        terms = scan_module.floor_terms(q, small, floor)
        for shard in (whole, {}):  # with per-row bounds, and an older index's fixed slack
            kept = scan_module.above_floor(approx, ids, terms, shard, lambda _: bounds) >= 0
            assert (cosine >= floor)[~kept].sum() == 0
        kept = scan_module.above_floor(approx, ids, terms, whole, lambda _: bounds) >= 0
        print(
            f"floor {floor}: {kept.mean():.4f} of pairs kept, {(cosine >= floor).mean():.4f} above"
        )
        assert floor < 0.9 or kept.sum() <= 3 * (cosine >= floor).sum()  # a tight bound


def test_list_by_list_scan_gives_faiss_scores(ivf_index):
    index, vectors, _ = ivf_index
    store = SearchStore(index, threads=1)
    plan = store.plan(store.prepare(vectors[::7]), nprobe=4, candidates=20, k=10)
    for shard in store.shards:
        ivf = store.load_ivf(shard).index
        want_s, want_i = scan_module.preassigned_search(ivf, plan, 20)
        got_s, got_i = scan_module.scan_by_list(ivf, plan, 20)
        np.testing.assert_allclose(got_s, want_s, rtol=1e-5, atol=1e-5)  # both descending
        same = [set(a) == set(b) for a, b in zip(got_i, want_i, strict=True)]
        assert np.mean(same) >= 0.99 and (got_i >= 0).mean() > 0.9  # ties aside: the same
    # `scan` takes this path when lists are shared by several queries, FAISS's for one query.
    one = store.plan(store.prepare(vectors[:1]), nprobe=4, candidates=20, k=10)
    ivf = store.load_ivf(store.shards[0]).index
    for p, scanned in ((plan, scan_module.scan_by_list), (one, scan_module.preassigned_search)):
        np.testing.assert_array_equal(scan_module.scan(ivf, p, 20)[1], scanned(ivf, p, 20)[1])


def test_re_rank_reads_each_candidate_once_and_equals_one_by_one(ivf_index, monkeypatch):
    index, vectors, _ = ivf_index
    store = SearchStore(index, threads=1)
    shard = store.shards[0]
    plan = store.plan(store.prepare(vectors[::5]), nprobe=4, candidates=30, k=10)
    ids = scan_module.scan(store.load_ivf(shard).index, plan, 30)[1]
    stored = np.concatenate(
        [np.load(index.storage.local_path(b["file"])) for b in shard["vectors"]]
    ).astype(np.float32)
    # The reference: every candidate on its own, its cosine from its float16 row.
    cosine = np.einsum("qcd,qd->qc", stored[ids], plan["q"]) / np.linalg.norm(stored[ids], axis=2)
    cosine = np.where(ids >= 0, cosine, -np.inf)
    best = np.argsort(-cosine, axis=1, kind="stable")[:, :10]
    reads, preads = [], []
    fetch, pread = blocks_module.BlockReader.fetch, os.preadv

    def counted(self, rows):
        reads.append(len(rows))
        return fetch(self, rows)

    monkeypatch.setattr(blocks_module.BlockReader, "fetch", counted)
    monkeypatch.setattr(os, "preadv", lambda *a: preads.append(1) or pread(*a))
    with blocks_module.BlockReader(store, shard) as blocks:
        scores, rows = rerank(plan["q"], ids, blocks.fetch, 10, True, plan["order"])
    np.testing.assert_array_equal(rows, np.take_along_axis(ids, best, 1))
    np.testing.assert_allclose(scores, np.take_along_axis(cosine, best, 1), rtol=1e-6, atol=1e-6)
    # Queries of one list share candidates: far fewer rows read than candidates, and runs of
    # consecutive rows in one pread each.
    assert sum(reads) < 0.6 * (ids >= 0).sum() and len(preads) <= sum(reads)
    preads.clear()
    with blocks_module.BlockReader(store, shard) as blocks:
        some = blocks.fetch(np.array([0, 1, 2, 3, 10, 11, 2999]))
    np.testing.assert_array_equal(some, stored[[0, 1, 2, 3, 10, 11, 2999]])
    assert len(preads) == 3


def test_rows_own_lists_are_stored_and_replace_the_quantiser_search(ivf_index):
    index, vectors, manifest = ivf_index
    store = SearchStore(index, threads=1)
    rows = np.arange(2500, 3600)  # across both shards
    small = store.trained.reduce(store.prepare(vectors[rows]))
    want_d, want_i = store.trained.ivf.quantizer.search(small, searchstore.STORED_PROBES)
    stored = store.stored_lists(rows, searchstore.STORED_PROBES)
    assert (stored == want_i).mean() > 0.999  # the lists a search finds (rounding aside)
    assert store.stored_lists(rows, searchstore.STORED_PROBES + 1) is None
    plan = store.plan(store.prepare(vectors[rows]), 4, 12, 5, rows=rows)
    np.testing.assert_array_equal(plan["coarse_i"], stored[:, :4])
    np.testing.assert_allclose(plan["coarse_d"], want_d[:, :4], rtol=1e-5, atol=1e-5)
    # With `rows`, a row is left out of its own hits: the plain search's hits less itself.
    plain = without_own(*store.search(vectors[rows], 6, nprobe=4, candidates=12), rows, 5)
    own = store.search(vectors[rows], 5, nprobe=4, candidates=12, rows=rows)
    assert not (own[1] == rows[:, None]).any()
    assert (own[1] == plain[1]).mean() > 0.999
    np.testing.assert_allclose(own[0], plain[0], atol=1e-6)
    # An older search index, without stored lists, searches the quantiser instead.
    old = {**manifest, "shards": [{**s, "lists": None} for s in manifest["shards"]]}
    older = SearchStore(index, old, threads=1)
    assert older.stored_lists(rows, 4) is None
    again = older.search(vectors[rows], 5, nprobe=4, candidates=12, rows=rows)
    np.testing.assert_array_equal(again[1], plain[1])


def without_own(scores, found, rows, k):
    keep = [np.flatnonzero(f != r)[:k] for f, r in zip(found, rows, strict=True)]
    return np.stack([s[i] for s, i in zip(scores, keep, strict=True)]), np.stack(
        [f[i] for f, i in zip(found, keep, strict=True)]
    )


def test_a_flat_search_leaves_rows_out_of_their_own_hits(tmp_path):
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(600, 16)).astype(np.float32)
    index = write_vector_index(tmp_path, np.split(vectors, 3))
    build_search_index(index, SearchConfig(kind="flat", shard_rows=250))
    store = SearchStore(index, threads=1)
    rows = np.arange(100, 500, 7)
    plain = without_own(*store.search(vectors[rows], 6), rows, 5)
    own = store.search(vectors[rows], 5, rows=rows)
    np.testing.assert_array_equal(own[1], plain[1])
    np.testing.assert_allclose(own[0], plain[0], atol=1e-6)


def exact_cosines(vectors: np.ndarray, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return np.einsum("qkd,qd->qk", unit[rows], q)


def test_training_reads_only_sampled_row_groups(tmp_path, monkeypatch):
    # Parts of 9,000 rows are written in row groups of 4096 + 4096 + 808.
    vectors = clustered(36_000, 8, 5, seed=10)
    index = write_vector_index(tmp_path, np.split(vectors, 4))
    read = []
    real = build_module.read_row_groups

    def spy(storage, path, groups, columns):
        read.append((path, list(groups), columns))
        return real(storage, path, groups, columns)

    monkeypatch.setattr(build_module, "read_row_groups", spy)
    parts = searchstore.parts_of(index)
    sample = sample_row_groups(index, parts, "w", 5000, seed=3)
    assert sample.shape == (5000, 8) and sample.dtype == np.float32
    assert all(columns == ["w"] for _, _, columns in read)
    # Whole groups, one per part (in a seeded order), until 5,000 rows: no part read whole.
    sizes = [4096, 4096, 808]
    taken = sum(sizes[g] for _, groups, _ in read for g in groups)
    assert 5000 <= taken < 5000 + 4096
    assert all(len(groups) == 1 for _, groups, _ in read) and len(read) < 4
    known = {row.tobytes() for row in vectors}
    assert all(row.tobytes() in known for row in sample)
    again = sample_row_groups(index, parts, "w", 5000, seed=3)
    np.testing.assert_array_equal(sample, again)  # seeded
    assert len(sample_row_groups(index, parts, "w", 100_000, seed=3)) == 36_000


def test_build_maps_shards_through_map_fn_with_identical_files(tmp_path, ivf_index):
    _, vectors, manifest = ivf_index
    index = write_vector_index(tmp_path, np.split(vectors, 4))
    calls = []

    def backwards(fn, items):  # any order, any executor: the files must not depend on it
        calls.append(len(items))
        return [fn(item) for item in items[::-1]][::-1]

    mine = build_search_index(index, SearchConfig(**IVF, shard_rows=3000), map_fn=backwards)
    assert calls == [2]
    digests = [(s["sha256"], [b["sha256"] for b in s["vectors"]]) for s in mine["shards"]]
    expected = [(s["sha256"], [b["sha256"] for b in s["vectors"]]) for s in manifest["shards"]]
    assert digests == expected and mine["trained"]["sha256"] == manifest["trained"]["sha256"]


def test_search_over_z_beside_w(tmp_path):
    w = clustered(2000, 32, 10, seed=11)
    z = clustered(2000, 16, 10, seed=12)
    z = (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float16)
    index = write_vector_index(tmp_path, np.split(w, 2), z=np.split(z, 2))
    config = SearchConfig(kind="ivfpq", train_rows=2000, reduce_dim=8, shard_rows=1000)
    over_z = build_search_index(index, config, column="z", directory="search_z")
    over_w = build_search_index(index, SearchConfig(kind="flat"))
    assert over_z["column"] == "z" and over_z["dimension"] == 16 and over_w["dimension"] == 32
    assert build_search_index(index, config, column="z", directory="search_z") == over_z
    queries = z[:20].astype(np.float32)
    _, rows = SearchStore(index, directory="search_z").search(queries, 5)
    _, exact = brute_force_top_k(index, queries, 5, normalized=True, column="z")
    assert recall_at_k(rows, exact) >= 0.95
    assert (rows[:, 0] == np.arange(20)).all()  # each z finds itself first
    assert SearchStore(index).search(w[:3], 1)[1][:, 0].tolist() == [0, 1, 2]
    assert set(index.storage.list("search/")) == {SEARCH_MANIFEST, *files_of(over_w)}


# -- staleness, errors ------------------------------------------------------------------------


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
    assert set(grown.storage.list("search/")) == {SEARCH_MANIFEST, *files_of(rebuilt)}


def test_an_old_format_search_index_is_stale_and_rebuilt(tmp_path):
    vectors = clustered(300, 8, 3, seed=13)
    index = write_vector_index(tmp_path, [vectors])
    old = {
        "format": "influence-ssl/search/1",
        "kind": "flat",
        "metric": "cosine",
        "rows": 300,
        "shards": [{"file": "search/0ld-shard-00000.faiss", "parts": [0], "offset": 0}],
        "parts_covered": searchstore.parts_of(index),
        "config": {},
    }
    index.storage.write_bytes(SEARCH_MANIFEST, json.dumps(old).encode())
    index.storage.write_bytes("search/0ld-shard-00000.faiss", b"ISSLIDX1 old bytes")
    with pytest.raises(StaleSearchIndexError, match=r"old format.*rerun `build`"):
        SearchStore(index)
    rebuilt = build_search_index(index, SearchConfig(kind="flat"))
    assert rebuilt["format"] == "influence-ssl/search/2"
    assert set(index.storage.list("search/")) == {SEARCH_MANIFEST, *files_of(rebuilt)}
    assert SearchStore(index).search(vectors[:2], 1)[1][:, 0].tolist() == [0, 1]


def test_corrupt_files_are_clear_errors(tmp_path, ivf_index):
    _, vectors, _ = ivf_index
    index = write_vector_index(tmp_path, np.split(vectors, 4))
    manifest = build_search_index(index, SearchConfig(**IVF, shard_rows=3000))
    queries = vectors[:3]

    def damaged(name: str, edit) -> None:
        original = index.storage.read_bytes(name)
        index.storage.write_bytes(name, edit(original))
        try:
            with pytest.raises(ValueError, match=r"corrupt|could not be read|wrong size"):
                SearchStore(index).search(queries, 5)
        finally:
            index.storage.write_bytes(name, original)

    flip = lambda data: data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]  # noqa: E731
    damaged(manifest["trained"]["file"], flip)
    damaged(manifest["shards"][1]["file"], flip)
    damaged(manifest["shards"][1]["file"], lambda data: data[:-9])
    damaged(manifest["shards"][0]["vectors"][0]["file"], lambda data: data[:-64])
    damaged(manifest["shards"][0]["vectors"][0]["file"], lambda data: b"not an npy" + data)
    SearchStore(index).search(queries, 5)  # restored: fine again

    flat = write_vector_index(tmp_path / "flat", [vectors[:500]])
    shard = build_search_index(flat, SearchConfig(kind="flat"))["shards"][0]["file"]
    flat.storage.write_bytes(shard, flip(flat.storage.read_bytes(shard)))
    with pytest.raises(ValueError, match="corrupt"):
        SearchStore(flat).search(queries, 5)


def test_no_search_index_is_a_clear_error_and_none_writes_nothing(tmp_path):
    index = write_vector_index(tmp_path, [clustered(50, 4, 2, seed=7)])
    assert build_search_index(index, SearchConfig(kind="none")) is None
    assert not index.storage.exists(SEARCH_MANIFEST)
    with pytest.raises(FileNotFoundError, match="no search index"):
        SearchStore(index)
    with pytest.raises(ValueError, match=r"search\.kind"):
        build_search_index(index, SearchConfig(kind="hnsw"))
    with pytest.raises(KeyError, match="no column 'z'"):
        build_search_index(index, SearchConfig(kind="flat"), column="z")


def test_max_shard_bytes_of_old_configs_is_ignored_with_a_note():
    old = {"config": {"index": {"search": {"kind": "flat", "max_shard_bytes": 1 << 30}}}}
    with pytest.warns(FutureWarning, match="max_shard_bytes is deprecated.*shard_rows"):
        assert search_config_of(old) == SearchConfig(kind="flat")
    with pytest.warns(FutureWarning, match="max_shard_bytes"):
        config = from_dict(PipelineConfig, {"index": {"search": {"max_shard_bytes": 5}}})
    assert config.index.search == SearchConfig()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert search_config_of({"config": {}}) == SearchConfig()


# -- S3 and Ray -------------------------------------------------------------------------------


def test_an_s3_index_searches_through_a_checked_local_cache(s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("INFLUENCE_SSL_CACHE", str(tmp_path / "cache"))
    S3Storage("search-test").client.create_bucket(Bucket="search-test")
    vectors = clustered(1200, 16, 8, seed=8)
    parts = np.split(vectors, 3)
    remote = write_vector_index("s3://search-test/run", parts)
    local = write_vector_index(tmp_path / "local", parts)
    config = SearchConfig(kind="ivfpq", shard_rows=800, train_rows=1200, reduce_dim=8)
    built = [build_search_index(index, config) for index in (remote, local)]
    assert len(built[0]["shards"]) == 2
    assert [s["sha256"] for s in built[0]["shards"]] == [s["sha256"] for s in built[1]["shards"]]
    queries = clustered(6, 16, 8, seed=9)
    found = SearchStore(remote, threads=2).search(queries, 5)
    cache = tmp_path / "cache" / "search"
    cached = sorted(p.name for p in cache.iterdir())
    digests = {s["sha256"] for s in built[0]["shards"]}
    digests |= {b["sha256"] for s in built[0]["shards"] for b in s["vectors"]}
    assert cached == sorted(
        f"{d}{'.faiss' if d in {s['sha256'] for s in built[0]['shards']} else '.npy'}"
        for d in digests
    )  # shard files and re-rank blocks, named by content hash; nothing partial left
    mine = SearchStore(local).search(queries, 5)
    np.testing.assert_array_equal(found[1], mine[1])
    np.testing.assert_allclose(found[0], mine[0], atol=1e-6)
    again = SearchStore(remote).search(queries, 5)  # a new store: served from the cache
    np.testing.assert_array_equal(found[1], again[1])
    assert sorted(p.name for p in cache.iterdir()) == cached
    # A corrupt download is refused and not cached.
    for path in cache.iterdir():
        path.unlink()
    name = built[0]["shards"][0]["file"]
    remote.storage.write_bytes(name, remote.storage.read_bytes(name)[:-5] + b"xxxxx")
    with pytest.raises(ValueError, match="corrupt"):
        # One thread: the corrupt first shard stops the search before the second is fetched
        # (with two, the valid second shard may or may not be cached by then).
        SearchStore(remote, threads=1).search(queries, 5)
    assert not any(p.suffix == ".faiss" for p in cache.iterdir())


def test_ray_service_gives_the_local_answers(ray_session, tmp_path):
    from pipeline.config import RuntimeConfig
    from pipeline.runtime.search_service import SearchService, cluster_map

    vectors = clustered(4500, 32, 20, seed=14)
    index = write_vector_index(tmp_path, np.split(vectors, 3))
    config = SearchConfig(kind="ivfpq", shard_rows=1500, train_rows=3000, reduce_dim=16)
    map_fn = cluster_map(RuntimeConfig(cpus_per_worker=0.5))
    assert map_fn is not None  # the session's Ray is connected
    manifest = build_search_index(index, config, map_fn=map_fn)  # shards built as Ray tasks
    assert len(manifest["shards"]) == 3
    queries = clustered(12, 32, 20, seed=15)
    local = SearchStore(index)
    with SearchService(str(tmp_path), actors=2, num_cpus=0.5) as service:
        assert len(service.actors) == 2
        for opponents in (False, True):
            served = service.search(queries, 10, opponents=opponents)
            mine = local.search(queries, 10, opponents=opponents)
            np.testing.assert_array_equal(served[1], mine[1])
            np.testing.assert_allclose(served[0], mine[0], atol=1e-6)


def test_stored_vectors_are_the_blocks_rows_across_shards(ivf_index):
    index, vectors, _ = ivf_index
    store = SearchStore(index, threads=1)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = np.arange(2500, 3500)  # spans the two shards (3,000 rows each)
    got = store.stored_vectors(rows)
    assert got.dtype == np.float16 and got.shape == (1000, 64)
    blocks = [
        np.load(index.storage.local_path(b["file"])) for s in store.shards for b in s["vectors"]
    ]
    np.testing.assert_array_equal(got, np.concatenate(blocks)[rows])
    np.testing.assert_allclose(got, unit[rows], atol=1e-3)  # unit rows, rounded to float16
    assert store.stored_vectors(np.arange(0)).shape == (0, 64)
    with pytest.raises(IndexError, match="out of range"):
        store.stored_vectors(np.array([6000]))


def test_unit_rows_of_float16_vectors_are_computed_in_float32():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(5000, 256)) * 40).astype(np.float16)  # |x|^2 ~ 4e5 > float16's max
    x[3] = 0
    unit = l2_normalize(x)
    wide = x.astype(np.float64)
    want = wide / np.maximum(np.linalg.norm(wide, axis=1), 1)[:, None]
    np.testing.assert_allclose(unit, want, atol=1e-6)
    assert (unit[3] == 0).all() and unit.dtype == np.float32


def test_queries_with_nan_or_inf_are_refused(ivf_index):
    index, vectors, _ = ivf_index
    store = SearchStore(index, threads=1)
    for bad in (np.nan, np.inf, -np.inf):
        q = vectors[:3].copy()
        q[1, 5] = bad
        with pytest.raises(ValueError, match="NaN or infinite"):
            store.search(q, 5)
    assert store.search(vectors[:3], 5)[1].shape == (3, 5)


@pytest.mark.parametrize("dtype", [np.float16, np.int32])
def test_npy_buffer_files_load_as_their_first_rows(dtype):
    """A vector block or lists file is written from the buffer it was filled in: every prefix
    of rows is a valid .npy file of those rows, with numpy's own alignment."""
    buffer = layout.NpyBuffer((1_000, 24), dtype)
    values = (np.arange(24_000) % 2_048).reshape(1_000, 24)  # exact in float16
    buffer.array[:] = values
    for rows in (1_000, 999, 7, 0):
        data = buffer.file(rows)
        loaded = np.load(io.BytesIO(bytes(data)), allow_pickle=False)
        assert loaded.dtype == dtype and loaded.shape == (rows, 24)
        np.testing.assert_array_equal(loaded, values[:rows])
        assert buffer.header % 64 == 0
        expected = io.BytesIO()
        np.save(expected, loaded)
        assert len(data) == len(expected.getvalue())
