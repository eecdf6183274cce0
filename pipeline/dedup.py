"""`dedup`: duplicate groups and a keep/remove list, from an index alone (no model, no Ray).

Two examples are near-duplicates when the cosine of their vectors is at least `tau`: the
index vectors `w` in "influence" mode (SPEC section 2), the unit representations `z` of the
un-augmented images in "embedding" mode (a SemDeDup-style baseline). With `exact`, rows with
the same decoded-pixel hash are joined as well. Groups are the connected components of that
graph, whose edges come from a chunked k-nearest-neighbour search (FAISS; memory O(chunk * k)
on top of the vectors, never N x N), merged with a vectorised union-find. One member per
group is kept by the `keep` policy.

Writes `dedup/<mode>.parquet` (every row: key, shard, group, kept, reason, similarity,
kept_key) and `dedup/<mode>.summary.json`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.index.layout import DEDUP_DIR
from pipeline.index.parts import vectors
from pipeline.index.reader import Index
from pipeline.search import SearchIndex, l2_normalize

MODES = ("influence", "embedding")
KEEP_POLICIES = ("first", "lowest_self_influence", "highest_self_influence")
# Cosine thresholds per mode, from benchmarks/results/demo_quality.md (pixel hash off, 4,050
# digits with 20 planted near-copies): influence with refined w at 0.9 finds as many
# near-copies as the embedding at 0.99 with fewer false removals (252 vs 322); 0.8 finds
# 19 of 20 (887 false removals, against 2,524 for the embedding at 0.95 finding 18).
DEFAULT_TAU = {"influence": 0.9, "embedding": 0.99}
# Views of the refined w of candidate pairs (influence mode): demo_quality.md shows refined
# pairs separating near-copies from unrelated digits where stored w (V = 16) does not.
DEFAULT_REFINE = 64
VECTOR_COLUMN = {"influence": "w", "embedding": "z"}
REASONS = ("unique", "kept", "exact_duplicate", "influence_duplicate", "embedding_duplicate")


@dataclass
class DedupConfig:
    index: str = "runs/index"  # the index URI (the `output` of fit/build)
    mode: str = "influence"  # "influence" (cosine of w) or "embedding" (cosine of z)
    tau: float | None = None  # cosine threshold; None: DEFAULT_TAU[mode]
    k: int = 16  # neighbours searched per example (edges of the kNN graph)
    keep: str = "first"  # "first" (smallest key), "lowest_self_influence", "highest_..."
    exact: bool = True  # also join rows with the same decoded-pixel hash
    top: int = 10  # largest groups to print
    flat_max_rows: int = 20_000  # exact search up to this many rows, else IVF-PQ + re-rank
    nprobe: int = 32  # IVF lists probed per query (IVF-PQ only)
    chunk: int = 4096  # queries per search call: bounds the neighbour arrays in memory
    # Influence mode: candidate pairs with stored cos(w) >= refine_floor are re-scored with w
    # of `refine` views (images read back from their shards), and joined when that refined
    # cosine is >= tau. None: DEFAULT_REFINE views in influence mode; 0: off. At most
    # `refine_max` examples are re-embedded (the candidates of the most similar pairs first).
    refine: int | None = None
    refine_floor: float = 0.5
    refine_max: int = 20_000

    def resolved_tau(self) -> float:
        return DEFAULT_TAU[self.mode] if self.tau is None else float(self.tau)

    def resolved_refine(self) -> int:
        if self.refine is None:
            return DEFAULT_REFINE if self.mode == "influence" else 0
        return int(self.refine)


REDUCE_DIM = 128
CANDIDATES_PER_NEIGHBOUR = 16


def check_config(config: DedupConfig) -> None:
    if config.mode not in MODES:
        raise ValueError(f"unknown dedup mode {config.mode!r}; choose one of {MODES}")
    if config.keep not in KEEP_POLICIES:
        raise ValueError(f"unknown keep policy {config.keep!r}; choose one of {KEEP_POLICIES}")
    tau = config.resolved_tau()
    if not -1.0 <= tau <= 1.0:
        raise ValueError(f"tau is a cosine threshold and must lie in [-1, 1], got {tau}")
    if config.k < 1 or config.chunk < 1:
        raise ValueError(f"k and chunk must be >= 1, got k={config.k}, chunk={config.chunk}")
    if config.resolved_refine() and config.mode != "influence":
        raise ValueError("refine re-embeds w: it applies to mode=influence only")


# -- the graph -----------------------------------------------------------------------------


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
    rows, cols, sims = [], [], []
    for lo in range(0, n, config.chunk):
        q = x[lo : lo + config.chunk]
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
    """Edges joining each row to the first row with the same (non-null) pixel hash."""
    values = np.array([h if h is not None else "" for h in hashes], dtype=object)
    present = np.flatnonzero(values != "")
    if len(present) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    _, first, inverse = np.unique(values[present], return_index=True, return_inverse=True)
    anchor = present[first[inverse]]
    joined = anchor != present
    return present[joined], anchor[joined]


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


# -- the keep/remove table -------------------------------------------------------------------


def keep_order(keys: np.ndarray, self_influence: np.ndarray, policy: str) -> np.ndarray:
    """Rank of every row under the keep policy (0 is kept first); ties broken by key."""
    if policy == "first":
        order = np.lexsort((keys,))
    elif policy == "lowest_self_influence":
        order = np.lexsort((keys, self_influence))
    else:
        order = np.lexsort((keys, -self_influence))
    rank = np.empty(len(keys), np.int64)
    rank[order] = np.arange(len(keys))
    return rank


RefineRows = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def refined_edges(
    x: np.ndarray, config: DedupConfig, refine_rows: RefineRows
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edges from refined w: candidates with stored cos >= refine_floor, re-scored.

    `x` (unit rows) is updated in place with the refined unit vectors, so the similarities
    reported later are the refined ones too. Returns (i, j, refined cos) with cos >= tau.
    """
    tau = config.resolved_tau()
    i, j, stored = near_edges(x, min(config.refine_floor, tau), config)
    order = np.argsort(-stored, kind="stable")
    i, j, stored = i[order], j[order], stored[order]
    # The examples of the most similar pairs first, up to refine_max of them.
    first_seen = np.unique(np.stack([i, j], 1).reshape(-1), return_index=True)
    rows = first_seen[0][np.argsort(first_seen[1])][: config.refine_max]
    if len(rows):
        w, ok = refine_rows(rows)
        x[rows[ok]] = l2_normalize(np.asarray(w[ok], np.float32))
        done = np.zeros(len(x), dtype=bool)
        done[rows[ok]] = True
        both = done[i] & done[j]
        if not both.all():
            print(f"refine: {int((~both).sum()):,} candidate pairs scored with stored w")
    sims = np.einsum("nd,nd->n", x[i], x[j])
    keep = sims >= tau
    return i[keep], j[keep], sims[keep].astype(np.float32)


