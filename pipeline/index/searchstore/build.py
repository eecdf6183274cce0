"""Building the search index: IVF-PQ trained once on sampled row groups, then shards of whole
parts built in parallel, each written as FAISS codes, float16 vector blocks, each row's
nearest lists and floor bounds."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from pipeline.config import SearchConfig, to_dict
from pipeline.index.columnar import read_row_groups, row_group_sizes
from pipeline.index.layout import SEARCH_DIR
from pipeline.index.parts import vectors as column_vectors
from pipeline.index.reader import Index
from pipeline.index.searchstore.layout import (
    BUILD_WORKERS,
    FORMAT,
    METRICS,
    STORED_MAX_M,
    STORED_PROBES,
    VECTOR_BLOCK_BYTES,
    MapFn,
    NpyBuffer,
    column_dimension,
    file_entry,
    files_of,
    is_current,
    manifest_path,
    parts_of,
    plan_shards,
    read_checked,
    read_search_manifest,
    resolve_kind,
)
from pipeline.index.searchstore.store import Trained
from pipeline.runtime.progress import Progress
from pipeline.search import (
    SearchIndex,
    default_m,
    default_nlist,
    l2_normalize,
    prepared,
    principal_map,
    reduced,
    second_moment,
    train_ivfpq,
)

log = logging.getLogger(__name__)

# -- build ------------------------------------------------------------------------------------


def build_search_index(
    index: Index,
    config: SearchConfig,
    column: str = "w",
    directory: str = SEARCH_DIR,
    map_fn: MapFn | None = None,
    progress: bool = True,
) -> dict | None:
    """Write `<directory>/` for the index's `column` (skipped when current or `kind: none`);
    returns its manifest. `map_fn(fn, items)` maps the shard builds (default: a thread pool
    of min(4, cpus) workers); build passes a Ray-backed one. `progress`: shards built, on
    stderr (pipeline.runtime.progress)."""
    if config.kind == "none":
        return None
    if config.metric not in METRICS:
        raise ValueError(f"search.metric must be one of {METRICS}, not {config.metric!r}")
    stored = read_search_manifest(index, directory)
    if is_current(stored, index, config, column):
        log.info("search index %s is current; not rebuilt", directory)
        return stored
    started = time.perf_counter()
    parts = parts_of(index)
    total = sum(p["rows"] for p in parts)
    if total == 0:
        raise ValueError(f"the index at {index.storage.uri} has no rows to search")
    kind = resolve_kind(config, total)
    dimension = column_dimension(index, column)
    generation = generation_of(parts, config, column)
    runs = plan_shards(parts, config.shard_rows)
    job = ShardJob(
        kind=kind,
        normalized=config.metric == "cosine",
        column=column,
        dimension=dimension,
        prefix=f"{directory}/{generation}",
        block_rows=max(1, VECTOR_BLOCK_BYTES // (2 * dimension)),
    )
    trained = None
    if kind == "ivfpq":
        trained = write_trained(index, parts, config, job, total)
        job = dataclasses.replace(job, trained=trained)
    items = shard_items(parts, runs)
    bar = Progress(f"search index ({directory})", len(items), enabled=progress)
    if map_fn is None:
        workers = build_workers(len(items))
        job = dataclasses.replace(job, threads=max(1, faiss.omp_get_max_threads() // workers))
    build = bar.counted(functools.partial(build_shard, index, job), lambda item, _: item["rows"])
    with bar:
        shards = list(map_fn(build, items) if map_fn else thread_map(build, items, workers))
    manifest = {
        "format": FORMAT,
        "kind": kind,
        "metric": config.metric,
        "column": column,
        "dimension": dimension,
        "rows": total,
        "trained": trained,
        "vector_block_rows": job.block_rows if kind == "ivfpq" else None,
        "shards": shards,
        "parts_covered": parts,
        "config": to_dict(config),
        "seconds": round(time.perf_counter() - started, 3),
    }
    index.storage.write_bytes(manifest_path(directory), json.dumps(manifest, indent=2).encode())
    remove_other_generations(index, manifest, directory)
    print(
        f"search index ({directory}): {kind} ({config.metric}) over {total:,} vectors of "
        f"{column} in {len(shards)} shard(s), {manifest['seconds']} s",
        flush=True,
    )
    return manifest


@dataclass(frozen=True)
class ShardJob:
    """What every shard build shares (small: it travels to Ray workers)."""

    kind: str
    normalized: bool
    column: str
    dimension: int
    prefix: str  # <directory>/<generation>
    block_rows: int
    trained: dict | None = None  # the trained file's manifest entry (IVF-PQ)
    threads: int = 0  # FAISS threads per shard build; 0: as the process has them


def generation_of(parts: list[dict], config: SearchConfig, column: str = "w") -> str:
    """A name prefix for one build of the search index: a rebuild writes new files and flips
    the manifest last, so a reader never pairs an old manifest with new shard files."""
    state = json.dumps([FORMAT, column, parts, to_dict(config)], sort_keys=True).encode()
    return hashlib.sha256(state).hexdigest()[:12]


def shard_items(parts: list[dict], runs: list[list[int]]) -> list[dict]:
    items, offset = [], 0
    for number, run in enumerate(runs):
        rows = sum(parts[i]["rows"] for i in run)
        paths = [parts[i]["part"] for i in run]
        items.append(
            {"number": number, "parts": run, "paths": paths, "offset": offset, "rows": rows}
        )
        offset += rows
    return items


def build_workers(items: int) -> int:
    return max(1, min(BUILD_WORKERS, os.cpu_count() or 1, items))


def thread_map(fn: Callable[[Any], Any], items: Sequence[Any], workers: int) -> list[Any]:
    """`map` on a thread pool (FAISS and pyarrow release the GIL), results in item order."""
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def remove_other_generations(index: Index, manifest: dict, directory: str = SEARCH_DIR) -> None:
    keep = {manifest_path(directory)} | set(files_of(manifest))
    listed = index.storage.list(f"{directory}/")
    index.storage.delete_many(n for n in listed if n not in keep)


def write_trained(
    index: Index, parts: list[dict], config: SearchConfig, job: ShardJob, total: int
) -> dict:
    """Train IVF-PQ on a sample of whole row groups, write `<gen>-trained.faiss`; its entry."""
    sample = sample_row_groups(index, parts, job.column, config.train_rows, config.seed)
    transform = None
    if 0 < config.reduce_dim < job.dimension:
        transform = principal_map(second_moment(sample, job.normalized), config.reduce_dim)
    x = reduced(sample, job.normalized, transform)
    del sample
    nlist = config.nlist or default_nlist(total)
    nlist = min(nlist, max(1, len(x) // 39))  # FAISS wants >= 39 training points per list
    ivf = train_ivfpq(x, nlist, config.m or default_m(x.shape[1], STORED_MAX_M), config.seed)
    # The pre-transform does not own its parts (Python does) and is only serialised here.
    stored = faiss.IndexPreTransform(transform, ivf) if transform is not None else ivf
    data = memoryview(faiss.serialize_index(stored))
    name = f"{job.prefix}-trained.faiss"
    index.storage.write_bytes(name, data)
    return {
        **file_entry(name, data),
        "train_rows": len(x),
        "nlist": int(ivf.nlist),
        "m": int(ivf.pq.M),
        "reduced_dimension": int(ivf.d),
    }


def sample_row_groups(
    index: Index, parts: list[dict], column: str, train_rows: int, seed: int
) -> np.ndarray:
    """At most `train_rows` rows of `column` (as stored): whole row groups drawn (seeded) one
    per part in a shuffled part order, round after round, reading only the footers of the
    parts visited and the chosen groups' chunks. Every row when the index has no more."""
    storage = index.storage
    rng = np.random.default_rng(seed)
    sizes: dict[int, list[int]] = {}
    chosen: dict[int, list[int]] = {}
    taken, order = 0, rng.permutation(len(parts))
    while taken < train_rows:
        before = taken
        for number in order:
            if number not in sizes:
                sizes[number] = row_group_sizes(storage, parts[number]["part"])
            free = sorted(set(range(len(sizes[number]))) - set(chosen.get(number, [])))
            if free:
                group = free[int(rng.integers(len(free)))]
                chosen.setdefault(number, []).append(group)
                taken += sizes[number][group]
            if taken >= train_rows:
                break
        if taken == before:
            break  # every group taken
    pieces = []
    for number in sorted(chosen):
        groups = sorted(chosen[number])
        table = read_row_groups(storage, parts[number]["part"], groups, [column])
        pieces.append(column_vectors(table, column))
    sample = np.concatenate(pieces)
    if len(sample) > train_rows:  # the last group overshot
        sample = sample[np.sort(rng.choice(len(sample), size=train_rows, replace=False))]
    return sample


