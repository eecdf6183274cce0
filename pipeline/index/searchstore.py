"""The stored search index: FAISS shards over the parts' `w`, beside the parts.

Layout under the index URI::

    search/manifest.json              kind, metric, D, N, the parts it covers (with sha256)
    search/<gen>-shard-00000.faiss    a `pipeline.search.SearchIndex` over a run of parts
    search/<gen>-shard-00000.npy      (IVF-PQ only) the shard's vectors in float16, to re-rank

`<gen>` names one build (a hash of the parts and settings): a rebuild writes new files, then
the manifest, then removes the previous build's files.

Rows are numbered 0..N-1 in the index's shard order (the order of `Index.table()`); a search
shard covers whole parts, at most `max_shard_bytes` of float32 vectors, so building or
searching never holds more than one shard's vectors. For IVF-PQ the coarse quantiser and the
codebooks are trained once, on a seeded sample drawn across all parts, and every shard is a
copy of that trained index: scores are comparable across shards, and the top-k of a query is
the merge of each shard's top-k, re-ranked with the shard's vectors. Those are a float16 .npy
file, memory-mapped (copied to a local cache first for s3://), so re-ranking touches only the
candidate rows; the influence reported for a hit is recomputed from the parts' `w`.

The search manifest records the parts it was built from; `build` rebuilds the search index
when they changed (a rerun that added shards) and leaves it alone otherwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import time
from pathlib import Path

import faiss
import numpy as np

from pipeline.config import SearchConfig, to_dict
from pipeline.index.layout import SEARCH_DIR
from pipeline.index.reader import Index
from pipeline.search import SearchIndex, default_m, default_nlist, l2_normalize

log = logging.getLogger(__name__)

SEARCH_MANIFEST = f"{SEARCH_DIR}/manifest.json"
FORMAT = "influence-ssl/search/1"
METRICS = ("cosine", "inner_product")


class StaleSearchIndexError(RuntimeError):
    """The stored search index does not cover the index's current parts."""


def parts_of(index: Index) -> list[dict]:
    """The parts of a built index, in row order: what a search index must cover."""
    return [
        {"part": s["part"], "rows": int(s["examples"]), "sha256": s["part_sha256"]}
        for s in index.manifest["shards"]
    ]


