"""`query`: top-k proponents and opponents of query examples, offline, from an index.

A query is a key already in the index (its stored w) or an image (a local file or an object
URI), whose w is computed here with the manifest's model, views, projection and factors; a
model or projection that differs from the manifest's is refused, naming each difference.
Influence is <w_q, w_t>; retrieval ranks by normalised influence (cosine) by default and
reports both. The stored search index is used when its metric matches the ranking asked for;
otherwise an exact scan over the parts, one part at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch

from pipeline.config import PipelineConfig, from_dict
from pipeline.data import ImageError, decode_image
from pipeline.index.layout import FACTORS, QUERY_DIR
from pipeline.index.manifest import check_compatible, fingerprint
from pipeline.index.reader import Index
from pipeline.index.searchstore import (
    SearchStore,
    brute_force_top_k,
    read_search_manifest,
)
from pipeline.influence.engine import InfluenceSSL
from pipeline.models import model_identity
from pipeline.refine import Refiner, rerank
from pipeline.storage import read_uri

RESULTS = f"{QUERY_DIR}/results.parquet"


@dataclass
class QueryConfig:
    index: str = "runs/index"  # the index URI (the `output` of fit/build)
    keys: list[str] = field(default_factory=list)  # query examples already in the index
    images: list[str] = field(default_factory=list)  # query images: local paths or URIs
    top: int = 10
    normalized: bool = True  # rank by cos(w_q, w_t) (True) or by <w_q, w_t>
    out: str | None = None  # also write the results here: .parquet, .csv or .json
    save: bool = True  # keep the results beside the index (query/results.parquet) for `report`
    # Settings to compute image queries with, on top of the manifest's (anything that changes
    # w is refused): e.g. model.checkpoint when the checkpoint has moved.
    model: dict = field(default_factory=dict)
    projection: dict = field(default_factory=dict)
    device: str = "cpu"
    # Views for the w of query images; 0: 4x the index's V. Queries are few, so their w can
    # afford more views: the same expected loss, less noise (views 0..V-1 are the index's).
    views: int = 0
    # Re-rank with refined w: the top `refine_candidates` of each query (and the query, when
    # it is a key) are read back from their shards and embedded with `refine` views; 0: off.
    refine: int = 0
    refine_candidates: int = 50


@dataclass
class Queries:
    names: list[str]  # the key, or the image's file name
    sources: list[str]  # "" for keys in the index, else the image's path or URI
    vectors: np.ndarray  # [Q, D]
    rows: list[int] = field(default_factory=list)  # global row of a key, -1 for an image
    images: list[torch.Tensor | None] = field(default_factory=list)  # an image query's pixels


def run_query(config: QueryConfig) -> pa.Table:
    if not config.keys and not config.images:
        raise ValueError(
            "no query: give keys with --set 'keys=[key1, key2]' or images with "
            "--set 'images=[a.png, s3://bucket/b.jpg]'"
        )
    if config.top < 1:
        raise ValueError(f"top must be >= 1, got {config.top}")
    index = Index(config.index)
    queries = stack(key_queries(index, config.keys), image_queries(index, config))
    candidates = max(config.top, config.refine_candidates) if config.refine else config.top
    find = finder(index, config, candidates)
    refined = refined_queries(index, queries, config) if config.refine else None
    tables = []
    for direction in ("proponent", "opponent"):
        found = find(queries.vectors, direction == "opponent")
        if refined is None:
            tables.append(hits_table(index, queries, direction, found))
        else:
            tables.append(refined_hits(refined, queries, direction, found, config))
    results = pa.concat_tables(tables)
    print_results(results, queries.names)
    hint_refine(index, config)
    if config.save:
        print(f"kept for `report`: {index.write_table(RESULTS, results)}")
    if config.out:
        write_results(results, config.out)
    return results


# -- query vectors ---------------------------------------------------------------------------


def key_queries(index: Index, keys: list[str]) -> Queries:
    if not keys:
        return Queries([], [], np.empty((0, index.dimension), np.float32))
    table = index.table(["key"])
    rows = rows_of(table, keys)
    vectors = index.vectors(index.take(rows, ["w"]))
    return Queries(list(keys), [""] * len(keys), vectors, rows.tolist(), [None] * len(keys))


def rows_of(table: pa.Table, keys: list[str]) -> np.ndarray:
    """Row of each key; an unknown key is a clear error naming it."""
    position = {key: row for row, key in enumerate(table.column("key").to_pylist())}
    missing = [key for key in keys if key not in position]
    if missing:
        raise KeyError(f"key(s) not in the index: {missing[:10]}")
    return np.array([position[key] for key in keys], dtype=np.int64)


def image_queries(index: Index, config: QueryConfig) -> Queries:
    if not config.images:
        return Queries([], [], np.empty((0, index.dimension), np.float32))
    engine, pipeline_config = engine_for(index, config.model, config.projection, config.device)
    engine.use_views(query_views(config.views, pipeline_config))
    side = pipeline_config.input.side or pipeline_config.influence.augment.size
    channels = pipeline_config.influence.model.in_channels
    images = [
        load_query_image(uri, side, channels, pipeline_config.input.max_pixels)
        for uri in config.images
    ]
    names = [os.path.basename(str(uri).rstrip("/")) or str(uri) for uri in config.images]
    w = engine.embed(torch.stack(images), keys=names).numpy()
    return Queries(names, list(config.images), w, [-1] * len(images), images)


def query_views(views: int, config: PipelineConfig) -> int:
    """Views for query images: `views`, or 4x the index's V when 0."""
    return views if views > 0 else 4 * config.influence.loss.num_views