def build_shard(index: Index, job: ShardJob, item: dict) -> dict:
    """Build one search shard from its run of parts and write its files; its manifest entry."""
    if job.threads:
        faiss.omp_set_num_threads(job.threads)
    name = f"{job.prefix}-shard-{item['number']:05d}"
    if job.kind == "flat":
        vectors = np.concatenate([read_part_vectors(index, job, p) for p in item["paths"]])
        data = memoryview(
            SearchIndex.build(vectors, kind="flat", normalized=job.normalized).to_bytes()
        )
        entry = file_entry(f"{name}.faiss", data)
        index.storage.write_bytes(entry["file"], data)
        return {**entry, **shard_fields(item)}
    trained = Trained.from_bytes(read_checked(index.storage, job.trained))
    shard = faiss.clone_index(trained.ivf)  # owns its quantiser copy, needed to encode
    blocks = VectorBlocks(index.storage, f"{name}-vectors", job.block_rows, job.dimension)
    # Memory per shard build: its codes, its lists and one vector block, each held once
    # (the files are written from them in place).
    lists = NpyBuffer((item["rows"], min(STORED_PROBES, shard.nlist)), np.int32)
    bounds = NpyBuffer((item["rows"], 2), np.float32) if job.normalized else None
    added = 0
    for path in item["paths"]:  # one part at a time
        vectors = read_part_vectors(index, job, path)
        if added + len(vectors) > item["rows"]:
            raise ValueError(f"search shard {name}: its parts hold more than {item['rows']} rows")
        span = slice(added, added + len(vectors))
        x = prepared(vectors, job.normalized)
        stored = x.astype(np.float16)
        blocks.add(stored)
        small = np.ascontiguousarray(trained.reduce(x), np.float32)
        codes = add_assigned(shard, small, lists.array[span])
        if bounds is not None:  # against the rows as their codes reconstruct them
            reconstructed = shard.sa_decode(codes)
            bounds.array[span] = floor_bounds(x, stored, small, reconstructed, trained.transform)
        added += len(vectors)
    blocks.close()
    if shard.ntotal != item["rows"]:
        raise ValueError(f"search shard {name}: {shard.ntotal} vectors, parts say {item['rows']}")
    shard.quantizer.reset()  # the file keeps codes and ids only: the quantiser lives once
    data = faiss.serialize_index(shard)
    del shard
    entry = file_entry(f"{name}.faiss", memoryview(data))
    index.storage.write_bytes(entry["file"], memoryview(data))
    del data
    extra = {"lists": write_npy(index.storage, f"{name}-lists.npy", lists)}
    if bounds is not None:
        extra["bounds"] = write_npy(index.storage, f"{name}-bounds.npy", bounds)
        extra["bounds"]["max"] = bounds.array.max(axis=0).tolist() if added else [0.0, 0.0]
    return {**entry, **shard_fields(item), "vectors": blocks.entries, **extra}


