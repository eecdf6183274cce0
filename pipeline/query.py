"""`query`: top-k proponents and opponents of query examples, offline, from an index.

A query is a key already in the index (its stored w) or an image (a local file or an object
URI), whose w is computed here with the manifest's model, views, projection and factors; a
model or projection that differs from the manifest's is refused, naming each difference.
Influence is <w_q, w_t>; retrieval ranks by normalised influence (cosine) by default and
reports both. The stored search index is used when its metric matches the ranking asked for;
otherwise an exact scan over the parts, one part at a time.

Keys are found through the key lookup `build` writes (`keys/`, pipeline/index/keys.py), reading
a few small objects whatever the index's size; `keys_file` adds a text file of keys. A key's
own row (cos 1 with itself) is left out of its results unless `include_self`; an unknown key
is refused with the closest keys found near it. Many images (`images_from`: a list file or a
folder) are embedded in batches of `image_batch`: on Ray workers (the pool `build` uses) when a
cluster is asked for (`runtime.address`, $RAY_ADDRESS as in a Ray job, or `runtime.num_workers`
> 0), else in this process; both run `embed_image_files` on each batch.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch

from pipeline.config import PipelineConfig, RuntimeConfig, SettingError, from_dict
from pipeline.data import ImageError, decode_image
from pipeline.errors import UserError
from pipeline.index.columnar import open_parquet
from pipeline.index.keys import (
    bucket_of,
    bucket_path,
    is_current,
    lookup_rows,
    lookup_stored,
    read_key_manifest,
    scan_parts,
)
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
from pipeline.storage import list_uri, read_uri, split_uri

RESULTS = f"{QUERY_DIR}/results.parquet"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LIST_SUFFIXES = (".txt", ".lst", ".list")
SEARCH_CHUNK = 1024  # queries searched at once: bounds the [queries, part rows] score block
PRINTED_QUERIES = 20  # the rest are in the results table
SUGGESTED_KEYS = 3  # closest keys named for an unknown key
SUGGESTION_POOL = 50_000  # keys of the first part compared with an unknown one (difflib)


class UnknownKeyError(UserError, KeyError):
    """A query key that is not in the index."""

    def __str__(self) -> str:  # KeyError's own str() would quote the whole message
        return str(self.args[0])


class QueryImageError(UserError, ValueError):
    """A query image that cannot be decoded."""


@dataclass
class QueryConfig:
    index: str = "runs/index"  # the index URI (the `output` of fit/build)
    # Query examples already in the index: `keys=a,b`, `keys=a` or `keys='[a, b]'`.
    keys: list[str] = field(default_factory=list)
    # More keys: a text file (path or URI), one key a line; blank lines and `#` lines skipped.
    keys_file: str | None = None
    # A key's own row is its top proponent (cos 1): left out of its results unless true.
    include_self: bool = False
    images: list[str] = field(default_factory=list)  # query images: local paths or URIs
    # Many query images: a text file of paths/URIs (.txt/.lst/.list: one a line, blank lines
    # and `#` comments skipped), or a folder or s3:// prefix (every image file under it,
    # sorted by name). Added after `images`.
    images_from: str | None = None
    image_batch: int = 64  # images per embedding task
    # Ray for image queries: used when `address` is set, $RAY_ADDRESS is (a Ray job), or
    # `num_workers` > 0 (an embedded local Ray); otherwise everything runs in this process.
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
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


def run_query(config: QueryConfig) -> pa.Table:
    if not config.keys and not config.keys_file and not config.images and not config.images_from:
        raise SettingError(
            "no query: give keys with --set keys=key1,key2 (or keys_file=keys.txt), images "
            "with --set images=a.png,s3://bucket/b.jpg or --set images_from=list.txt"
        )
    if config.top < 1 or config.image_batch < 1:
        raise SettingError(f"top and image_batch must be >= 1: {config.top}, {config.image_batch}")
    index = Index(config.index)
    uris = image_uris(config)
    keys = query_keys(config)
    queries = stack(key_queries(index, keys), image_queries(index, config, uris))
    candidates = max(config.top, config.refine_candidates) if config.refine else config.top
    drop_self = not config.include_self and any(row >= 0 for row in queries.rows)
    find = finder(index, config, candidates + int(drop_self))  # one more: the key's own row
    refined = refined_queries(index, queries, config) if config.refine else None
    tables = []
    for direction in ("proponent", "opponent"):
        found = find_in_chunks(find, queries.vectors, direction == "opponent")
        if drop_self:
            found = without_self(found, queries.rows, candidates)
        if refined is None:
            tables.append(hits_table(index, queries, direction, found))
        else:
            tables.append(refined_hits(refined, queries, direction, found, config))
    results = pa.concat_tables(tables)
    print_results(results, queries.names)
    if drop_self:
        print("\n(each key's own row is left out of its results; include_self=true keeps it)")
    hint_refine(index, config)
    if config.save:
        print(f"kept for `report`: {index.write_table(RESULTS, results)}")
    if config.out:
        write_results(results, config.out)
    return results


# -- query vectors ---------------------------------------------------------------------------


def query_keys(config: QueryConfig) -> list[str]:
    """`keys`, then the lines of `keys_file`."""
    keys = [str(key) for key in config.keys]
    if not config.keys_file:
        return keys
    try:
        lines = read_uri(config.keys_file).decode("utf-8").splitlines()
    except (FileNotFoundError, IsADirectoryError) as error:
        raise SettingError(f"keys_file={config.keys_file!r} cannot be read: {error}") from error
    return keys + [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]


def key_queries(index: Index, keys: list[str]) -> Queries:
    """Stored w of keys in the index, found through the key lookup (UnknownKeyError naming
    any unknown key and the closest keys found)."""
    if not keys:
        return Queries([], [], np.empty((0, index.dimension), np.float32))
    try:
        rows = lookup_rows(index, keys)
    except KeyError as error:
        raise unknown_keys(index, keys) from error
    vectors = index.vectors(index.take(rows, ["w"]))
    return Queries(list(keys), [""] * len(keys), vectors, rows.tolist())


def unknown_keys(index: Index, keys: list[str]) -> UnknownKeyError:
    """The error for keys not in the index: which, and the keys closest to the first."""
    wanted = list(dict.fromkeys(keys))
    stored = read_key_manifest(index)
    current = is_current(stored, index)
    found = lookup_stored(index, stored, wanted) if current else scan_parts(index, wanted)
    missing = [key for key in wanted if key not in found]
    close = difflib.get_close_matches(
        missing[0], nearby_keys(index, missing[0], stored if current else None), SUGGESTED_KEYS
    )
    named = ", ".join(repr(key) for key in missing[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    closest = f"; closest to {missing[0]!r}: {', '.join(map(repr, close))}" if close else ""
    return UnknownKeyError(
        f"key(s) not in the index at {index.storage.uri}: {named}{more}{closest} "
        "(keys are the samples' __key__; `rank` lists them)"
    )


def nearby_keys(index: Index, key: str, stored: dict | None) -> list[str]:
    """Keys to compare an unknown key with, from a few small reads whatever N is: the keys
    beside it in its bucket of the key lookup (sorted: one row group), and the first
    part's first SUGGESTION_POOL keys."""
    pool: list[str] = []
    if stored is not None:
        path = bucket_path(stored["generation"], int(bucket_of([key], stored["buckets"])[0]))
        with open_parquet(index.storage, path) as file:
            group = nearest_group(file.metadata, key)
            if group is not None:
                pool += file.read_row_group(group, ["key"]).column("key").to_pylist()
    first = index.read_part(index.manifest["shards"][0]["part"], ["key"]).column("key")
    return pool + first.slice(0, SUGGESTION_POOL).to_pylist()


