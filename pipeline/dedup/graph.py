"""The duplicate graph's pieces shared by the in-memory and the streaming path: union-find,
the keep policy, group numbering, the refinement's re-scoring, and the grouped rows' table.

Keep policies: "first" keeps the member earliest in corpus order (the global row: shards in
the manifest's order, then position in the shard), so the original stays and its later
copies go; "lowest_self_influence" / "highest_self_influence" keep the member of lowest /
highest s(x), ties by corpus order.

Per grouped row: `reason` ("kept", "exact_duplicate" for the same decoded-pixel hash as the
kept member, else "<mode>_duplicate"); `similarity`, the cosine to the kept member in the
mode's space, 1.0 for the kept member and for its exact copies (whatever their w: with
per-key views two copies of one image have different w); and, in groups.parquet only,
`chained`: a near duplicate whose similarity to the kept member is below tau, in the group
only through other members (connected components chain).

Only rows that appear in an edge are ever looked at: the graph is relabelled onto compact ids
(`np.unique` of the endpoints), so memory is O(edges), never O(N).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

from pipeline.dedup.config import DedupConfig

# Grouped rows whose similarity is computed at once: bounds the [chunk, D] vectors in memory.
SIMILARITY_CHUNK = 16_384
# Columns of the keep/remove list (every row) and of groups.parquet (grouped rows only).
LIST_COLUMNS = ("key", "shard", "group", "kept", "reason", "similarity", "kept_key")
GROUP_COLUMNS = (*LIST_COLUMNS, "chained")
# A direct edge's cosine, recomputed here, may differ from the search's in the last bits.
CHAIN_SLACK = 1e-4
LIST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("group", pa.int64()),
        ("kept", pa.bool_()),
        ("reason", pa.string()),
        ("similarity", pa.float32()),
        ("kept_key", pa.string()),
    ]
)

UnitVectors = Callable[[np.ndarray], np.ndarray]  # global rows -> unit vectors [n, D]
RowInfo = Callable[[np.ndarray], pa.Table]  # global rows -> key, shard, self_influence, ...


def components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected-component label (the smallest row in it) of each of n rows.

    Vectorised union-find: hook the larger root of every edge under the smaller, then
    compress paths fully; repeat until every edge joins equal roots.
    """
    parent = np.arange(n)
    i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
    while True:
        ri, rj = parent[i], parent[j]
        differ = ri != rj
        if not differ.any():
            return parent
        lo, hi = np.minimum(ri, rj)[differ], np.maximum(ri, rj)[differ]
        np.minimum.at(parent, hi, lo)
        while not np.array_equal(nxt := parent[parent], parent):
            parent = nxt


def keep_order(rows: np.ndarray, self_influence: np.ndarray, policy: str) -> np.ndarray:
    """Rank of every row under the keep policy (0 is kept first): by corpus order (`rows`,
    global rows) for "first", else by self-influence with ties in corpus order."""
    rows = np.asarray(rows, np.int64)
    if policy == "first":
        order = np.argsort(rows, kind="stable")
    elif policy == "lowest_self_influence":
        order = np.lexsort((rows, self_influence))
    else:
        order = np.lexsort((rows, -self_influence))
    rank = np.empty(len(rows), np.int64)
    rank[order] = np.arange(len(rows))
    return rank


