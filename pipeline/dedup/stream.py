"""The `dedup` verb, streaming: memory per process bounded whatever N is (outputs aside).

1. Near-duplicate edges: batches of parts searched against the stored search index
   (pipeline/dedup/edges.py), in threads or as Ray tasks, written as Parquet, resumable.
2. Exact duplicates: pixel hashes bucketed on local disk and grouped with Arrow (exact.py).
3. Influence mode with refinement: the candidate pairs' rows (at most refine_max) re-embedded
   with many views, pairs re-scored (graph.rescore).
4. Union-find over the rows that appear in an edge (graph.grouped_rows): O(edges).
5. Outputs: `dedup/<mode>/list/<part>.parquet` per index part (every row: key, shard,
   group, kept, reason, similarity, kept_key), `groups.parquet` (grouped rows only, the same
   columns plus `chained`), then `dedup/<mode>.summary.json` (last: the run is complete; it
   counts the `chained_groups`, groups holding a member below tau to the kept one).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from collections.abc import Iterator
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.dedup.config import VECTOR_COLUMN, DedupConfig, check_config
from pipeline.dedup.edges import (
    MapFn,
    compute_edges,
    manifest_digest,
    open_index,
    read_edges,
)
from pipeline.dedup.exact import exact_edges
from pipeline.dedup.graph import (
    GROUP_COLUMNS,
    LIST_COLUMNS,
    grouped_rows,
    refine_order,
    rescore,
)
from pipeline.dedup.memory import check_columns, scatter
from pipeline.index.layout import DEDUP_DIR
from pipeline.index.parts import table_bytes, vectors
from pipeline.index.reader import Index
from pipeline.runtime.progress import Progress
from pipeline.search import l2_normalize


def list_dir(mode: str) -> str:
    return f"{DEDUP_DIR}/{mode}/list"


def groups_path(mode: str) -> str:
    return f"{DEDUP_DIR}/{mode}/groups.parquet"


def summary_path(mode: str) -> str:
    return f"{DEDUP_DIR}/{mode}.summary.json"


def list_part_path(mode: str, part: str) -> str:
    """The list part of one index part: named by the part's file stem."""
    return f"{list_dir(mode)}/{PurePosixPath(part).stem}.parquet"


def runner(config: DedupConfig) -> tuple[MapFn, int]:
    """The map edge batches and list parts go through, and FAISS threads per batch."""
    from pipeline.runtime.tasks import local_workers, ray_map, thread_map

    if config.uses_ray():
        map_fn, _ = ray_map(config.runtime)
        return map_fn, max(1, int(config.runtime.cpus_per_worker))
    workers = local_workers(config.runtime)
    return thread_map(workers), max(1, (os.cpu_count() or 1) // workers)


@contextlib.contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - started, 3)


def run_dedup(config: DedupConfig) -> dict:
    """Find duplicate groups in the index; write and print them; return the summary."""
    check_config(config)
    started = time.perf_counter()
    index = Index(config.index)
    check_columns(index, config)
    map_fn, threads = runner(config)
    timings: dict[str, float] = {}
    with timed(timings, "edges"):
        edge_run = compute_edges(index, config, map_fn, threads, map_fn)
        i, j, cosine = read_edges(index, config.mode, edge_run["batches"])
    refined = Refined.none(index.dimension)
    if config.resolved_refine() and len(i):
        with timed(timings, "refine"):
            refined = refine_candidates(index, config, i, j, cosine)
            i, j, cosine = rescore(i, j, cosine, refined.rows, refined.unit, config.resolved_tau())
    near_edges = len(i)
    if config.exact:
        with timed(timings, "exact"):
            hi, hj = exact_edges(index)
            i, j = np.concatenate([i, hi]), np.concatenate([j, hj])
    with timed(timings, "groups"):
        info = info_reader(index, config)
        unit = unit_reader(index, config, refined, edge_run["directory"])
        grouped = grouped_rows(i, j, info, unit, config)
    with timed(timings, "write"):
        write_lists(index, config.mode, grouped, map_fn, config.progress)
    n = int(index.offsets()[-1])
    summary = summarise(grouped, n, config, time.perf_counter() - started)
    summary.update(
        edges=near_edges,
        exact_edges=len(i) - near_edges,
        batches=len(edge_run["batches"]),
        batches_run=edge_run["batches_run"],
        search=edge_run["directory"],
        timings=timings,
    )
    index.storage.write_bytes(summary_path(config.mode), json.dumps(summary, indent=2).encode())
    print_summary(grouped, summary, config.top)
    where = index.storage.url(list_dir(config.mode))
    print(f"keep/remove list -> {where}/ (one file per part; groups.parquet beside)")
    return summary