def nearest_group(metadata: pq.FileMetaData, key: str) -> int | None:
    """The row group of a sorted key bucket whose range holds `key`, or the one just after
    it (the last for a key past them all)."""
    groups = metadata.num_row_groups
    if not groups:
        return None
    column = metadata.schema.to_arrow_schema().get_field_index("key")
    for g in range(groups):
        stats = metadata.row_group(g).column(column).statistics
        if stats is None or not stats.has_min_max or key <= stats.max:
            return g
    return groups - 1


def image_uris(config: QueryConfig) -> list[str]:
    """`images`, then those `images_from` names: the lines of a list file, or the image
    files under a folder or prefix."""
    uris = [str(uri) for uri in config.images]
    source = config.images_from
    if not source:
        return uris
    if source.lower().endswith(LIST_SUFFIXES):
        try:
            lines = read_uri(source).decode("utf-8").splitlines()
        except FileNotFoundError as error:
            raise FileNotFoundError(f"images_from={source!r} cannot be read: {error}") from error
        return uris + [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]
    found = [u for u in list_uri(source.rstrip("/") + "/") if u.lower().endswith(IMAGE_SUFFIXES)]
    if not found:
        raise FileNotFoundError(
            f"images_from={source!r}: no image files ({', '.join(IMAGE_SUFFIXES)}) under it; "
            f"a list of URIs must end in {' or '.join(LIST_SUFFIXES)}"
        )
    return uris + found