def write_npy(storage, name: str, buffer: NpyBuffer) -> dict:
    data = buffer.file()
    storage.write_bytes(name, data)
    return file_entry(name, data)


def add_assigned(shard: faiss.IndexIVFPQ, x: np.ndarray, lists: np.ndarray) -> np.ndarray:
    """Add rows `x` (reduced) to `shard` in their nearest list; fills `lists` (int32
    [n, probes]) with each row's nearest lists, best first, from the same search. Returns
    their codes (list number and PQ code, `sa_decode` reconstructs the rows)."""
    _, nearest = shard.quantizer.search(x, lists.shape[1])
    lists[:] = nearest
    first = np.ascontiguousarray(nearest[:, 0], np.int64)
    codes = np.empty((len(x), shard.sa_code_size()), np.uint8)
    shard.encode_vectors(
        len(x), faiss.swig_ptr(x), faiss.swig_ptr(first), faiss.swig_ptr(codes), True
    )
    shard.add_sa_codes(codes)
    return codes


def floor_bounds(
    x: np.ndarray,
    stored: np.ndarray,
    small: np.ndarray,
    reconstructed: np.ndarray,
    transform: faiss.LinearTransform | None,
) -> np.ndarray:
    """Per row (unit `x`, its float16 copy `stored` that re-ranking scores, `small` = P x,
    and its PQ reconstruction), float32 [n, 2]: bounds on the residual norm |y - P^T P y|
    and on |P y - reconstruction|, for y the unit `stored` row. With them a candidate's
    cosine with a unit query q is at most
        PQ score + |q_s| * bound[1] + |r_q| * bound[0]    (`above_floor`),
    each term by Cauchy-Schwarz, since |P y - P x| <= |y - x| = delta."""
    delta = np.linalg.norm(l2_normalize(stored) - x, axis=1)
    residual = np.zeros(len(x), np.float32)
    if transform is not None:
        residual = np.sqrt(np.clip(1.0 - np.einsum("nd,nd->n", small, small), 0.0, None))
    error = np.linalg.norm(small - reconstructed, axis=1)
    return np.stack([residual + delta, error + delta], axis=1).astype(np.float32)


