"""The in-memory path: `dedup_table` over a table and its vectors [N, D] (tests, benchmarks,
small inputs). The verb (`run_dedup`) streams instead (pipeline/dedup/stream.py); both hand
their edges to the same grouping (pipeline/dedup/graph.py), so they give the same list."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa

from pipeline.dedup.config import VECTOR_COLUMN, DedupConfig, check_config
from pipeline.dedup.graph import grouped_rows, refine_order, rescore
from pipeline.index.parts import vectors
from pipeline.index.reader import Index
from pipeline.search import SearchIndex, l2_normalize

REDUCE_DIM = 128
CANDIDATES_PER_NEIGHBOUR = 16

RefineRows = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def near_edges(
    x: np.ndarray, tau: float, config: DedupConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edges (i, j, cosine) with cosine >= tau among each row's k nearest neighbours."""
    n = len(x)
    if n < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    kind = "flat" if n <= config.flat_max_rows or n < 1024 else "ivfpq"
    # IVF-PQ on the top principal directions: k-means and codes in REDUCE_DIM, then the few
    # candidates a threshold can accept are re-ranked exactly.
    index = SearchIndex.build(x, kind=kind, normalized=True, reduce_dim=REDUCE_DIM)
    exact = x if kind == "ivfpq" else None
    candidates = CANDIDATES_PER_NEIGHBOUR * (config.k + 1)
    step = 4096  # queries per search call: bounds the neighbour arrays
    rows, cols, sims = [], [], []
    for lo in range(0, n, step):
        q = x[lo : lo + step]
        scores, ids = index.search(
            q, config.k + 1, exact_vectors=exact, candidates=candidates, nprobe=config.nprobe
        )
        source = np.arange(lo, lo + len(q))[:, None]
        hit = (ids >= 0) & (ids != source) & (scores >= tau)
        rows.append(np.broadcast_to(source, ids.shape)[hit])
        cols.append(ids[hit])
        sims.append(scores[hit])
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(sims).astype(np.float32)


def hash_edges(hashes: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """Edges joining each row to the first row with the same (non-empty) pixel hash."""
    values = np.array([h if h is not None else "" for h in hashes], dtype=object)
    present = np.flatnonzero(values != "")
    if len(present) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    _, first, inverse = np.unique(values[present], return_index=True, return_inverse=True)
    anchor = present[first[inverse]]
    joined = anchor != present
    return present[joined], anchor[joined]


def refined_edges(
    x: np.ndarray, config: DedupConfig, refine_rows: RefineRows
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edges from refined w: candidates with stored cos >= refine_floor, re-scored.

    `x` (unit rows) is updated in place with the refined unit vectors, so the similarities
    reported later are the refined ones too. A pair is judged by its refined cosine when
    both rows were refined, else by its stored one. Returns (i, j, cos) with cos >= tau.
    """
    i, j, stored = near_edges(x, config.edge_floor(), config)
    rows = refine_order(i, j, stored, config.refine_max)
    refined = np.empty(0, np.int64)
    if len(rows):
        w, ok = refine_rows(rows)
        x[rows[ok]] = l2_normalize(np.asarray(w[ok], np.float32))
        refined = np.sort(rows[ok])
    return rescore(i, j, stored, refined, x[refined], config.resolved_tau())


def dedup_table(
    table: pa.Table, x: np.ndarray, config: DedupConfig, refine_rows: RefineRows | None = None
) -> pa.Table:
    """The keep/remove table of every row of `table` (key, shard, self_influence[, pixel_hash])
    given its unit-normalisable vectors `x` [N, D] in the mode's space; with `config.refine`,
    `refine_rows(rows) -> (w, ok)` gives refined vectors of candidate rows."""
    check_config(config)
    x = l2_normalize(np.asarray(x, np.float32))
    if config.resolved_refine() and refine_rows is not None:
        i, j, _ = refined_edges(x, config, refine_rows)
    else:
        i, j, _ = near_edges(x, config.resolved_tau(), config)
    if config.exact:
        hi, hj = hash_edges(table.column("pixel_hash").to_pylist())
        i, j = np.concatenate([i, hi]), np.concatenate([j, hj])
    names = ["key", "shard", "self_influence"] + (["pixel_hash"] if config.exact else [])
    info = table.select(names)
    grouped = grouped_rows(i, j, lambda rows: info.take(pa.array(rows)), lambda r: x[r], config)
    return scatter(table.column("key"), table.column("shard"), 0, grouped.sort_by("row"))


def scatter(key: pa.ChunkedArray, shard: pa.ChunkedArray, first: int, by_row: pa.Table) -> pa.Table:
    """The list's rows first..first+len(key): unique rows, except those of `by_row` (grouped
    rows sorted by `row`) that fall in the range, which get their group's values."""
    n = len(key)
    rows = by_row.column("row").to_numpy()
    lo, hi = np.searchsorted(rows, [first, first + n])
    part = by_row.slice(lo, hi - lo)
    local = rows[lo:hi] - first
    group = np.full(n, -1, np.int64)
    kept = np.ones(n, dtype=bool)
    similarity = np.ones(n, np.float32)
    reason = np.full(n, "unique", dtype=object)
    kept_key = np.array(key.to_pylist(), dtype=object)
    group[local] = part.column("group").to_numpy()
    kept[local] = part.column("kept").to_numpy()
    similarity[local] = part.column("similarity").to_numpy()
    reason[local] = np.array(part.column("reason").to_pylist(), dtype=object)
    kept_key[local] = np.array(part.column("kept_key").to_pylist(), dtype=object)
    return pa.table(
        {
            "key": key,
            "shard": shard,
            "group": pa.array(group, pa.int64()),
            "kept": pa.array(kept),
            "reason": pa.array(reason.tolist(), pa.string()),
            "similarity": pa.array(similarity, pa.float32()),
            "kept_key": pa.array(kept_key.tolist(), pa.string()),
        }
    )


def read_inputs(index: Index, config: DedupConfig) -> tuple[pa.Table, np.ndarray]:
    """Every row and the mode's vectors, in memory (small indexes only: `dedup_table`'s
    input); a clear error when a needed column is missing."""
    check_columns(index, config)
    needed = {"key", "shard", "self_influence", VECTOR_COLUMN[config.mode]}
    if config.exact:
        needed.add("pixel_hash")
    table = index.table(sorted(needed))
    x = vectors(table, VECTOR_COLUMN[config.mode]).astype(np.float32)
    return table, x


def check_columns(index: Index, config: DedupConfig) -> None:
    """A clear error when a column the mode needs is missing from the parts."""
    needed = {"key", "shard", "self_influence", VECTOR_COLUMN[config.mode]}
    if config.exact:
        needed.add("pixel_hash")
    missing = sorted(needed - index.columns())
    if missing:
        hint = {
            "z": "embedding mode needs z: rebuild with index.store_representation=true",
            "pixel_hash": "set exact=false, or rebuild the index with this version",
        }
        reasons = "; ".join(hint.get(m, f"{m} is a core column") for m in missing)
        raise ValueError(f"the index at {index.storage.uri} has no column {missing}: {reasons}")
