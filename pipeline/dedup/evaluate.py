"""Scoring a keep/remove table against known duplicate groups (tests, benchmarks, demo)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa


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
