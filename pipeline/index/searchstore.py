"""The stored search index: FAISS shards over a vector column of the parts (`w`, or `z`).

Layout under the index URI (`directory` is `search` for `w`)::

    search/manifest.json                       kind, metric, column, D, N, the parts covered,
                                               every file with its sha256
    search/<gen>-trained.faiss                 (IVF-PQ) principal map + coarse quantiser + PQ
                                               codebooks, stored once
    search/<gen>-shard-00000.faiss             (IVF-PQ) an IndexIVFPQ holding only codes and
                                               ids (its quantiser is an empty IndexFlatIP);
                                               (flat) a `pipeline.search.SearchIndex`
    search/<gen>-shard-00000-vectors-00000.npy (IVF-PQ) the shard's vectors in float16 (unit
                                               vectors for cosine), in blocks of bounded bytes
    search/<gen>-shard-00000-lists.npy         (IVF-PQ) each row's STORED_PROBES nearest lists
                                               (int32, best first), for searches of the
                                               index's own rows (dedup)
    search/<gen>-shard-00000-bounds.npy        (IVF-PQ, cosine) each row's residual norm and PQ
                                               error (float32 [rows, 2], `floor_bounds`):
                                               searches with a floor skip candidates they
                                               prove below it

`<gen>` names one build (a hash of the parts and settings): a rebuild writes new files, then
the manifest, then removes the previous build's files, so readers never mix builds.

Rows are numbered 0..N-1 in the index's part order. A search shard is a contiguous run of
whole parts of about `shard_rows` vectors. IVF-PQ is trained once, on whole row groups sampled
(seeded) across the parts, in the space of the top `reduce_dim` principal directions; every
shard is encoded with that one quantiser and codebook, so scores compare across shards and
a query's top-k is the merge of each shard's re-ranked top-k. Shards are built in parallel
(`map_fn`, one shard's vector block at a time per worker).

Searching (`SearchStore`): the principal map and the coarse quantiser run once per query
batch (for the index's own rows, as dedup queries, their stored lists replace the quantiser);
every shard then scans the same lists, in parallel threads, its inverted lists memory-mapped
from the `.faiss` file (FAISS's own format, IO_FLAG_MMAP): FAISS's scan (`search_preassigned`)
for few queries a list, list by list for batches (`scan_by_list`: each list decoded once, one
matrix product with its queries). Each shard re-ranks its candidates exactly against its
float16 blocks: queries in the order of their nearest list, each distinct candidate of a step
read once with pread (not a memory map: see BlockReader), so resident memory does not grow
with the rows touched, and scored with FAISS's inner products by index.
On S3, files are first copied to a local cache named by their sha256 (`cache_path`); every
file is checked against the sha256 in the manifest before FAISS reads it (a download, or a
local file on first load).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from pipeline.config import SearchConfig, drop_ignored, to_dict
from pipeline.index.columnar import read_row_groups, read_schema, row_group_sizes
from pipeline.index.layout import SEARCH_DIR
from pipeline.index.parts import vectors as column_vectors
from pipeline.index.reader import Index
from pipeline.runtime.progress import Progress
from pipeline.search import (
    SearchIndex,
    default_m,
    default_nlist,
    inner_products_by_index,
    l2_normalize,
    prepared,
    principal_map,
    reduced,
    rerank,
    second_moment,
    to_float32,
    train_ivfpq,
)

log = logging.getLogger(__name__)

SEARCH_MANIFEST = f"{SEARCH_DIR}/manifest.json"
FORMAT = "influence-ssl/search/2"
OLD_FORMATS = ("influence-ssl/search/1",)  # read only to be found stale
METRICS = ("cosine", "inner_product")
# A float16 vector block per file: what one build worker holds (plus its shard's codes).
VECTOR_BLOCK_BYTES = 128 << 20
BUILD_WORKERS = 4
# PQ of 2 dimensions per sub-quantiser (128 bytes a vector on 256 principal directions), and
# candidates re-ranked per result and shard: recall@10 >= 0.95 at 10^6 vectors on clustered
# data whose neighbours differ by isotropic noise (benchmarks/search_latency.py; docs).
STORED_MAX_M = 128
CANDIDATES_PER_RESULT = 300
# Each row's nearest lists, stored per shard (`<shard>-lists.npy`): a search of the index's own
# rows (dedup) with nprobe up to this many reads them instead of searching the quantiser.
STORED_PROBES = 8

MapFn = Callable[[Callable[[Any], Any], Sequence[Any]], Iterable[Any]]


class StaleSearchIndexError(RuntimeError):
    """The stored search index does not cover the index's current parts (or is too old)."""


# -- what a search index covers ---------------------------------------------------------------


def manifest_path(directory: str = SEARCH_DIR) -> str:
    return f"{directory}/manifest.json"


def parts_of(index: Index) -> list[dict]:
    """The parts of a built index, in row order: what a search index must cover."""
    return [
        {"part": s["part"], "rows": int(s["examples"]), "sha256": s.get("part_sha256")}
        for s in index.manifest["shards"]
    ]