def shard_fields(item: dict) -> dict:
    return {"parts": item["parts"], "offset": item["offset"], "rows": item["rows"]}


def read_part_vectors(index: Index, job: ShardJob, path: str) -> np.ndarray:
    """One part's `column` as stored (float16 or float32), [rows, D]."""
    vectors = column_vectors(index.read_part(path, [job.column]), job.column)
    if vectors.shape[1] != job.dimension:
        raise ValueError(f"{path}: {job.column} has D={vectors.shape[1]}, not {job.dimension}")
    if not np.isfinite(vectors).all():
        raise ValueError(f"{path}: {job.column} holds NaN or infinite values")
    return vectors


class VectorBlocks:
    """A shard's float16 vectors written as .npy blocks of `rows` rows (the last one fewer):
    a builder holds one block, and a reader maps a row to block `row // rows`."""

    def __init__(self, storage, prefix: str, rows: int, dimension: int) -> None:
        self.storage, self.prefix, self.rows = storage, prefix, rows
        self.buffer: NpyBuffer | None = NpyBuffer((rows, dimension), np.float16)
        self.filled = 0
        self.entries: list[dict] = []

    def add(self, vectors: np.ndarray) -> None:
        assert self.buffer is not None, "closed"
        done = 0
        while done < len(vectors):
            take = min(self.rows - self.filled, len(vectors) - done)
            self.buffer.array[self.filled : self.filled + take] = vectors[done : done + take]
            self.filled += take
            done += take
            if self.filled == self.rows:
                self.flush()

    def close(self) -> None:
        if self.filled:
            self.flush()
        self.buffer = None

    def flush(self) -> None:
        assert self.buffer is not None, "closed"
        data = self.buffer.file(self.filled)
        name = f"{self.prefix}-{len(self.entries):05d}.npy"
        self.storage.write_bytes(name, data)
        self.entries.append({**file_entry(name, data), "rows": self.filled})
        self.filled = 0