def dedup_table(
    table: pa.Table, x: np.ndarray, config: DedupConfig, refine_rows: RefineRows | None = None
) -> pa.Table:
    """The keep/remove table of every row of `table` (key, shard, self_influence[, pixel_hash])
    given its unit-normalisable vectors `x` [N, D] in the mode's space; with `config.refine`,
    `refine_rows(rows) -> (w, ok)` gives refined vectors of candidate rows."""
    check_config(config)
    n = table.num_rows
    x = l2_normalize(np.asarray(x, np.float32))
    if config.resolved_refine() and refine_rows is not None:
        i, j, _ = refined_edges(x, config, refine_rows)
    else:
        i, j, _ = near_edges(x, config.resolved_tau(), config)
    hashes = table.column("pixel_hash").to_pylist() if config.exact else [None] * n
    hi, hj = hash_edges(hashes)
    label = components(n, np.concatenate([i, hi]), np.concatenate([j, hj]))
    keys = np.array(table.column("key").to_pylist(), dtype=object)
    rank = keep_order(keys, table.column("self_influence").to_numpy(), config.keep)
    group, kept_row = group_ids(label, rank)
    in_group = group >= 0
    similarity = np.ones(n, np.float32)
    similarity[in_group] = np.einsum("nd,nd->n", x[in_group], x[kept_row[in_group]])
    kept = kept_row == np.arange(n)
    exact_copy = np.array([h is not None for h in hashes]) & (
        np.array(hashes, dtype=object) == np.array(hashes, dtype=object)[kept_row]
    )
    reason = np.where(
        ~in_group,
        "unique",
        np.where(kept, "kept", np.where(exact_copy, "exact_duplicate", f"{config.mode}_duplicate")),
    )
    return pa.table(
        {
            "key": table.column("key"),
            "shard": table.column("shard"),
            "group": pa.array(group, pa.int64()),
            "kept": pa.array(kept),
            "reason": pa.array(reason.tolist(), pa.string()),
            "similarity": pa.array(np.where(kept, 1.0, similarity).astype(np.float32)),
            "kept_key": pa.array(keys[kept_row].tolist(), pa.string()),
        }
    )


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


# -- the verb ------------------------------------------------------------------------------


def read_inputs(index: Index, config: DedupConfig) -> tuple[pa.Table, np.ndarray]:
    """The rows and the mode's vectors; a clear error when a needed column is missing."""
    available = index.columns()
    needed = {"key", "shard", "self_influence", VECTOR_COLUMN[config.mode]}
    if config.exact:
        needed.add("pixel_hash")
    missing = sorted(needed - available)
    if missing:
        hint = {
            "z": "embedding mode needs z: rebuild with index.store_representation=true",
            "pixel_hash": "set exact=false, or rebuild the index with this version",
        }
        reasons = "; ".join(hint.get(m, f"{m} is a core column") for m in missing)
        raise ValueError(f"the index at {index.storage.uri} has no column {missing}: {reasons}")
    table = index.table(sorted(needed))
    x = vectors(table, VECTOR_COLUMN[config.mode]).astype(np.float32)
    return table, x