def plan_shards(parts: list[dict], dimension: int, max_shard_bytes: int) -> list[list[int]]:
    """Contiguous runs of part numbers, each at most `max_shard_bytes` of float32 (a single
    larger part forms its own shard)."""
    limit = max(1, max_shard_bytes // (4 * max(1, dimension)))
    runs: list[list[int]] = [[]]
    rows = 0
    for number, part in enumerate(parts):
        if runs[-1] and rows + part["rows"] > limit:
            runs.append([])
            rows = 0
        runs[-1].append(number)
        rows += part["rows"]
    return [run for run in runs if run]


def resolve_kind(config: SearchConfig, rows: int) -> str:
    if config.kind == "auto":
        return "flat" if rows <= config.flat_max_rows else "ivfpq"
    if config.kind not in ("flat", "ivfpq"):
        raise ValueError(f"search.kind must be auto, flat, ivfpq or none, not {config.kind!r}")
    return config.kind


def is_current(stored: dict | None, index: Index, config: SearchConfig) -> bool:
    """True when the stored search manifest covers exactly the current parts, as configured."""
    return (
        stored is not None
        and stored["parts_covered"] == parts_of(index)
        and stored["config"] == to_dict(config)
    )


def read_search_manifest(index: Index) -> dict | None:
    try:
        manifest = json.loads(index.storage.read_bytes(SEARCH_MANIFEST))
    except FileNotFoundError:
        return None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{index.storage.url(SEARCH_MANIFEST)} is not a search manifest")
    return manifest


def build_search_index(index: Index, config: SearchConfig) -> dict | None:
    """Write `search/` for the index (skipped when current or `kind: none`); its manifest."""
    if config.kind == "none":
        return None
    if config.metric not in METRICS:
        raise ValueError(f"search.metric must be one of {METRICS}, not {config.metric!r}")
    stored = read_search_manifest(index)
    if is_current(stored, index, config):
        log.info("search index is current; not rebuilt")
        return stored
    started = time.perf_counter()
    parts = parts_of(index)
    total = sum(p["rows"] for p in parts)
    if total == 0:
        raise ValueError(f"the index at {index.storage.uri} has no rows to search")
    kind = resolve_kind(config, total)
    normalized = config.metric == "cosine"
    runs = plan_shards(parts, index.dimension, config.max_shard_bytes)
    trained = train_ivfpq(index, parts, config, total) if kind == "ivfpq" else None
    generation = generation_of(parts, config)
    shards, offset = [], 0
    for number, run in enumerate(runs):
        vectors = read_vectors(index, [parts[i]["part"] for i in run])
        search = shard_index(vectors, kind, normalized, trained)
        name = f"{SEARCH_DIR}/{generation}-shard-{number:05d}"
        index.storage.write_bytes(f"{name}.faiss", search.to_bytes().tobytes())
        entry = {"file": f"{name}.faiss", "parts": run, "offset": offset, "rows": len(vectors)}
        if kind == "ivfpq":
            data = npy_bytes(vectors.astype(np.float16))
            entry["vectors"] = f"{name}.npy"
            entry["vectors_sha256"] = hashlib.sha256(data).hexdigest()
            index.storage.write_bytes(entry["vectors"], data)
        shards.append(entry)
        offset += len(vectors)
    manifest = {
        "format": FORMAT,
        "kind": kind,
        "metric": config.metric,
        "dimension": index.dimension,
        "rows": total,
        "shards": shards,
        "parts_covered": parts,
        "config": to_dict(config),
        "seconds": round(time.perf_counter() - started, 3),
    }
    index.storage.write_bytes(SEARCH_MANIFEST, json.dumps(manifest, indent=2).encode())
    remove_other_generations(index, manifest)
    print(
        f"search index: {kind} ({config.metric}) over {total:,} vectors in {len(shards)} "
        f"shard(s), {manifest['seconds']} s",
        flush=True,
    )
    return manifest


def generation_of(parts: list[dict], config: SearchConfig) -> str:
    """A name prefix for one build of the search index: a rebuild writes new files and flips
    the manifest last, so a reader never pairs an old manifest with new shard files."""
    state = json.dumps([parts, to_dict(config)], sort_keys=True).encode()
    return hashlib.sha256(state).hexdigest()[:12]


def remove_other_generations(index: Index, manifest: dict) -> None:
    keep = {SEARCH_MANIFEST} | {
        name for shard in manifest["shards"] for name in (shard["file"], shard.get("vectors"))
    }
    index.storage.delete_many(n for n in index.storage.list(f"{SEARCH_DIR}/") if n not in keep)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def read_vectors(index: Index, part_paths: list[str]) -> np.ndarray:
    tables = [index.read_part(path, ["w"]) for path in part_paths]
    return np.concatenate([index.vectors(t) for t in tables]) if tables else np.empty((0, 0))


def shard_index(
    vectors: np.ndarray, kind: str, normalized: bool, trained: bytes | None
) -> SearchIndex:
    if kind == "flat":
        return SearchIndex.build(vectors, kind="flat", normalized=normalized)
    empty = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    x = l2_normalize(vectors) if normalized else np.ascontiguousarray(vectors, np.float32)
    empty.add(x)
    return SearchIndex(empty, "ivfpq", normalized, len(x), x.shape[1])


def train_ivfpq(index: Index, parts: list[dict], config: SearchConfig, total: int) -> bytes:
    """An empty IVF-PQ index trained on a seeded sample across all parts (serialized)."""
    rng = np.random.default_rng(config.seed)
    fraction = min(1.0, config.train_rows / total)
    sample = []
    for part in parts:  # one part at a time: memory bounded by the sample
        vectors = read_vectors(index, [part["part"]])
        take = rng.random(len(vectors)) < fraction
        sample.append(vectors[take])
    x = np.concatenate(sample)
    if config.metric == "cosine":
        x = l2_normalize(x)
    nlist = config.nlist or default_nlist(total)
    nlist = min(nlist, max(1, len(x) // 39))  # FAISS wants >= 39 training points per list
    reduced = config.reduce_dim if 0 < config.reduce_dim < x.shape[1] else x.shape[1]
    m = config.m or default_m(reduced)
    trained = SearchIndex.build(
        x, kind="ivfpq", nlist=nlist, m=m, seed=config.seed, reduce_dim=config.reduce_dim
    )
    trained.index.reset()  # keep the trained quantiser and codebooks, drop the sample
    return faiss.serialize_index(trained.index).tobytes()


class SearchStore:
    """Searches a stored search index shard by shard and merges the top-k."""

    def __init__(self, index: Index, manifest: dict | None = None) -> None:
        manifest = manifest if manifest is not None else read_search_manifest(index)
        if manifest is None:
            raise FileNotFoundError(
                f"no search index under {index.storage.uri}: run `build` (search.kind != none)"
            )
        if manifest["parts_covered"] != parts_of(index):
            raise StaleSearchIndexError(
                f"the search index under {index.storage.uri} was built from other parts than "
                "the index now has: rerun `build` to refresh it"
            )
        self.index = index
        self.manifest = manifest
        self.normalized = manifest["metric"] == "cosine"
        self.rows = int(manifest["rows"])
        # Loaded shards stay resident for the next query: a service answering many queries
        # pays the load once (`keep_loaded=False` frees each shard after its search).
        self.keep_loaded = True
        self.loaded: dict[str, tuple[SearchIndex, np.ndarray | None]] = {}

    def search(
        self, queries: np.ndarray, k: int, opponents: bool = False, nprobe: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k global rows by cosine (or inner product) per query, best first; `opponents`
        gives the most negative instead. Returns (scores [Q, k'], rows [Q, k'])."""
        queries = np.atleast_2d(np.asarray(queries, np.float32))
        found_scores, found_rows = [], []
        for shard in self.manifest["shards"]:
            search, exact = self.load(shard)
            find = search.search_opponents if opponents else search.search
            scores, rows = find(queries, k, exact_vectors=exact, nprobe=nprobe)
            found_scores.append(scores)
            found_rows.append(np.where(rows >= 0, rows + shard["offset"], -1))
        return merge_top_k(np.hstack(found_scores), np.hstack(found_rows), k, opponents)

    def load(self, shard: dict) -> tuple[SearchIndex, np.ndarray | None]:
        if shard["file"] in self.loaded:
            return self.loaded[shard["file"]]
        search = SearchIndex.from_bytes(self.index.storage.read_bytes(shard["file"]))
        loaded = (search, self.rerank_vectors(shard) if search.kind == "ivfpq" else None)
        if self.keep_loaded:
            self.loaded[shard["file"]] = loaded
        return loaded

    def rerank_vectors(self, shard: dict) -> np.ndarray:
        """The shard's float16 vectors, memory-mapped from a local file."""
        storage, name = self.index.storage, shard["vectors"]
        local = storage.local_path(name)
        if local is None:
            local = cache_path(shard["vectors_sha256"])
            if not local.exists():
                local.parent.mkdir(parents=True, exist_ok=True)
                partial = local.with_suffix(".partial")
                partial.write_bytes(storage.read_bytes(name))
                partial.replace(local)
        return np.load(local, mmap_mode="r", allow_pickle=False)


def cache_path(sha256: str) -> Path:
    """Where a remote shard's vectors are cached: named by their content hash, so a rebuilt
    search index never meets a stale copy ($INFLUENCE_SSL_CACHE, else ~/.cache)."""
    root = Path(os.environ.get("INFLUENCE_SSL_CACHE", Path.home() / ".cache" / "influence-ssl"))
    return root / "search" / f"{sha256}.npy"


def merge_top_k(
    scores: np.ndarray, rows: np.ndarray, k: int, ascending: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The best k of each query's candidates from all shards (missing ones, id -1, last)."""
    key = np.where(rows >= 0, scores if ascending else -scores, np.inf)
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def brute_force_top_k(
    index: Index, queries: np.ndarray, k: int, normalized: bool, opponents: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over every part, one part at a time (the reference, and the fallback when
    no stored search index matches the metric asked for)."""
    q = np.atleast_2d(np.asarray(queries, np.float32))
    q = l2_normalize(q) if normalized else q
    sign = -1.0 if opponents else 1.0
    best_scores = np.full((len(q), 0), np.inf, np.float32)
    best_rows = np.full((len(q), 0), -1, np.int64)
    offset = 0
    for part in parts_of(index):
        vectors = read_vectors(index, [part["part"]])
        x = l2_normalize(vectors) if normalized else vectors.astype(np.float32)
        scores = sign * (q @ x.T)
        rows = np.broadcast_to(np.arange(offset, offset + len(x)), scores.shape)
        best_scores, best_rows = merge_top_k(
            np.hstack([best_scores, scores]), np.hstack([best_rows, rows]), k, ascending=False
        )
        offset += len(x)
    return sign * best_scores, best_rows


def search_config_of(manifest: dict) -> SearchConfig:
    """The search settings an index was built with (defaults for older indices)."""
    stored = manifest.get("config", {}).get("index", {}).get("search", {})
    known = {f.name for f in dataclasses.fields(SearchConfig)}
    return SearchConfig(**{k: v for k, v in stored.items() if k in known})