def plan_shards(parts: list[dict], shard_rows: int) -> list[list[int]]:
    """Contiguous runs of part numbers of about `shard_rows` vectors each: a run closes once it
    holds `shard_rows` (a larger part forms its own shard); the last run may be smaller."""
    if shard_rows < 1:
        raise ValueError(f"search.shard_rows must be >= 1, got {shard_rows}")
    runs: list[list[int]] = [[]]
    rows = 0
    for number, part in enumerate(parts):
        if runs[-1] and rows + part["rows"] > shard_rows:
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


def is_current(stored: dict | None, index: Index, config: SearchConfig, column: str = "w") -> bool:
    """True when the stored search manifest covers exactly the current parts, as configured."""
    return (
        stored is not None
        and stored.get("format") == FORMAT
        and stored.get("column") == column
        and stored["parts_covered"] == parts_of(index)
        and stored["config"] == to_dict(config)
    )


def read_search_manifest(index: Index, directory: str = SEARCH_DIR) -> dict | None:
    """The stored search manifest (None: none); an older format is returned as it is, for
    `build` to replace and `SearchStore` to refuse."""
    path = manifest_path(directory)
    try:
        manifest = json.loads(index.storage.read_bytes(path))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise ValueError(f"{index.storage.url(path)} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") not in (FORMAT, *OLD_FORMATS):
        raise ValueError(f"{index.storage.url(path)} is not a search manifest")
    return manifest


def check_current(index: Index, manifest: dict) -> None:
    """StaleSearchIndexError unless `manifest` is this version's and covers the current parts."""
    where = index.storage.uri
    if manifest.get("format") != FORMAT:
        raise StaleSearchIndexError(
            f"the search index under {where} has the old format {manifest.get('format')!r} "
            f"(this version reads {FORMAT!r}): rerun `build` to rebuild it"
        )
    if manifest["parts_covered"] != parts_of(index):
        raise StaleSearchIndexError(
            f"the search index under {where} was built from other parts than the index now "
            "has: rerun `build` to refresh it"
        )


def column_dimension(index: Index, column: str) -> int:
    """The vector width of `column` (a fixed-size list), from the first part's footer."""
    schema = read_schema(index.storage, index.manifest["shards"][0]["part"])
    if column not in schema.names:
        raise KeyError(f"the index's parts have no column {column!r} (they have {schema.names})")
    size = getattr(schema.field(column).type, "list_size", -1)
    if size is None or size < 1:
        raise ValueError(f"column {column!r} is not a fixed-size vector column")
    return int(size)


def search_config_of(manifest: dict) -> SearchConfig:
    """The search settings an index was built with (defaults for older indices; settings
    that no longer exist, like `max_shard_bytes`, are ignored with a FutureWarning)."""
    stored = manifest.get("config", {}).get("index", {}).get("search", {})
    stored = drop_ignored(SearchConfig, stored)
    known = {f.name for f in dataclasses.fields(SearchConfig)}
    return SearchConfig(**{k: v for k, v in stored.items() if k in known})


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


def files_of(manifest: dict) -> list[str]:
    """Every file a search manifest names."""
    files = [manifest["trained"]["file"]] if manifest.get("trained") else []
    for shard in manifest["shards"]:
        files.append(shard["file"])
        files += [block["file"] for block in shard.get("vectors") or []]
        files += [shard[name]["file"] for name in ("lists", "bounds") if shard.get(name)]
    return files