def image_name(uri: str) -> str:
    return os.path.basename(str(uri).rstrip("/")) or str(uri)


def image_queries(index: Index, config: QueryConfig, uris: list[str]) -> Queries:
    """w of query images with the index's model and factors, batch by batch: on Ray workers
    when a cluster is asked for, else here. The settings are checked here first, either way."""
    if not uris:
        return Queries([], [], np.empty((0, index.dimension), np.float32))
    engine, pipeline_config = engine_for(index, config.model, config.projection, config.device)
    views = query_views(config.views, pipeline_config)
    step = config.image_batch
    batches = [uris[start : start + step] for start in range(0, len(uris), step)]
    if wants_ray(config.runtime):
        w = embed_on_workers(index, config, pipeline_config, batches, views)
    else:
        w = np.concatenate([embed_image_files(engine, pipeline_config, b, views) for b in batches])
    return Queries([image_name(u) for u in uris], list(uris), w, [-1] * len(uris))


def embed_image_files(
    engine: InfluenceSSL, config: PipelineConfig, uris: list[str], views: int
) -> np.ndarray:
    """w [len(uris), D] of the images at `uris`, decoded as `build` decodes, with `views`
    views: one batch's work, the same in this process and on a worker (no Ray here)."""
    side = config.input.side or config.influence.augment.size
    channels = config.influence.model.in_channels
    images = [load_query_image(u, side, channels, config.input.max_pixels) for u in uris]
    engine.use_views(views)
    return engine.embed(torch.stack(images), keys=[image_name(u) for u in uris]).numpy()


def wants_ray(runtime: RuntimeConfig) -> bool:
    return bool(runtime.address or os.environ.get("RAY_ADDRESS") or runtime.num_workers > 0)


def embed_on_workers(
    index: Index,
    config: QueryConfig,
    pipeline_config: PipelineConfig,
    batches: list[list[str]],
    views: int,
) -> np.ndarray:
    """The batches' w on Ray workers: the pool `build` uses (dynamic dispatch, retries, dead
    workers replaced), factors put into the object store once, one task per batch."""
    from pipeline.runtime.pool import Task, WorkerPool, connect  # Ray only on this path

    connect(config.runtime)
    pool = WorkerPool(
        dataclasses.replace(pipeline_config, output=config.index, runtime=config.runtime)
    )
    done: dict[int, np.ndarray] = {}
    tasks = [
        Task("embed_images", (batch, views), f"query images {batch[0]} ...", context=number)
        for number, batch in enumerate(batches)
    ]
    try:
        pool.broadcast("load_factors", index.storage.read_bytes(FACTORS))
        outcome = pool.run(tasks, lambda task, w: done.__setitem__(task.context, w))
    finally:
        pool.shutdown()
    if outcome.failures:
        failed = "; ".join(f"{task.label}: {error}" for task, error in outcome.failures[:5])
        raise RuntimeError(f"{len(outcome.failures)} image batch(es) failed: {failed}")
    return np.concatenate([done[number] for number in range(len(batches))]).astype(np.float32)


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
        raise QueryImageError(f"query image {uri!r} is not a usable image: {error}") from error