# -- refinement -------------------------------------------------------------------------------


class Refined:
    """Refined unit vectors of some rows (sorted), at most refine_max of them."""

    def __init__(self, rows: np.ndarray, unit: np.ndarray) -> None:
        self.rows, self.unit = rows, unit

    @classmethod
    def none(cls, dimension: int) -> Refined:
        return cls(np.empty(0, np.int64), np.empty((0, dimension), np.float32))

    def override(self, rows: np.ndarray, unit: np.ndarray) -> np.ndarray:
        """`unit` (of `rows`) with the refined vectors in place of the stored ones."""
        if len(self.rows) and len(rows):
            at = np.minimum(np.searchsorted(self.rows, rows), len(self.rows) - 1)
            hit = self.rows[at] == rows
            unit[hit] = self.unit[at[hit]]
        return unit


def refine_candidates(
    index: Index, config: DedupConfig, i: np.ndarray, j: np.ndarray, cosine: np.ndarray
) -> Refined:
    from pipeline.refine import Refiner  # loads the model: only when there is work for it

    rows = refine_order(i, j, cosine, config.refine_max)
    refiner = Refiner(index, config.resolved_refine())
    # One call per part (= shard): the same reads and embedding batches as one call for all,
    # counted as each shard's rows are done.
    part = np.searchsorted(index.offsets(), rows, side="right") - 1
    w, ok = np.zeros((len(rows), index.dimension), np.float32), np.zeros(len(rows), bool)
    numbers = np.unique(part)
    with Progress("dedup refine", len(numbers), enabled=config.progress) as progress:
        for number in numbers:
            mine = part == number
            w[mine], ok[mine] = refiner.rows(rows[mine])
            progress.update(int(mine.sum()))
    order = np.argsort(rows[ok])
    return Refined(rows[ok][order], l2_normalize(np.asarray(w[ok], np.float32))[order])


# -- reading the grouped rows -------------------------------------------------------------------


def info_reader(index: Index, config: DedupConfig):
    columns = ["key", "shard", "self_influence"] + (["pixel_hash"] if config.exact else [])
    return lambda rows: index.take(rows, columns)


def unit_reader(index: Index, config: DedupConfig, refined: Refined, directory: str):
    """Unit vectors of sorted global rows (refined w where refined): from the search index's
    float16 blocks where it has them (a pread a run of rows), else from the parts (whole row
    groups decoded for a few rows: 19 s for the 20,000 grouped rows of 10^6 at D = 1,024)."""
    from pipeline.index.searchstore import SearchStore

    column = VECTOR_COLUMN[config.mode]
    store = SearchStore(index, directory=directory, threads=1, resident=False)

    def unit_of(rows: np.ndarray) -> np.ndarray:
        x = store.stored_vectors(rows)
        x = vectors(index.take(rows, [column]), column) if x is None else x
        unit = l2_normalize(x)
        return refined.override(rows, unit) if column == "w" else unit

    return unit_of


# -- outputs --------------------------------------------------------------------------------------


def write_lists(
    index: Index, mode: str, grouped: pa.Table, map_fn: MapFn, progress: bool = True
) -> None:
    """One list part per index part (every row), then groups.parquet; earlier runs' files
    that this run does not rewrite are removed (and the old single `dedup/<mode>.parquet`)."""
    by_row = grouped.sort_by("row")
    rows = by_row.column("row").to_numpy()
    offsets = index.offsets()
    shards = index.manifest["shards"]
    tasks = []
    for number, shard in enumerate(shards):
        lo, hi = np.searchsorted(rows, offsets[number : number + 2])
        tasks.append((shard["part"], int(offsets[number]), by_row.slice(lo, hi - lo)))
    digest = manifest_digest(index.manifest)
    write = functools.partial(write_list_part, index.storage.uri, digest, mode)
    with Progress("dedup lists", len(tasks), "parts", enabled=progress) as bar:
        written = map_fn(bar.counted(write), tasks)
    keep = set(written) | {groups_path(mode)}
    stale = [p for p in index.storage.list(f"{DEDUP_DIR}/{mode}/") if p not in keep]
    stale = [p for p in stale if not p.startswith(f"{DEDUP_DIR}/{mode}/edges/")]
    old = f"{DEDUP_DIR}/{mode}.parquet"
    index.storage.delete_many(stale + ([old] if index.storage.exists(old) else []))
    index.storage.write_bytes(groups_path(mode), table_bytes(grouped.select(list(GROUP_COLUMNS))))


