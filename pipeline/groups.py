"""`groups`: how influence is distributed across groups named in the metadata (or `cls`).

Per group: size and share of the corpus, self-influence (mean, median, p90, max), mean loss,
and the group's share of the top-influence examples (the `top_fraction` highest
self-influence) with its ratio to the group's corpus share (> 1: over-represented).

Group-by-group matrix. The mean influence of group h's examples on group g's,

    M[g, h] = 1/(|g||h|) sum_{t in g} sum_{s in h} <w_t, w_s> = <mean_g w, mean_h w>,

is exact by bilinearity of the inner product, so it needs only the per-group sums of `w`
(one O(N D) pass over the parts, O(G D) memory), never the |g| x |h| pairs. The mean
normalised influence (cosine) is the same with unit vectors u = w / ||w||. The diagonal
includes the pairs (t, t) (self-influence), as the formula does.

Writes `groups/<field>.stats.parquet` and `groups/<field>.matrix.parquet` (long format).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.index.layout import GROUPS_DIR
from pipeline.index.parts import vectors
from pipeline.index.reader import Index
from pipeline.search import l2_normalize
from pipeline.storage import safe_name

MISSING = "(missing)"
OTHER = "(other)"  # parenthesised, like MISSING, so it cannot clash with a real value


@dataclass
class GroupsConfig:
    index: str = "runs/index"  # the index URI (the `output` of fit/build)
    field: str = "cls"  # a metadata field name, or "cls"
    top_fraction: float = 0.01  # "top-influence examples": this fraction by self-influence
    max_groups: int = 50  # the most frequent groups; the rest are lumped as OTHER
    sample: int = 0  # rows for the matrix: 0 all (exact, O(N D)); else a seeded sample
    seed: int = 0  # of the matrix sample
    top: int = 20  # groups to print


def check_config(config: GroupsConfig) -> None:
    if not 0 < config.top_fraction <= 1:
        raise ValueError(f"top_fraction must lie in (0, 1], got {config.top_fraction}")
    if config.max_groups < 1 or config.sample < 0:
        raise ValueError("max_groups must be >= 1 and sample >= 0")


# -- group labels ------------------------------------------------------------------------


def field_values(table: pa.Table, field: str) -> list[str | None]:
    """The field of every row as a group name (None where the row lacks it)."""
    if field == "cls":
        return [None if c is None else str(c) for c in table.column("cls").to_pylist()]
    out: list[str | None] = []
    for text in table.column("metadata").to_pylist():
        value = json.loads(text).get(field) if text else None
        out.append(None if value is None else value if isinstance(value, str) else _json(value))
    return out


def _json(value: object) -> str:
    return json.dumps(value, sort_keys=True)


def group_labels(values: list[str | None], max_groups: int) -> tuple[np.ndarray, list[str]]:
    """Per row a group number, and the names: the `max_groups` most frequent values (ties by
    name), then MISSING and OTHER where present."""
    counts = Counter(v for v in values if v is not None)
    ranked = sorted(counts, key=lambda v: (-counts[v], v))
    names = ranked[:max_groups]
    if None in values:
        names.append(MISSING)
    if len(ranked) > max_groups:
        names.append(OTHER)
    number = {name: g for g, name in enumerate(names)}
    other = number.get(OTHER, -1)
    labels = [number[MISSING] if v is None else number.get(v, other) for v in values]
    return np.asarray(labels, np.int64), names


# -- statistics ---------------------------------------------------------------------------


def group_stats(
    labels: np.ndarray,
    names: list[str],
    self_influence: np.ndarray,
    loss: np.ndarray,
    top_fraction: float,
) -> pa.Table:
    """One row per group (in `names` order) with the statistics in the module docstring."""
    n = len(labels)
    top_count = max(1, math.ceil(top_fraction * n))
    top = np.zeros(n, bool)
    top[np.argsort(-self_influence, kind="stable")[:top_count]] = True
    rows = []
    for g, name in enumerate(names):
        mask = labels == g
        s = self_influence[mask].astype(np.float64)
        share = mask.sum() / n
        top_share = (top & mask).sum() / top_count
        rows.append(
            {
                "group": name,
                "count": int(mask.sum()),
                "share": float(share),
                "self_influence_mean": float(s.mean()),
                "self_influence_median": float(np.median(s)),
                "self_influence_p90": float(np.percentile(s, 90)),
                "self_influence_max": float(s.max()),
                "loss_mean": float(loss[mask].astype(np.float64).mean()),
                "top_count": int((top & mask).sum()),
                "top_share": float(top_share),
                "top_ratio": float(top_share / share),
            }
        )
    return pa.Table.from_pylist(rows)


def group_means(labels: np.ndarray, w: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-group sums of w and of unit w, [G, D] float64 each (summed by a one-hot product)."""
    onehot = np.zeros((groups, len(labels)))
    onehot[labels, np.arange(len(labels))] = 1.0
    return onehot @ w.astype(np.float64), onehot @ l2_normalize(w).astype(np.float64)