def stack(*parts: Queries) -> Queries:
    return Queries(
        [n for p in parts for n in p.names],
        [s for p in parts for s in p.sources],
        np.concatenate([p.vectors for p in parts]).astype(np.float32),
        [r for p in parts for r in p.rows],
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


def without_self(found: tuple[np.ndarray, np.ndarray], rows: list[int], k: int) -> tuple:
    """Each query's hits without its own row (keys; images have row -1), cut to k. Hits
    keep their order; a dropped one becomes a missing hit (row -1) at the end."""
    scores, hits = found
    own = np.asarray(rows, np.int64)[:, None]
    drop = (hits == own) & (own >= 0)
    order = np.argsort(drop, axis=1, kind="stable")[:, :k]
    hits = np.where(drop, -1, hits)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(hits, order, 1)


def find_in_chunks(find: Callable, vectors: np.ndarray, opponents: bool) -> tuple:
    """`find` over at most SEARCH_CHUNK queries at a time (many image queries)."""
    found = [
        find(vectors[start : start + SEARCH_CHUNK], opponents)
        for start in range(0, len(vectors), SEARCH_CHUNK)
    ]
    return np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])


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
    pictured = [i for i, row in enumerate(queries.rows) if row < 0]
    if pictured:  # read again: pixels are not kept for every query image
        sized = (refiner.side, refiner.channels, refiner.max_pixels)
        images = torch.stack([load_query_image(queries.sources[i], *sized) for i in pictured])
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


# Refined views suggested when an index's w is below target: on the demo model 256 views
# reproduce w at median cos 0.97 and a query's top-10 proponents at 0.91 across independent
# draws (128: 0.94 / 0.87; benchmarks/results/view_designs_refine_demo.md).
HINT_REFINE = 256


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
        f"{figures['median_cos']:.2f} at V = {figures['views']}); --set refine={HINT_REFINE} "
        f"re-ranks the candidates with w of {HINT_REFINE} views (their images read back from "
        "the shards)"
    )


def print_results(results: pa.Table, names: list[str]) -> None:
    """The hits of the first PRINTED_QUERIES queries (all are in the results table)."""
    shown = list(dict.fromkeys(names))[:PRINTED_QUERIES]
    picked = results.filter(pc.is_in(results.column("query"), pa.array(shown)))
    by_query: dict[tuple[str, str], list[dict]] = {}
    for row in picked.to_pylist():
        by_query.setdefault((row["query"], row["direction"]), []).append(row)
    for name in shown:
        print(f"\nquery {name}:")
        for direction in ("proponent", "opponent"):
            print(f"  top {direction}s:  {'influence':>12}  {'cosine':>8}  key")
            for row in by_query.get((name, direction), []):
                scores = f"{row['influence']:>12.5g}  {row['normalized_influence']:>8.4f}"
                print(f"  {row['rank']:>14}  {scores}  {row['key']}")
    hidden = len(dict.fromkeys(names)) - len(shown)
    if hidden:
        print(f"\n... and {hidden:,} more queries (in the results table)")


def write_results(results: pa.Table, out: str) -> None:
    """The results as .parquet, .csv or .json at a path or s3:// URI (through Storage)."""
    suffix = Path(out).suffix.lower()
    buffer = io.BytesIO()
    if suffix == ".parquet":
        pq.write_table(results, buffer)
    elif suffix == ".csv":
        pacsv.write_csv(results, buffer)
    elif suffix == ".json":
        buffer.write(json.dumps(results.to_pylist(), indent=2).encode())
    else:
        raise SettingError(f"--set out=... must end in .parquet, .csv or .json, not {out!r}")
    storage, name = split_uri(out)
    storage.write_bytes(name, buffer.getvalue())
    print(f"written: {storage.url(name)}")