def write_list_part(uri: str, digest: str, mode: str, task: tuple[str, int, pa.Table]) -> str:
    """The list of one index part (its key and shard columns read, nothing wider)."""
    part, first_row, grouped = task
    index = open_index(uri, digest)
    table = index.read_part(part, ["key", "shard"])
    result = scatter(table.column("key"), table.column("shard"), first_row, grouped)
    path = list_part_path(mode, part)
    index.storage.write_bytes(path, table_bytes(result))
    return path


def read_dedup_groups(index: Index, mode: str) -> pa.Table:
    """The grouped rows of the last `dedup` in `mode` (key, shard, group, kept, reason,
    similarity, kept_key, and `chained` where the run wrote it), sorted by group, kept
    member first."""
    from pipeline.index.columnar import read_columns, read_schema

    names = set(read_schema(index.storage, groups_path(mode)).names)
    columns = [c for c in GROUP_COLUMNS if c in LIST_COLUMNS or c in names]
    return read_columns(index.storage, groups_path(mode), columns)


def read_keep_list(index: Index, mode: str) -> pa.Table:
    """The whole keep/remove list (every row, in index order): small indexes, tests, demo."""
    from pipeline.index.columnar import read_columns

    paths = [list_part_path(mode, s["part"]) for s in index.manifest["shards"]]
    return pa.concat_tables([read_columns(index.storage, p, list(LIST_COLUMNS)) for p in paths])


# -- the summary ----------------------------------------------------------------------------------


def summarise(grouped: pa.Table, n: int, config: DedupConfig, seconds: float) -> dict:
    """Counts from the grouped rows alone (every other row is unique and kept)."""
    reasons = pc.value_counts(grouped.column("reason")).to_pylist()
    counts = {r["values"]: r["counts"] for r in reasons}
    near = pc.equal(grouped.column("reason"), f"{config.mode}_duplicate")
    near_groups = len(pc.unique(grouped.filter(near).column("group")))
    groups = len(pc.unique(grouped.column("group")))
    has_chained = "chained" in grouped.column_names
    chained = grouped.filter(grouped.column("chained")) if has_chained else None
    near_rows = grouped.filter(near).column("similarity")
    return {
        "mode": config.mode,
        "tau": config.resolved_tau(),
        "k": config.k,
        "keep": config.keep,
        "exact": config.exact,
        "refine": config.resolved_refine(),
        "examples": n,
        "groups": groups,
        "exact_groups": groups - near_groups,
        "near_groups": near_groups,
        "removed": grouped.num_rows - groups,
        "removed_exact": counts.get("exact_duplicate", 0),
        "removed_near": counts.get(f"{config.mode}_duplicate", 0),
        # Members in a group only through others (similarity to the kept one below tau).
        "chained_groups": 0 if chained is None else len(pc.unique(chained.column("group"))),
        "chained_members": 0 if chained is None else chained.num_rows,
        "min_near_similarity": float(pc.min(near_rows).as_py()) if len(near_rows) else None,
        "seconds": round(seconds, 3),
        "examples_per_second": round(n / seconds, 1) if seconds > 0 else 0.0,
    }


def print_summary(grouped: pa.Table, summary: dict, top: int) -> None:
    print(
        f"dedup ({summary['mode']}, tau={summary['tau']}, k={summary['k']}, keep="
        f"{summary['keep']}, refine={summary['refine']}): {summary['examples']:,} examples, "
        f"{summary['groups']:,} groups "
        f"({summary['exact_groups']:,} exact, {summary['near_groups']:,} near), "
        f"{summary['removed']:,} to remove; {summary['examples_per_second']:,} examples/s"
    )
    if summary.get("chained_groups"):
        print(
            f"  note: {summary['chained_groups']:,} groups hold {summary['chained_members']:,} "
            f"members below tau to their kept member (joined through others; lowest "
            f"{summary['min_near_similarity']:.3f}): `chained` in groups.parquet"
        )
    rows = grouped.filter(pc.less(grouped.column("group"), top)).to_pylist()
    for g in range(min(top, summary["groups"])):
        members = [r for r in rows if r["group"] == g]
        kept = next(r["key"] for r in members if r["kept"])
        others = ", ".join(
            f"{r['key']} ({r['reason'].split('_')[0]}, {r['similarity']:.3f}"
            f"{', chained' if r.get('chained') else ''})"
            for r in members
            if not r["kept"]
        )
        print(f"  group {g}: {len(members)} members, keep {kept}; remove {others}")