def file_entry(name: str, data: bytes | memoryview) -> dict:
    return {"file": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


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
        reconstructed = add_assigned(shard, small, lists.array[span])
        if bounds is not None:
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
    storage.write_bytes(name, buffer.file())
    return file_entry(name, buffer.file())


def add_assigned(shard: faiss.IndexIVFPQ, x: np.ndarray, lists: np.ndarray) -> np.ndarray:
    """Add rows `x` (reduced) to `shard` in their nearest list; fills `lists` (int32
    [n, probes]) with each row's nearest lists, best first, from the same search. Returns
    the rows as their codes reconstruct them (centroid + decoded residual) [n, d]."""
    _, nearest = shard.quantizer.search(x, lists.shape[1])
    lists[:] = nearest
    first = np.ascontiguousarray(nearest[:, 0], np.int64)
    codes = np.empty((len(x), shard.sa_code_size()), np.uint8)
    shard.encode_vectors(
        len(x), faiss.swig_ptr(x), faiss.swig_ptr(first), faiss.swig_ptr(codes), True
    )
    shard.add_sa_codes(codes)
    return shard.sa_decode(codes)


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


class NpyBuffer:
    """An .npy file laid out in one buffer, its header first, so that filling `array` fills
    the file and writing it copies nothing; `file(rows)` is the file of the first rows."""

    def __init__(self, shape: tuple[int, int], dtype: type) -> None:
        self.dtype = np.dtype(dtype)
        self.header = len(npy_header(shape, self.dtype))
        self.data = bytearray(self.header + shape[0] * shape[1] * self.dtype.itemsize)
        self.array = np.frombuffer(self.data, self.dtype, offset=self.header).reshape(shape)

    def file(self, rows: int | None = None) -> memoryview:
        rows = len(self.array) if rows is None else rows
        shape = (rows, self.array.shape[1])
        view = memoryview(self.data)
        view[: self.header] = npy_header(shape, self.dtype, self.header)
        return view[: self.header + rows * self.array.shape[1] * self.dtype.itemsize]


def npy_header(shape: tuple[int, ...], dtype: np.dtype, length: int | None = None) -> bytes:
    """An .npy (version 1.0) header for a C-ordered array: magic, length, the dict, padded
    with spaces to a multiple of 64 bytes, or to `length` (a shorter shape's header fits in
    a longer one's: numpy reads the dict whatever the padding)."""
    text = repr(
        {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    )
    prefix = 10  # magic (6), version (2), header length (2)
    total = length or -(-(prefix + len(text) + 1) // 64) * 64
    if prefix + len(text) + 1 > total:
        raise ValueError(f"an .npy header for {shape} does not fit in {total} bytes")
    padded = text + " " * (total - prefix - len(text) - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + (total - prefix).to_bytes(2, "little") + padded.encode("latin1")


# -- files: checked, cached ------------------------------------------------------------------


def cache_path(sha256: str, suffix: str = ".npy") -> Path:
    """Where a remote search file is cached: named by its content hash, so a rebuilt search
    index never meets a stale copy ($INFLUENCE_SSL_CACHE, else ~/.cache)."""
    root = Path(os.environ.get("INFLUENCE_SSL_CACHE", Path.home() / ".cache" / "influence-ssl"))
    return root / "search" / f"{sha256}{suffix}"


def read_checked(storage, entry: dict) -> bytes:
    """A (small) search file's bytes, checked against its manifest sha256."""
    data = storage.read_bytes(entry["file"])
    check_digest(storage.url(entry["file"]), hashlib.sha256(data).hexdigest(), entry)
    return data


def check_digest(where: str, digest: str, entry: dict) -> None:
    if digest != entry["sha256"]:
        raise ValueError(
            f"search file {where} is corrupt or was replaced: sha256 {digest[:12]}..., the "
            f"search manifest says {entry['sha256'][:12]}... (rerun `build` to rebuild it)"
        )


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


# Local files already hashed in this process, by path, inode, size, mtime and sha256: a store
# opened per batch (dedup) hashes a shard file once per process, a rewritten one again.
_VERIFIED: set[tuple[str, int, int, int, str]] = set()


def local_file(storage, entry: dict, verify: bool) -> str:
    """A local path of a search file, memory-mappable: the file itself (checked when `verify`,
    once per process) or, on S3, a checked copy in the content-addressed cache (streamed,
    hashed on the way)."""
    path = storage.local_path(entry["file"])
    if path is not None:
        if verify:
            stat = os.stat(path)
            key = (path, stat.st_ino, stat.st_size, stat.st_mtime_ns, entry["sha256"])
            if key not in _VERIFIED:
                check_digest(path, file_sha256(path), entry)
                _VERIFIED.add(key)
        return path
    target = cache_path(entry["sha256"], Path(entry["file"]).suffix)
    if target.exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{uuid.uuid4().hex}.partial")
    digest = hashlib.sha256()
    try:
        with storage.open_read(entry["file"]) as source, open(partial, "wb") as sink:
            while chunk := source.read(1 << 22):
                digest.update(chunk)
                sink.write(chunk)
        check_digest(storage.url(entry["file"]), digest.hexdigest(), entry)
        partial.replace(target)  # atomic: a concurrent reader sees the whole file or none
    finally:
        partial.unlink(missing_ok=True)
    return str(target)


@dataclass
class Trained:
    """The trained index of a build: principal map (or None), and the empty IVF-PQ whose
    quantiser every shard shares. `owner` keeps the FAISS objects alive."""

    owner: Any
    transform: faiss.LinearTransform | None
    ivf: faiss.IndexIVFPQ

    @classmethod
    def from_bytes(cls, data: bytes) -> Trained:
        try:
            owner = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError as e:
            raise ValueError(f"trained search index could not be read: {e}") from e
        transform = None
        if isinstance(owner, faiss.IndexPreTransform):
            transform = faiss.downcast_VectorTransform(owner.chain.at(0))
            ivf = faiss.downcast_index(owner.index)
        else:
            ivf = owner
        if not isinstance(ivf, faiss.IndexIVFPQ) or ivf.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f"trained search index is a {type(ivf).__name__}, not an IVF-PQ (IP)")
        return cls(owner, transform, ivf)

    def reduce(self, q: np.ndarray) -> np.ndarray:
        return q if self.transform is None else self.transform.apply(q)


class MappedShard:
    """A shard file memory-mapped (OnDiskInvertedLists over the file) and given the shared
    quantiser for its search; ValueError unless it was encoded with this build's codebooks.

    The shard keeps owning the empty quantiser it was read with and gets it back when this
    object goes, so FAISS frees that one and never the shared one (held via `trained`)."""

    def __init__(self, path: str, entry: dict, trained: Trained) -> None:
        try:
            shard = faiss.read_index(path, faiss.IO_FLAG_MMAP)
        except RuntimeError as e:
            raise ValueError(f"search shard {entry['file']} could not be read: {e}") from e
        check_shard(shard, entry, trained.ivf)
        self.trained = trained
        self.index: faiss.IndexIVFPQ = shard
        self.empty = shard.quantizer
        shard.quantizer = trained.ivf.quantizer

    def __del__(self) -> None:
        if getattr(self, "empty", None) is not None:
            self.index.quantizer = self.empty


def check_shard(shard: faiss.Index, entry: dict, ivf: faiss.IndexIVFPQ) -> None:
    name = entry["file"]
    if not isinstance(shard, faiss.IndexIVFPQ) or shard.nlist != ivf.nlist or shard.d != ivf.d:
        raise ValueError(f"search shard {name} is not an IVF-PQ of this build")
    if shard.ntotal != entry["rows"] or shard.quantizer.ntotal != 0:
        raise ValueError(
            f"search shard {name} holds {shard.ntotal} vectors and a quantiser of "
            f"{shard.quantizer.ntotal}; the manifest says {entry['rows']} and an empty one"
        )
    if not np.array_equal(
        faiss.vector_to_array(shard.pq.centroids), faiss.vector_to_array(ivf.pq.centroids)
    ):
        raise ValueError(f"search shard {name} was encoded with other PQ codebooks")


def default_nprobe(nlist: int) -> int:
    """Lists scanned per query: recall@10 >= 0.99 at 32 probes with 1,265 and 4,000 lists
    (benchmarks/search_latency.py); more lists get proportionally more."""
    return min(nlist, max(32, nlist // 32))


# -- search -----------------------------------------------------------------------------------


class SearchStore:
    """Searches a stored search index (all its shards, or the given shard numbers) and merges
    the top-k. Shards are searched in parallel threads (`threads`, default FAISS's OpenMP
    threads: OMP_NUM_THREADS=1 searches them one after another in the calling thread).
    `resident=False` reopens each shard's memory map per search instead of keeping it."""

    def __init__(
        self,
        index: Index,
        manifest: dict | None = None,
        directory: str = SEARCH_DIR,
        shards: Sequence[int] | None = None,
        threads: int | None = None,
        resident: bool = True,
        gpu: bool | None = None,
    ) -> None:
        manifest = manifest if manifest is not None else read_search_manifest(index, directory)
        if manifest is None:
            raise FileNotFoundError(
                f"no search index under {index.storage.url(directory)}: run `build` "
                "(search.kind != none)"
            )
        check_current(index, manifest)
        self.index, self.manifest, self.directory = index, manifest, directory
        self.kind = manifest["kind"]
        self.normalized = manifest["metric"] == "cosine"
        self.rows = int(manifest["rows"])
        self.dimension = int(manifest["dimension"])
        numbers = range(len(manifest["shards"])) if shards is None else list(shards)
        bad = [n for n in numbers if not 0 <= n < len(manifest["shards"])]
        if bad:
            raise IndexError(f"search shards {bad} out of range [0, {len(manifest['shards'])})")
        self.shards = [manifest["shards"][n] for n in numbers]
        self.threads = max(1, threads or faiss.omp_get_max_threads())
        self.resident = resident
        self.trained: Trained | None = None
        if self.kind == "ivfpq":
            self.trained = Trained.from_bytes(read_checked(index.storage, manifest["trained"]))
        self.nlist = int(self.trained.ivf.nlist) if self.trained else 0
        self._open: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        want_gpu = manifest["config"].get("gpu", True) if gpu is None else gpu
        self.gpu = GpuPlacement.start() if want_gpu else None

    # public

    def search(
        self,
        queries: np.ndarray,
        k: int,
        opponents: bool = False,
        nprobe: int | None = None,
        candidates: int | None = None,
        floor: float | None = None,
        rows: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k global rows by cosine (or inner product) per query, best first; `opponents`
        gives the most negative instead (ascending). IVF-PQ re-ranks `candidates` (default
        300 k) per shard exactly. Returns (scores [Q, k'], rows [Q, k']), k' = min(k, rows
        searched); missing results have row -1 (score -inf, +inf for opponents).

        `floor` (cosine indexes): only hits scoring >= floor are wanted, so candidates whose
        PQ score bounds their cosine below it are not re-ranked (`skip_below`); every hit >=
        floor among the top k is returned as without it, others may be missing.

        `rows`: the queries are these rows' own vectors (dedup): a row is left out of its own
        results (and not read to re-rank it), and IVF-PQ takes their nearest lists from the
        search index (stored by `build`) instead of searching the quantiser, for nprobe <=
        STORED_PROBES."""
        q = self.prepare(queries)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(int(k), sum(s["rows"] for s in self.shards))
        if opponents:
            q = -q
        own = None if rows is None else np.asarray(rows, np.int64)
        if own is not None and len(own) != len(q):
            raise ValueError(f"{len(own)} rows given for {len(q)} queries")
        searched = k + 1 if own is not None and self.kind == "flat" else k  # flat: drop it after
        plan = self.plan(q, nprobe, candidates, searched, None if opponents else own)
        if own is not None:
            plan["own"] = own
        if floor is not None and self.kind == "ivfpq" and self.normalized and not opponents:
            plan["floor"] = floor_terms(q, plan["small"], float(floor))
        found = self.map(functools.partial(self.search_shard, plan), self.shards)
        scores = np.hstack([f[0] for f in found]) if found else np.empty((len(q), 0), np.float32)
        rows = np.hstack([f[1] for f in found]) if found else np.empty((len(q), 0), np.int64)
        if own is not None:
            rows = np.where(rows == own[:, None], -1, rows)
        scores, rows = merge_top_k(scores, rows, k, ascending=False)
        return (-scores, rows) if opponents else (scores, rows)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self._open.clear()

    def __enter__(self) -> SearchStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # steps

    def prepare(self, queries: np.ndarray) -> np.ndarray:
        """Queries (any float dtype) as float32, unit rows for cosine (one pass)."""
        q = np.asarray(queries)
        q = q[None, :] if q.ndim == 1 else q
        if q.ndim != 2 or q.shape[1] != self.dimension:
            raise ValueError(
                f"queries must be [Q, {self.dimension}] (the search index's dimension), "
                f"got shape {q.shape}"
            )
        q = prepared(q, self.normalized)
        # A NaN or inf in a row leaves a NaN or inf here; unit rows sum to a finite number
        # unless they hold one (one pass, no [Q, D] temporary).
        if not np.isfinite(q.sum(axis=1) if self.normalized else q).all():
            raise ValueError("queries contain NaN or infinite values")
        return q

    def plan(
        self,
        q: np.ndarray,
        nprobe: int | None,
        candidates: int | None,
        k: int,
        rows: np.ndarray | None = None,
    ) -> dict:
        """What every shard's search shares: the queries, and for IVF-PQ their reduced form
        and coarse assignment (computed once here, not per shard; read for `rows`)."""
        plan = {"q": q, "k": k}
        if self.kind != "ivfpq":
            return plan
        if nprobe is not None and nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        if candidates is not None and candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        probes = min(self.nlist, nprobe or default_nprobe(self.nlist))
        small = np.ascontiguousarray(self.trained.reduce(q), np.float32)
        quantizer = self.trained.ivf.quantizer
        stored = None if rows is None else self.stored_lists(rows, probes)
        if stored is not None:
            coarse_i = stored
            coarse_d = inner_products_by_index(small, self.centroids(), stored)
        elif self.gpu is not None:
            coarse_d, coarse_i = self.gpu.search(quantizer, small, probes)
        else:
            coarse_d, coarse_i = quantizer.search(small, probes)
        plan.update(
            small=small,
            coarse_d=np.ascontiguousarray(coarse_d, np.float32),
            coarse_i=np.ascontiguousarray(coarse_i, np.int64),
            # Re-ranked in the order of their nearest list: queries of one list share many
            # candidates, read once a step (dedup's rows: a third of their pairs are read).
            order=np.argsort(coarse_i[:, 0], kind="stable"),
            nprobe=probes,
            candidates=max(candidates or CANDIDATES_PER_RESULT * k, k),
        )
        return plan

    def stored_lists(self, rows: np.ndarray, probes: int) -> np.ndarray | None:
        """The `probes` nearest lists of global `rows` as `build` stored them (int64
        [n, probes]), or None where it stored fewer (or none: an older search index)."""
        rows = np.asarray(rows, np.int64)
        every = self.manifest["shards"]  # a row's lists live with its shard, searched or not
        if any(s.get("lists") is None for s in every) or len(rows) == 0:
            return None
        out = np.empty((len(rows), probes), np.int64)
        for number, mine, local in self.by_shard(rows):
            entry = every[number]["lists"]
            path = local_file(self.index.storage, entry, verify=True)
            stored = np.load(path, mmap_mode="r", allow_pickle=False)
            if stored.shape != (every[number]["rows"], stored.shape[1]):
                raise ValueError(f"search lists {entry['file']} hold {stored.shape} rows")
            if stored.shape[1] < probes:
                return None
            lo, hi = int(local.min()), int(local.max()) + 1
            out[mine] = np.asarray(stored[lo:hi, :probes])[local - lo]  # a copy: map closed
            del stored
        return out

    def stored_vectors(self, rows: np.ndarray) -> np.ndarray | None:
        """float16 [n, D] copies of sorted global `rows` as the search index holds them (unit
        rows for cosine), read from its vector blocks: dedup's queries, without decoding
        their parts. None for a flat index (its vectors live inside FAISS)."""
        if self.kind != "ivfpq":
            return None
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.dimension), np.float16)
        for number, mine, local in self.by_shard(rows):
            with BlockReader(self, self.manifest["shards"][number]) as blocks:
                blocks.read(local, out=out[mine[0] : mine[-1] + 1])  # a run: `rows` are sorted
        return out

    def by_shard(self, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(shard number, positions in `rows`, rows local to that shard) for every shard of
        the whole index (not only those searched) holding some of the global `rows`."""
        every = self.manifest["shards"]
        offsets = np.array([s["offset"] for s in every] + [self.rows], np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.rows):
            raise IndexError(f"rows out of range [0, {self.rows})")
        which = np.searchsorted(offsets, rows, side="right") - 1
        for number in np.unique(which).tolist():
            mine = np.flatnonzero(which == number)
            yield number, mine, rows[mine] - offsets[number]

    def centroids(self) -> np.ndarray:
        """The coarse quantiser's centroids [nlist, d] (a view of FAISS's memory)."""
        flat = faiss.downcast_index(self.trained.ivf.quantizer)
        return faiss.rev_swig_ptr(flat.get_xb(), self.nlist * flat.d).reshape(self.nlist, flat.d)

    def map(self, fn: Callable[[dict], Any], shards: list[dict]) -> list[Any]:
        """`fn` over the shards: threads when there are several and threads to spare, with
        FAISS's OpenMP threads split between them (a GPU's flat shards: one at a time)."""
        workers = min(self.threads, len(shards))
        if workers <= 1 or (self.gpu is not None and self.kind == "flat"):
            return [fn(shard) for shard in shards]
        if self._pool is None:
            with self._lock:
                self._pool = self._pool or ThreadPoolExecutor(workers, "search-shard")
        per_shard = max(1, self.threads // workers)

        def run(shard: dict) -> Any:
            faiss.omp_set_num_threads(per_shard)  # this pool thread's OpenMP setting only
            return fn(shard)

        return list(self._pool.map(run, shards))

    def search_shard(self, plan: dict, shard: dict) -> tuple[np.ndarray, np.ndarray]:
        """One shard's best min(k, its rows), re-ranked, as global rows."""
        k = min(plan["k"], shard["rows"])
        if self.kind == "flat":
            search = self.load_flat(shard)
            scores, local = search.search(plan["q"], k)
        else:
            ivf = self.load_ivf(shard)
            c = min(plan["candidates"], shard["rows"])
            approx, ids = scan(ivf.index, plan, c)
            if "own" in plan:  # its own row: left out, never read
                ids = np.where(ids == (plan["own"] - shard["offset"])[:, None], -1, ids)
            if "floor" in plan:
                ids = above_floor(approx, ids, plan["floor"], shard, self.load_bounds)
            if not self.resident:
                del ivf
            with BlockReader(self, shard) as blocks:
                scores, local = rerank(
                    plan["q"], ids, blocks.fetch, k, self.normalized, plan["order"]
                )
        return scores, np.where(local >= 0, local + shard["offset"], -1)

    # shard files

    def load_flat(self, shard: dict) -> SearchIndex:
        key = shard["file"]
        if key not in self._open:
            data = read_checked(self.index.storage, shard)
            search = SearchIndex.from_bytes(data)
            if search.n != shard["rows"] or search.kind != "flat":
                raise ValueError(f"search shard {key} does not hold {shard['rows']} flat rows")
            if self.gpu is not None:
                search.index = self.gpu.place(search.index)
            with self._lock:
                self._open.setdefault(key, search)
        return self._open[key]

    def load_bounds(self, shard: dict) -> np.ndarray | None:
        """The shard's per-row floor bounds (`floor_bounds`), memory-mapped; None for a
        search index built before they were stored."""
        entry = shard.get("bounds")
        if entry is None:
            return None
        path = local_file(self.index.storage, entry, verify=True)
        bounds = np.load(path, mmap_mode="r", allow_pickle=False)
        if bounds.shape != (shard["rows"], 2) or bounds.dtype != np.float32:
            raise ValueError(f"search bounds {entry['file']} hold {bounds.dtype} {bounds.shape}")
        return bounds

    def load_ivf(self, shard: dict) -> MappedShard:
        key = shard["file"]
        if key in self._open:
            return self._open[key]
        path = local_file(self.index.storage, shard, verify=True)
        ivf = MappedShard(path, shard, self.trained)
        if self.resident:
            with self._lock:
                self._open.setdefault(key, ivf)
            return self._open[key]
        return ivf


# Bound on a PQ score's error on unit vectors, for search indexes built without per-row
# bounds: q_s . (x_s - x~_s) <= |x_s - x~_s|, the code's reconstruction error (2 dimensions
# per 8-bit sub-quantiser: a few hundredths, but not proven).
PQ_SLACK = 0.1
# Float32 rounding of the PQ score and of the stored bounds (unit vectors: ~1e-6).
ROUNDING = 1e-4


def floor_terms(q: np.ndarray, small: np.ndarray, floor: float) -> dict:
    """What `above_floor` needs of each unit query: |q_s| = |P q| and |r_q| = sqrt(1 -
    |q_s|^2), its energy outside the kept principal directions."""
    kept = np.einsum("qd,qd->q", small, small)
    total = np.einsum("qd,qd->q", q, q)
    return {
        "value": floor,
        "reduced": np.sqrt(kept).astype(np.float32),
        "residual": np.sqrt(np.clip(total - kept, 0.0, None)).astype(np.float32),
    }


def above_floor(
    approx: np.ndarray,
    ids: np.ndarray,
    terms: dict,
    shard: dict,
    load_bounds: Callable[[dict], np.ndarray | None],
) -> np.ndarray:
    """`ids` with -1 where the candidate's cosine is surely below the floor, so it is not
    re-ranked. With the shard's per-row bounds (`floor_bounds`) the bound is proven:
    cos <= approx + |q_s| e_x + |r_q| r_x, first with the shard's largest e and r (no
    lookup), then row by row for the candidates left. Without (an older search index):
    |r_x| <= 1 and the PQ error <= PQ_SLACK."""
    floor, reduced_q, residual_q = terms["value"], terms["reduced"], terms["residual"]
    entry = shard.get("bounds")
    if entry is None:
        return np.where(approx >= (floor - residual_q - PQ_SLACK)[:, None], ids, -1)
    largest_r, largest_e = entry["max"]
    loose = floor - residual_q * largest_r - reduced_q * largest_e - ROUNDING
    ids = np.where(approx >= loose[:, None], ids, -1)
    left = np.nonzero(ids >= 0)
    if len(left[0]):
        row = load_bounds(shard)[ids[left]]  # [m, 2]
        slack = residual_q[left[0]] * row[:, 0] + reduced_q[left[0]] * row[:, 1]
        ids[left] = np.where(approx[left] >= floor - slack - ROUNDING, ids[left], -1)
    return ids


def preassigned_search(ivf: faiss.IndexIVFPQ, plan: dict, c: int) -> tuple[np.ndarray, np.ndarray]:
    """The shard's top-c PQ scores for the plan's reduced queries, over the lists the shared
    quantiser chose (no quantiser search here)."""
    x = plan["small"]
    n = len(x)
    distances = np.empty((n, c), np.float32)
    labels = np.empty((n, c), np.int64)
    params = faiss.SearchParametersIVF(nprobe=plan["nprobe"])
    ivf.search_preassigned_c(
        n,
        faiss.swig_ptr(x),
        c,
        faiss.swig_ptr(plan["coarse_i"]),
        faiss.swig_ptr(plan["coarse_d"]),
        faiss.swig_ptr(distances),
        faiss.swig_ptr(labels),
        False,
        params,
    )
    return distances, labels


# The list-by-list scan (`scan_by_list`) when a list is probed by at least this many queries
# on average: its Python cost per list is then below FAISS's per-query table scan.
SCAN_QUERIES_PER_LIST = 4


def scan(ivf: faiss.IndexIVFPQ, plan: dict, c: int) -> tuple[np.ndarray, np.ndarray]:
    """The shard's top-c PQ scores: list by list for batches of queries that share lists
    (dedup's), else FAISS's scan; the same scores either way (up to float rounding)."""
    lists = plan["coarse_i"]
    probed = len(np.unique(lists[lists >= 0]))
    if lists.size >= SCAN_QUERIES_PER_LIST * max(1, probed):
        return scan_by_list(ivf, plan, c)
    return preassigned_search(ivf, plan, c)


def scan_by_list(ivf: faiss.IndexIVFPQ, plan: dict, c: int) -> tuple[np.ndarray, np.ndarray]:
    """`preassigned_search` computed list by list: each probed list's codes are decoded once
    and scored against every query probing it with one matrix product,
    score = <q, centroid> + <q, decoded residual> (FAISS's inner-product IVF-PQ score),
    kept in per-query heaps (FAISS's)."""
    if not ivf.by_residual or ivf.metric_type != faiss.METRIC_INNER_PRODUCT or ivf.pq.nbits != 8:
        return preassigned_search(ivf, plan, c)
    x, lists, coarse = plan["small"], plan["coarse_i"].ravel(), plan["coarse_d"].ravel()
    n, probes = plan["coarse_i"].shape
    scores = np.empty((n, c), np.float32)
    labels = np.empty((n, c), np.int64)
    heaps = faiss.float_minheap_array_t()  # the largest c scores per query
    heaps.nh, heaps.k, heaps.val, heaps.ids = n, c, faiss.swig_ptr(scores), faiss.swig_ptr(labels)
    heaps.heapify()
    order = np.argsort(lists, kind="stable")
    starts = np.flatnonzero(np.diff(lists[order], prepend=-2)).tolist()
    invlists, code_size, decode = ivf.invlists, ivf.code_size, PQDecoder(ivf.pq)
    for lo, hi in zip(starts, [*starts[1:], len(order)], strict=True):
        number = int(lists[order[lo]])
        size = invlists.list_size(number) if number >= 0 else 0
        if size == 0:
            continue
        pairs = order[lo:hi]  # (query, probe) entries probing this list, one per query
        queries = pairs // probes
        codes = faiss.rev_swig_ptr(invlists.get_codes(number), size * code_size)
        residuals = decode(codes.reshape(size, code_size))
        found = x[queries] @ residuals.T
        found += coarse[pairs][:, None]
        heaps.addn_query_subset_with_ids(
            len(queries), faiss.swig_ptr(queries), size, faiss.swig_ptr(found),
            invlists.get_ids(number), 0,
        )  # fmt: skip
    heaps.reorder()  # descending
    return scores, labels


class PQDecoder:
    """PQ codes (8 bits a sub-quantiser) -> reconstructions, by one numpy gather of each
    sub-quantiser's centroid (faster than FAISS's per-code decode loop, measured 1.7x)."""

    def __init__(self, pq: faiss.ProductQuantizer) -> None:
        if pq.nbits != 8:
            raise ValueError(f"PQDecoder needs 8-bit codes, not {pq.nbits}")
        centroids = faiss.vector_to_array(pq.centroids).reshape(pq.M * pq.ksub, pq.dsub)
        self.table = np.ascontiguousarray(centroids).view(np.dtype((np.void, 4 * pq.dsub)))[:, 0]
        self.offsets = np.arange(pq.M, dtype=np.intp) * pq.ksub

    def __call__(self, codes: np.ndarray) -> np.ndarray:
        picked = self.table.take(codes.astype(np.intp) + self.offsets)
        return picked.view(np.float32).reshape(len(codes), -1)


class BlockReader:
    """A shard's float16 blocks, read with pread for one search call: a run of consecutive
    rows in one read (a memory map measured no faster per scattered row).

    Not a memory map: the kernel maps ~0.1-0.7 MiB of page cache into the process around
    each scattered row a mapping faults in (fault-around, read-ahead, large folios), so
    re-ranking a few thousand candidates showed as gigabytes of resident memory at 4 x 10^6
    rows. A pread copies exactly the row; the page cache is shared and not this process's."""

    def __init__(self, store: SearchStore, shard: dict) -> None:
        self.store, self.shard = store, shard
        self.rows = int(store.manifest["vector_block_rows"])
        self.files: dict[int, tuple[int, int]] = {}  # block -> (fd, offset of row 0)
        self.half = np.empty((0, store.dimension), np.float16)  # reused by read and fetch
        self.single = np.empty((0, store.dimension), np.float32)

    def __enter__(self) -> BlockReader:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd, _ in self.files.values():
            os.close(fd)
        self.files.clear()

    def fetch(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` (sorted, distinct: what `rerank` asks for) as float32 [n, D], a view
        valid until the next fetch. The buffers are reused: fresh ones each re-rank step (a
        few MiB) cost as much in page faults as the conversion itself."""
        if len(self.single) < len(ids):
            self.single = np.empty((len(ids), self.store.dimension), np.float32)
        return to_float32(self.read(ids), out=self.single[: len(ids)])

    def read(self, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows `ids` (sorted, distinct) as stored, float16 [n, D], into `out` or a reused
        buffer (valid until the next read): one pread per run of consecutive rows, the runs'
        files and offsets worked out with numpy."""
        row_bytes = 2 * self.store.dimension
        if out is None:
            if len(self.half) < len(ids):
                self.half = np.empty((len(ids), self.store.dimension), np.float16)
            out = self.half[: len(ids)]
        if len(ids) == 0:
            return out
        block_of = ids // self.rows
        run_starts = (np.diff(ids, prepend=-2) != 1) | (np.diff(block_of, prepend=-1) != 0)
        starts = np.flatnonzero(run_starts)
        blocks, which = np.unique(block_of[starts], return_inverse=True)
        opened = np.array([self.block(int(b)) for b in blocks], np.int64).reshape(-1, 2)
        offsets = opened[which, 1] + (ids[starts] - block_of[starts] * self.rows) * row_bytes
        bounds = np.append(starts, len(ids)) * row_bytes
        buffer = memoryview(out).cast("B")
        for fd, lo, hi, offset in zip(
            opened[which, 0].tolist(), bounds[:-1].tolist(), bounds[1:].tolist(),
            offsets.tolist(), strict=True,
        ):  # fmt: skip
            if os.preadv(fd, [buffer[lo:hi]], offset) != hi - lo:
                raise ValueError(f"search vectors of {self.shard['file']} ended early")
        return out

    def block(self, number: int) -> tuple[int, int]:
        if number not in self.files:
            entry = self.shard["vectors"][number]
            # Blocks are large: a local one is checked by header and size, not hashed (an S3
            # copy is hashed as it is downloaded).
            path = local_file(self.store.index.storage, entry, verify=False)
            start = open_block(path, entry, self.store.dimension).offset
            self.files[number] = (os.open(path, os.O_RDONLY), int(start))
        return self.files[number]


def open_block(path: str, entry: dict, dimension: int) -> np.ndarray:
    try:
        block = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"search vectors {entry['file']} could not be read: {e}") from e
    if block.shape != (entry["rows"], dimension) or block.dtype != np.float16:
        raise ValueError(
            f"search vectors {entry['file']} hold {block.dtype} {block.shape}, the manifest "
            f"says float16 ({entry['rows']}, {dimension})"
        )
    if os.path.getsize(path) != entry["bytes"]:
        raise ValueError(f"search vectors {entry['file']} have the wrong size (truncated?)")
    return block


class GpuPlacement:
    """FAISS GPU resources, when FAISS was built with CUDA and sees a GPU; else `start`
    returns None. Untested here (no GPU on the development machine): kept to the coarse
    quantiser and flat shards, searched under a lock (GPU resources are not thread-safe)."""

    def __init__(self) -> None:
        self.resources = faiss.StandardGpuResources()
        self.lock = threading.Lock()
        self.placed: dict[int, Any] = {}

    @classmethod
    def start(cls) -> GpuPlacement | None:
        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
            return None
        try:
            return cls()
        except RuntimeError as e:  # a driver or memory problem: search on the CPU instead
            warnings.warn(f"FAISS GPU unavailable, searching on CPU: {e}", RuntimeWarning, 2)
            return None

    def place(self, index: faiss.Index) -> faiss.Index:
        return faiss.index_cpu_to_gpu(self.resources, 0, index)

    def search(self, index: faiss.Index, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            if id(index) not in self.placed:
                self.placed[id(index)] = self.place(index)
            return self.placed[id(index)].search(x, k)


def merge_top_k(
    scores: np.ndarray, rows: np.ndarray, k: int, ascending: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The best k of each query's candidates from all shards (missing ones, id -1, last)."""
    key = np.where(rows >= 0, scores if ascending else -scores, np.inf)
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def brute_force_top_k(
    index: Index,
    queries: np.ndarray,
    k: int,
    normalized: bool,
    opponents: bool = False,
    column: str = "w",
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
        vectors = column_vectors(index.read_part(part["part"], [column]), column)
        x = prepared(vectors, normalized)
        scores = sign * (q @ x.T)
        rows = np.broadcast_to(np.arange(offset, offset + len(x)), scores.shape)
        best_scores, best_rows = merge_top_k(
            np.hstack([best_scores, scores]), np.hstack([best_rows, rows]), k, ascending=False
        )
        offset += len(x)
    return sign * best_scores, best_rows
