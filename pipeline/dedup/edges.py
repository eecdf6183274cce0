"""Near-duplicate edges: k-NN queries in batches against the stored search index.

The rows are cut into batches of whole consecutive parts (about `chunk` rows each). A batch
(`edge_batch`, a pure function: no Ray in it) reads only its parts' vector column, searches
the stored search index (`SearchStore`, exact re-ranked cosines, global rows) for the k + 1
nearest of each row, keeps pairs with cosine >= the floor (tau, or refine_floor when
refining), and writes `dedup/<mode>/edges/<batch>.parquet` (i, j, cosine), then its marker
`<batch>.json` holding the settings' fingerprint: a rerun with the same settings skips the
batch, any other settings recompute it. Memory per batch: its queries and their top-k.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.dedup.config import VECTOR_COLUMN, DedupConfig
from pipeline.index.columnar import read_columns
from pipeline.index.parts import table_bytes, vectors
from pipeline.index.reader import Index
from pipeline.runtime.progress import Progress

EDGE_FORMAT = "influence-ssl/dedup-edges/1"
EDGE_SCHEMA = pa.schema([("i", pa.int64()), ("j", pa.int64()), ("cosine", pa.float32())])
# Search directories dedup uses when the stored one cannot serve (SPEC section 4 layout).
EMBEDDING_SEARCH = "search_z"
COSINE_SEARCH = "search_w_cosine"
PARALLEL_READS = 16
MERGE_BYTES = 64 << 20
MAX_QUERY_ROWS = 65_536  # queries a search call (each ~4 D bytes: its unit float32 copy)

MapFn = Callable[[Callable, Iterable], list]


@dataclass(frozen=True)
class Batch:
    id: str
    parts: tuple[int, ...]  # part numbers, consecutive
    first_row: int
    rows: int


def plan_batches(index: Index, chunk: int) -> list[Batch]:
    """Whole consecutive parts, about `chunk` rows a batch (a larger part is one batch)."""
    offsets = index.offsets()
    batches, start = [], 0
    for number in range(len(offsets) - 1):
        rows = int(offsets[number + 1] - offsets[start])
        last = number == len(offsets) - 2
        if rows >= chunk or last:
            parts = tuple(range(start, number + 1))
            name = f"batch-{start:06d}-{number:06d}"
            batches.append(Batch(name, parts, int(offsets[start]), rows))
            start = number + 1
    return batches


def edges_dir(mode: str) -> str:
    return f"dedup/{mode}/edges"


def manifest_digest(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


@functools.lru_cache(maxsize=4)
def open_index(uri: str, digest: str) -> Index:
    """The index a batch reads, opened once per process; refused if it changed since the
    driver planned the batches."""
    index = Index(uri)
    if manifest_digest(index.manifest) != digest:
        raise RuntimeError(f"the index at {uri} changed while dedup ran: rerun dedup")
    return index


# -- the search index dedup queries ----------------------------------------------------------


def ensure_search(index: Index, config: DedupConfig, map_fn: MapFn | None) -> tuple[str, dict]:
    """The search directory for the mode's vectors (cosine), built when missing or stale.

    influence: the stored `search/` when it is cosine; an index built with inner_product or
    `kind: none` gets a cosine one of its own in `search_w_cosine/` (build's `search/` is
    left as it is). embedding: `search_z/` over z. Each uses the index's own search
    settings (`search_config_of`), metric cosine; `kind: none` becomes auto, and a flat
    search over more than `flat_max_rows` rows IVF-PQ (exact search is quadratic in N).
    """
    from pipeline.index.searchstore import build_search_index, resolve_kind, search_config_of

    stored = search_config_of(index.manifest)
    kind = stored.kind if stored.kind != "none" else "auto"
    rows = int(index.offsets()[-1])
    flat = resolve_kind(dataclasses.replace(stored, kind=kind), rows) == "flat"
    if rows > config.flat_max_rows and flat:
        kind = "ivfpq"  # a flat search costs dedup N^2 D: 165 s at 10^5 rows, D = 1,024
    usable = kind == stored.kind and stored.metric == "cosine"
    search = dataclasses.replace(stored, kind=kind, metric="cosine")
    if config.mode == "embedding":
        column, directory = "z", EMBEDDING_SEARCH
    else:
        column, directory = "w", "search" if usable else COSINE_SEARCH
    kwargs = {"map_fn": map_fn} if map_fn is not None else {}
    manifest = build_search_index(
        index, search, column=column, directory=directory, progress=config.progress, **kwargs
    )
    if manifest is None or manifest.get("metric") != "cosine":
        raise RuntimeError(f"no cosine search index could be built under {directory}/")
    return directory, manifest


def batch_settings(config: DedupConfig, directory: str, search: dict, threads: int) -> dict:
    """What every batch needs besides its parts (plain data: sent to Ray tasks as is)."""
    return {
        "mode": config.mode,
        "column": VECTOR_COLUMN[config.mode],
        "directory": directory,
        "search": hashlib.sha256(json.dumps(search, sort_keys=True).encode()).hexdigest(),
        "k": config.k,
        "nprobe": config.nprobe,
        "candidates": config.resolved_candidates(),
        "floor": config.edge_floor(),
        "threads": threads,
    }


def fingerprint(settings: dict, index: Index, batch: Batch) -> str:
    """What a batch's edges depend on: the settings (not the thread count), the search
    index, and the batch's parts."""
    shards = index.manifest["shards"]
    parts = [
        [shards[p]["part"], shards[p]["examples"], shards[p].get("part_sha256")]
        for p in batch.parts
    ]
    state = {k: v for k, v in settings.items() if k != "threads"}
    blob = json.dumps([EDGE_FORMAT, state, parts], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


# -- one batch (runs anywhere) ---------------------------------------------------------------


def edge_batch(uri: str, digest: str, settings: dict, task: dict) -> dict:
    """Search one batch of rows; write its edges, then its marker; return the marker.

    `task`: {"batch": id, "parts": [...], "first_row": r, "rows": n, "fingerprint": f}. No
    Ray here: the caller maps it over batches in threads or as Ray tasks.
    """
    import faiss

    from pipeline.index.searchstore import SearchStore

    started = time.perf_counter()
    faiss.omp_set_num_threads(max(1, int(settings["threads"])))
    index = open_index(uri, digest)
    store = SearchStore(
        index, directory=settings["directory"], threads=settings["threads"], resident=False
    )
    rows = np.arange(task["first_row"], task["first_row"] + task["rows"], dtype=np.int64)
    # The search index's float16 copies (what re-ranking compares them with), else the parts.
    x = store.stored_vectors(rows)
    x = read_vectors(index, task["parts"], settings["column"]) if x is None else x
    k = settings["k"]  # the search leaves each row out of its own hits
    step = query_rows(k, len(store.shards))
    found_scores, found_rows = [], []
    for lo in range(0, len(x), step):
        scores, found = store.search(
            x[lo : lo + step],
            k,
            nprobe=settings["nprobe"],
            candidates=max(k + 1, settings["candidates"]),  # the row itself among them
            floor=settings["floor"],  # pairs below it are dropped: skip re-ranking them
            rows=rows[lo : lo + step],  # its own rows: their stored lists, no quantiser search
        )
        found_scores.append(scores)
        found_rows.append(found)
    store.close()
    del x
    scores, found = np.concatenate(found_scores), np.concatenate(found_rows)
    hit = (found >= 0) & (found != rows[:, None]) & (scores >= settings["floor"])
    edges = pa.table(
        [
            pa.array(np.broadcast_to(rows[:, None], found.shape)[hit]),
            pa.array(found[hit].astype(np.int64)),
            pa.array(scores[hit].astype(np.float32)),
        ],
        schema=EDGE_SCHEMA,
    )
    folder = edges_dir(settings["mode"])
    index.storage.write_bytes(f"{folder}/{task['batch']}.parquet", table_bytes(edges))
    marker = {
        "format": EDGE_FORMAT,
        "batch": task["batch"],
        "fingerprint": task["fingerprint"],
        "rows": len(rows),
        "edges": edges.num_rows,
        "seconds": round(time.perf_counter() - started, 3),
        "host": socket.gethostname(),  # where it ran (a Ray worker, or the driver)
        "pid": os.getpid(),
    }
    index.storage.write_bytes(f"{folder}/{task['batch']}.json", json.dumps(marker).encode())
    return marker


def query_rows(k: int, shards: int) -> int:
    """Queries per search call: the shards' top-k arrays merged at once stay near
    MERGE_BYTES (scores and rows, 12 bytes a hit), however many shards there are. Up to
    MAX_QUERY_ROWS: a call decodes each probed list once and reads a candidate shared by
    its queries once, so a whole batch in one call reads and decodes least."""
    return int(np.clip(MERGE_BYTES // (12 * k * max(1, shards)), 256, MAX_QUERY_ROWS))


def read_vectors(index: Index, parts: Iterable[int], column: str) -> np.ndarray:
    """The parts' vectors as stored (float16 or float32): the search converts and
    normalises them in one pass (one float32 copy of the batch, not two)."""
    shards = index.manifest["shards"]
    pieces = [vectors(index.read_part(shards[p]["part"], [column]), column) for p in parts]
    return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]


# -- the driver's side ------------------------------------------------------------------------


def compute_edges(
    index: Index, config: DedupConfig, map_fn: MapFn, threads: int, build_map: MapFn | None
) -> dict:
    """Every batch's edges written (done batches with the same settings skipped)."""
    directory, search = ensure_search(index, config, build_map)
    settings = batch_settings(config, directory, search, threads)
    batches = plan_batches(index, config.chunk)
    tasks = [
        {
            "batch": b.id,
            "parts": list(b.parts),
            "first_row": b.first_row,
            "rows": b.rows,
            "fingerprint": fingerprint(settings, index, b),
        }
        for b in batches
    ]
    markers = read_markers(index, config.mode, [t["batch"] for t in tasks])
    remove_stale(index, config.mode, {b.id for b in batches})
    todo = [t for t in tasks if markers.get(t["batch"], {}).get("fingerprint") != t["fingerprint"]]
    run = functools.partial(
        edge_batch, index.storage.uri, manifest_digest(index.manifest), settings
    )
    progress = Progress("dedup edges", len(todo), "batches", enabled=config.progress)
    with progress:
        for marker in map_fn(progress.counted(run, lambda _, marker: marker["rows"]), todo):
            markers[marker["batch"]] = marker
    return {
        "directory": directory,
        "batches": [b.id for b in batches],
        "batches_run": len(todo),
        "edges": sum(markers[b.id]["edges"] for b in batches),
    }


def read_markers(index: Index, mode: str, names: list[str]) -> dict[str, dict]:
    folder = edges_dir(mode)
    present = set(index.storage.list(f"{folder}/"))

    def one(name: str) -> dict | None:
        path = f"{folder}/{name}.json"
        if path not in present or f"{folder}/{name}.parquet" not in present:
            return None
        marker = json.loads(index.storage.read_bytes(path))
        return marker if marker.get("format") == EDGE_FORMAT else None

    with ThreadPoolExecutor(PARALLEL_READS) as pool:
        found = dict(zip(names, pool.map(one, names), strict=True))
    return {name: marker for name, marker in found.items() if marker is not None}


def remove_stale(index: Index, mode: str, batches: set[str]) -> None:
    """Edge files of batches this plan does not have (an earlier plan's, or other chunks)."""
    folder = edges_dir(mode)
    stale = [
        p
        for p in index.storage.list(f"{folder}/")
        if p[len(folder) + 1 :].rsplit(".", 1)[0] not in batches
    ]
    index.storage.delete_many(stale)


def read_edges(
    index: Index, mode: str, batches: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All batches' edges (i, j, cosine): O(edges) in memory."""
    folder = edges_dir(mode)

    def one(name: str) -> pa.Table:
        return read_columns(index.storage, f"{folder}/{name}.parquet", ["i", "j", "cosine"])

    with ThreadPoolExecutor(PARALLEL_READS) as pool:
        tables = list(pool.map(one, batches))
    if not tables:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    table = pa.concat_tables(tables)
    return (
        table.column("i").to_numpy(),
        table.column("j").to_numpy(),
        table.column("cosine").to_numpy(),
    )