def engine_for(
    index: Index, model: dict | None = None, projection: dict | None = None, device: str = "cpu"
) -> tuple[InfluenceSSL, PipelineConfig]:
    """The engine that produced the index, with its factors; refuses other settings.

    `model` and `projection` override the manifest's settings (say, a checkpoint that moved);
    whatever changes w (another checkpoint, another projection) is refused by the same
    fingerprint check `build` uses.
    """
    from pipeline.runtime.worker import build_model  # torch model code, only for image queries

    stored = index.manifest["config"]
    influence = stored["influence"]
    config = from_dict(
        PipelineConfig,
        {
            **stored,
            "influence": {
                **influence,
                "model": {**influence["model"], **(model or {})},
                "projection": {**influence["projection"], **(projection or {})},
                "device": device,
            },
        },
    )
    encoder = build_model(config.influence.model)
    engine = InfluenceSSL(encoder, config.influence)
    identity = model_identity(encoder, config.influence.model, open_uri=read_uri)
    layers = [layer.describe() for layer in engine.tracker.layers]
    check_compatible(index.manifest, fingerprint(config, identity, layers), "query this index")
    engine.load_factors_bytes(index.storage.read_bytes(FACTORS), index.storage.url(FACTORS))
    return engine, config


def load_query_image(uri: str, side: int, channels: int, max_pixels: int) -> torch.Tensor:
    try:
        data = read_uri(uri)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as error:
        raise FileNotFoundError(f"query image {uri!r} cannot be read: {error}") from error
    try:
        return decode_image(data, side, channels, max_pixels)
    except ImageError as error:
        raise ValueError(f"query image {uri!r} is not a usable image: {error}") from error


def stack(*parts: Queries) -> Queries:
    return Queries(
        [n for p in parts for n in p.names],
        [s for p in parts for s in p.sources],
        np.concatenate([p.vectors for p in parts]).astype(np.float32),
        [r for p in parts for r in p.rows],
        [i for p in parts for i in p.images],
    )


# -- search ----------------------------------------------------------------------------------


def finder(index: Index, config: QueryConfig, top: int) -> Callable[[np.ndarray, bool], tuple]:
    """`find(vectors, opponents) -> (scores, global rows)` of the top-k per query: the stored
    search index when its metric matches the ranking asked for (its shards loaded once for
    both directions), else an exact scan of the parts."""
    stored = read_search_manifest(index)
    metric = "cosine" if config.normalized else "inner_product"
    if stored is not None and stored["metric"] == metric:
        store = SearchStore(index, stored)
        return lambda vectors, opponents: store.search(vectors, top, opponents=opponents)
    return lambda vectors, opponents: brute_force_top_k(
        index, vectors, top, config.normalized, opponents
    )


# -- refinement ------------------------------------------------------------------------------


@dataclass
class RefinedQueries:
    refiner: Refiner
    vectors: np.ndarray  # [Q, D] the queries' w with `refine` views


def refined_queries(index: Index, queries: Queries, config: QueryConfig) -> RefinedQueries:
    """The queries' own w with `refine` views: keys read back from their shards, images
    re-embedded."""
    refiner = Refiner(index, config.refine, config.device, config.model, config.projection)
    vectors = queries.vectors.copy()
    keyed = [i for i, row in enumerate(queries.rows) if row >= 0]
    if keyed:
        vectors[keyed] = refiner.rows(np.array([queries.rows[i] for i in keyed]))[0]
    pictured = [i for i, image in enumerate(queries.images) if image is not None]
    if pictured:
        images = torch.stack([queries.images[i] for i in pictured])
        vectors[pictured] = refiner.embed_images(images, [queries.names[i] for i in pictured])
    return RefinedQueries(refiner, vectors)