def summarise(result: pa.Table, config: DedupConfig, seconds: float) -> dict:
    grouped = result.filter(pc.greater_equal(result.column("group"), 0))
    reasons = pc.value_counts(result.column("reason")).to_pylist()
    counts = {r["values"]: r["counts"] for r in reasons}
    near_groups = set(
        grouped.filter(pc.equal(grouped.column("reason"), f"{config.mode}_duplicate"))
        .column("group")
        .to_pylist()
    )
    groups = len(set(grouped.column("group").to_pylist()))
    n = result.num_rows
    return {
        "mode": config.mode,
        "tau": config.resolved_tau(),
        "k": config.k,
        "keep": config.keep,
        "exact": config.exact,
        "refine": config.resolved_refine(),
        "examples": n,
        "groups": groups,
        "exact_groups": groups - len(near_groups),
        "near_groups": len(near_groups),
        "removed": n - int(pc.sum(result.column("kept")).as_py() or 0),
        "removed_exact": counts.get("exact_duplicate", 0),
        "removed_near": counts.get(f"{config.mode}_duplicate", 0),
        "seconds": round(seconds, 3),
        "examples_per_second": round(n / seconds, 1) if seconds > 0 else 0.0,
    }


def run_dedup(config: DedupConfig) -> pa.Table:
    """Find duplicate groups in the index; write and print them; return the table."""
    check_config(config)
    started = time.perf_counter()
    index = Index(config.index)
    table, x = read_inputs(index, config)
    refine_rows = None
    if config.resolved_refine():
        from pipeline.refine import Refiner  # loads the model: only when refining

        refine_rows = Refiner(index, config.resolved_refine()).rows
    result = dedup_table(table, x, config, refine_rows)
    summary = summarise(result, config, time.perf_counter() - started)
    url = index.write_table(f"{DEDUP_DIR}/{config.mode}.parquet", result)
    summary_path = f"{DEDUP_DIR}/{config.mode}.summary.json"
    index.storage.write_bytes(summary_path, json.dumps(summary, indent=2).encode())
    print_summary(result, summary, config.top)
    print(f"keep/remove list -> {url}")
    return result


def print_summary(result: pa.Table, summary: dict, top: int) -> None:
    print(
        f"dedup ({summary['mode']}, tau={summary['tau']}, k={summary['k']}, keep="
        f"{summary['keep']}, refine={summary['refine']}): {summary['examples']:,} examples, "
        f"{summary['groups']:,} groups "
        f"({summary['exact_groups']:,} exact, {summary['near_groups']:,} near), "
        f"{summary['removed']:,} to remove; {summary['examples_per_second']:,} examples/s"
    )
    rows = result.filter(pc.less(result.column("group"), top)).to_pylist()
    for g in range(min(top, summary["groups"])):
        members = [r for r in rows if r["group"] == g]
        kept = next(r["key"] for r in members if r["kept"])
        others = ", ".join(
            f"{r['key']} ({r['reason'].split('_')[0]}, {r['similarity']:.3f})"
            for r in members
            if not r["kept"]
        )
        print(f"  group {g}: {len(members)} members, keep {kept}; remove {others}")


# -- scoring against known duplicates --------------------------------------------------------


def evaluate_duplicates(table: pa.Table, truth_groups: Iterable[Sequence[str]]) -> dict:
    """Precision/recall of a keep/remove table against known duplicate groups (of keys).

    Pairs: a pair of rows is predicted when both are in one group, true when both are in one
    truth group (counted from the contingency of the two partitions, never pair by pair).
    Removals: a removed row is correct when its kept member shares a truth group with it;
    recall is over the sum of (truth group size - 1).
    """
    keys = table.column("key").to_pylist()
    position = {k: r for r, k in enumerate(keys)}
    truth = np.full(len(keys), -1, np.int64)
    for g, members in enumerate(truth_groups):
        truth[[position[k] for k in members]] = g
    predicted = table.column("group").to_numpy()
    kept_row = np.array([position[k] for k in table.column("kept_key").to_pylist()])
    both = (predicted >= 0) & (truth >= 0)
    true_pairs = _pairs(truth[truth >= 0])
    pred_pairs = _pairs(predicted[predicted >= 0])
    hits = _pairs(predicted[both] * (truth.max() + 1) + truth[both])
    removed = ~table.column("kept").to_numpy(zero_copy_only=False)
    correct = int((removed & (truth >= 0) & (truth == truth[kept_row])).sum())
    expected = int((truth >= 0).sum()) - len(np.unique(truth[truth >= 0]))
    precision = hits / pred_pairs if pred_pairs else 1.0
    recall = hits / true_pairs if true_pairs else 1.0
    return {
        "pair_precision": precision,
        "pair_recall": recall,
        "pair_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "predicted_pairs": pred_pairs,
        "true_pairs": true_pairs,
        "removed": int(removed.sum()),
        "removed_precision": correct / int(removed.sum()) if removed.any() else 1.0,
        "removed_recall": correct / expected if expected else 1.0,
    }


def _pairs(labels: np.ndarray) -> int:
    counts = np.unique(labels, return_counts=True)[1]
    return int((counts * (counts - 1) // 2).sum())