def group_ids(label: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: its group id (-1 when alone; 0 = the largest group) and its group's kept row.

    Groups are numbered by size, descending, then by their smallest row.
    """
    n = len(label)
    _, inverse, sizes = np.unique(label, return_inverse=True, return_counts=True)
    # The kept row of each component: the member with the lowest keep rank.
    best = np.full(len(sizes), n, np.int64)
    np.minimum.at(best, inverse, rank)
    row_of_rank = np.empty(n, np.int64)
    row_of_rank[rank] = np.arange(n)
    kept_row = row_of_rank[best[inverse]]
    multi = np.flatnonzero(sizes > 1)
    order = multi[np.lexsort((multi, -sizes[multi]))]
    number = np.full(len(sizes), -1, np.int64)
    number[order] = np.arange(len(order))
    return number[inverse], kept_row


# -- refinement (influence mode) --------------------------------------------------------------


def refine_order(i: np.ndarray, j: np.ndarray, cosine: np.ndarray, limit: int) -> np.ndarray:
    """The rows to re-embed: those of the most similar candidate pairs first, up to `limit`
    (pairs ordered by cosine to 1e-5, then rows: the choice depends neither on edge-file
    order nor on float rounding between one search and another)."""
    if not len(i):
        return np.empty(0, np.int64)
    order = np.lexsort((j, i, -np.round(np.asarray(cosine, np.float64), 5)))
    flat = np.stack([i[order], j[order]], 1).reshape(-1)
    rows, first = np.unique(flat, return_index=True)
    return rows[np.argsort(first)][:limit]


def rescore(
    i: np.ndarray,
    j: np.ndarray,
    stored: np.ndarray,
    refined_rows: np.ndarray,
    refined_unit: np.ndarray,
    tau: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate pairs judged by refined w where both rows were refined (`refined_rows`
    sorted, `refined_unit` their unit vectors), by their stored cosine otherwise; the pairs
    with cosine >= tau."""
    cosine = np.asarray(stored, np.float32).copy()
    both = np.zeros(len(i), dtype=bool)
    if len(refined_rows) and len(i):
        pi = np.minimum(np.searchsorted(refined_rows, i), len(refined_rows) - 1)
        pj = np.minimum(np.searchsorted(refined_rows, j), len(refined_rows) - 1)
        both = (refined_rows[pi] == i) & (refined_rows[pj] == j)
        a, b = refined_unit[pi[both]], refined_unit[pj[both]]
        cosine[both] = np.einsum("nd,nd->n", a, b)
    if (~both).any():
        print(f"refine: {int((~both).sum()):,} candidate pairs scored with stored w")
    keep = cosine >= tau
    return i[keep], j[keep], cosine[keep]


# -- the grouped rows ---------------------------------------------------------------------------


def grouped_rows(
    i: np.ndarray, j: np.ndarray, info_of: RowInfo, unit_of: UnitVectors, config: DedupConfig
) -> pa.Table:
    """The rows in any duplicate group, from the edges (i, j) of global rows.

    `info_of(rows)` gives key, shard, self_influence (and pixel_hash with `config.exact`) of
    sorted global rows; `unit_of(rows)` their unit vectors in the mode's space. Returns
    `row` plus the list's columns and `chained`, sorted by group, the kept member first,
    then row.
    """
    i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
    i, j = i[i != j], j[i != j]
    nodes = np.unique(np.concatenate([i, j]))  # O(edges): the only rows looked at
    label = components(len(nodes), np.searchsorted(nodes, i), np.searchsorted(nodes, j))
    info = info_of(nodes)
    keys = np.array(info.column("key").to_pylist(), dtype=object)
    rank = keep_order(nodes, info.column("self_influence").to_numpy(), config.keep)
    group, kept_node = group_ids(label, rank)
    kept = kept_node == np.arange(len(nodes))
    exact = exact_copies(info, kept_node) if "pixel_hash" in info.column_names else kept & False
    similarity = np.where(kept | exact, 1.0, similarities(nodes, nodes[kept_node], unit_of))
    chained = ~kept & ~exact & (similarity < config.resolved_tau() - CHAIN_SLACK)
    reason = np.where(kept, "kept", np.where(exact, "exact_duplicate", f"{config.mode}_duplicate"))
    table = pa.table(
        {
            "row": pa.array(nodes, pa.int64()),
            "key": info.column("key"),
            "shard": info.column("shard"),
            "group": pa.array(group, pa.int64()),
            "kept": pa.array(kept),
            "reason": pa.array(reason.tolist(), pa.string()),
            "similarity": pa.array(similarity.astype(np.float32)),
            "kept_key": pa.array(keys[kept_node].tolist(), pa.string()),
            "chained": pa.array(chained, pa.bool_()),
        }
    )
    order = np.lexsort((nodes, ~kept, group))
    return table.take(pa.array(order))


def similarities(rows: np.ndarray, kept_rows: np.ndarray, unit_of: UnitVectors) -> np.ndarray:
    """Cosine of each row to its group's kept row, a chunk of rows at a time."""
    out = np.empty(len(rows), np.float32)
    for lo in range(0, len(rows), SIMILARITY_CHUNK):
        a, b = rows[lo : lo + SIMILARITY_CHUNK], kept_rows[lo : lo + SIMILARITY_CHUNK]
        unique, inverse = np.unique(b, return_inverse=True)
        out[lo : lo + len(a)] = np.einsum("nd,nd->n", unit_of(a), unit_of(unique)[inverse])
    return out


def exact_copies(info: pa.Table, kept_node: np.ndarray) -> np.ndarray:
    """Whether each row has the same (non-empty) pixel hash as its kept row."""
    hashes = np.array([h or None for h in info.column("pixel_hash").to_pylist()], dtype=object)
    return (hashes != None) & (hashes == hashes[kept_node])  # noqa: E711 (elementwise)