def refined_hits(
    refined: RefinedQueries,
    queries: Queries,
    direction: str,
    found: tuple[np.ndarray, np.ndarray],
    config: QueryConfig,
) -> pa.Table:
    """The candidates re-embedded with `refine` views, re-ranked, cut to `top`."""
    _, candidates = found
    flat = candidates.reshape(-1)
    vectors = np.zeros((len(flat), queries.vectors.shape[1]), np.float32)
    ok = flat >= 0
    if ok.any():
        vectors[ok] = refined.refiner.rows(flat[ok])[0]
    vectors = vectors.reshape(*candidates.shape, -1)
    scores, rows = rerank(
        refined.vectors,
        candidates,
        vectors,
        config.top,
        config.normalized,
        direction == "opponent",
    )
    return hits_table(
        refined.refiner.index,
        dataclasses.replace(queries, vectors=refined.vectors),
        direction,
        (scores, rows),
        refined.refiner,
    )


def hits_table(
    index: Index,
    queries: Queries,
    direction: str,
    found: tuple[np.ndarray, np.ndarray],
    refiner: Refiner | None = None,
) -> pa.Table:
    """One row per (query, rank) with raw and normalised influence (from refined w when a
    refiner is given, else the stored w)."""
    _, rows = found
    q_of_hit = np.repeat(np.arange(len(queries.names)), rows.shape[1])
    rank = np.tile(np.arange(rows.shape[1]), len(queries.names))
    keep = rows.reshape(-1) >= 0
    rows, q_of_hit, rank = rows.reshape(-1)[keep], q_of_hit[keep], rank[keep]
    hits = index.take(rows, ["key", "shard", "w"])
    q = queries.vectors[q_of_hit]
    if refiner is None:
        w, refined = index.vectors(hits), np.zeros(len(rows), dtype=bool)
    else:
        w, refined = refiner.rows(rows)
    influence = np.einsum("nd,nd->n", q, w)
    norms = np.linalg.norm(q, axis=1) * np.linalg.norm(w, axis=1)
    return pa.table(
        {
            "query": pa.array([queries.names[i] for i in q_of_hit], pa.string()),
            "query_source": pa.array([queries.sources[i] for i in q_of_hit], pa.string()),
            "direction": pa.array([direction] * len(rows), pa.string()),
            "rank": pa.array(rank, pa.int32()),
            "key": hits.column("key"),
            "shard": hits.column("shard"),
            "influence": pa.array(influence.astype(np.float32)),
            "normalized_influence": pa.array(
                (influence / np.maximum(norms, 1e-30)).astype(np.float32)
            ),
            "refined": pa.array(refined, pa.bool_()),
        }
    )


# -- output ----------------------------------------------------------------------------------


def hint_refine(index: Index, config: QueryConfig) -> None:
    """Say so when the index's own w is below the reliability target and nothing was refined."""
    figures = index.manifest.get("reliability") or {}
    if (
        config.refine
        or "median_cos" not in figures
        or "median_cos" not in figures.get("below_targets", [])
    ):
        return
    print(
        f"\nnote: this index's w reproduces only partly across view draws (median cos "
        f"{figures['median_cos']:.2f} at V = {figures['views']}); --set refine=128 re-ranks "
        "the candidates with w of 128 views (their images read back from the shards)"
    )


def print_results(results: pa.Table, names: list[str]) -> None:
    rows = results.to_pylist()
    for name in dict.fromkeys(names):
        print(f"\nquery {name}:")
        for direction in ("proponent", "opponent"):
            print(f"  top {direction}s:  {'influence':>12}  {'cosine':>8}  key")
            for row in rows:
                if row["query"] == name and row["direction"] == direction:
                    scores = f"{row['influence']:>12.5g}  {row['normalized_influence']:>8.4f}"
                    print(f"  {row['rank']:>14}  {scores}  {row['key']}")


def write_results(results: pa.Table, out: str) -> None:
    suffix = Path(out).suffix.lower()
    if suffix == ".parquet":
        pq.write_table(results, out)
    elif suffix == ".csv":
        pacsv.write_csv(results, out)
    elif suffix == ".json":
        Path(out).write_text(json.dumps(results.to_pylist(), indent=2))
    else:
        raise ValueError(f"--set out=... must end in .parquet, .csv or .json, not {out!r}")
    print(f"written: {out}")