def matrix_table(names: list[str], sums: np.ndarray, unit_sums: np.ndarray, counts: np.ndarray):
    """Long-format matrix: every (group_a, group_b) with the mean influence and cosine."""
    safe = np.maximum(counts, 1)[:, None]
    mean_w, mean_u = sums / safe, unit_sums / safe
    influence, cosine = mean_w @ mean_w.T, mean_u @ mean_u.T
    a, b = np.meshgrid(np.arange(len(names)), np.arange(len(names)), indexing="ij")
    a, b = a.ravel(), b.ravel()
    return pa.table(
        {
            "group_a": pa.array([names[i] for i in a], pa.string()),
            "group_b": pa.array([names[i] for i in b], pa.string()),
            "count_a": pa.array(counts[a], pa.int64()),
            "count_b": pa.array(counts[b], pa.int64()),
            "mean_influence": pa.array(influence[a, b]),
            "mean_cosine": pa.array(cosine[a, b]),
        }
    )


# -- the verb -----------------------------------------------------------------------------


def run_groups(config: GroupsConfig) -> tuple[pa.Table, pa.Table]:
    """Statistics and the group-by-group matrix over `config.field`; written and printed."""
    check_config(config)
    index = Index(config.index)
    source = "cls" if config.field == "cls" else "metadata"
    table = index.table([source, "self_influence", "loss"])
    values = field_values(table, config.field)
    if all(v is None for v in values):
        raise ValueError(
            f"no row of the index at {index.storage.uri} has the field {config.field!r}"
        )
    labels, names = group_labels(values, config.max_groups)
    self_influence = table.column("self_influence").to_numpy().astype(np.float64)
    loss = table.column("loss").to_numpy().astype(np.float64)
    stats = group_stats(labels, names, self_influence, loss, config.top_fraction)
    matrix = matrix_table(names, *accumulate_sums(index, labels, len(names), config))
    name = safe_name(config.field)
    stats_url = index.write_table(f"{GROUPS_DIR}/{name}.stats.parquet", stats)
    matrix_url = index.write_table(f"{GROUPS_DIR}/{name}.matrix.parquet", matrix)
    print_stats(stats, config)
    print(f"group statistics -> {stats_url}\ngroup-by-group matrix -> {matrix_url}")
    return stats, matrix


def accumulate_sums(
    index: Index, labels: np.ndarray, groups: int, config: GroupsConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group sums of w and unit w and row counts, part by part (or over a sample)."""
    chosen = np.ones(len(labels), bool)
    if config.sample and config.sample < len(labels):
        rng = np.random.default_rng(config.seed)
        chosen[:] = False
        chosen[rng.choice(len(labels), config.sample, replace=False)] = True
    dim = index.dimension
    sums, unit_sums = np.zeros((groups, dim)), np.zeros((groups, dim))
    start = 0
    for entry in index.manifest["shards"]:
        part = index.read_part(entry["part"], ["w"])
        rows = slice(start, start + part.num_rows)
        start += part.num_rows
        keep = chosen[rows]
        s, u = group_means(labels[rows][keep], vectors(part)[keep], groups)
        sums += s
        unit_sums += u
    counts = np.bincount(labels[chosen], minlength=groups)
    return sums, unit_sums, counts


def print_stats(stats: pa.Table, config: GroupsConfig) -> None:
    print(
        f"groups over {config.field!r}: {stats.num_rows} groups; top-influence examples = "
        f"the top {config.top_fraction:.2%} by self-influence"
    )
    print(
        f"  {'group':>16} {'count':>8} {'share':>7} {'mean s':>10} {'p90 s':>10} {'top/share':>9}"
    )
    for row in stats.slice(0, config.top).to_pylist():
        print(
            f"  {row['group'][:16]:>16} {row['count']:>8,} {row['share']:>7.2%} "
            f"{row['self_influence_mean']:>10.4g} {row['self_influence_p90']:>10.4g} "
            f"{row['top_ratio']:>9.2f}"
        )
