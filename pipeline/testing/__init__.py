"""Support shared by the tests and the benchmarks, so that neither keeps its own copy.

Not part of the product's interface. It sits inside ``pipeline`` so that a benchmark run as
``python benchmarks/x.py`` imports it like the product itself, with no ``sys.path`` edits.
Submodules: ``s3server`` (moto's S3 server on loopback and misbehaving proxies in front of it;
needs the test extra) and ``indexes`` (small real indexes built in memory). Here: a small
engine configuration, clustered synthetic vectors, and rank-agreement metrics.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch

from pipeline.config import AugmentConfig, InfluenceConfig, ModelConfig, from_dict

__all__ = ["ViewDataset", "clustered", "engine_config", "spearman", "top_overlap"]


def engine_config(
    kind: str = "auto",
    *,
    model: ModelConfig | None = None,
    augment: AugmentConfig | int = 24,
    pairs: int | None = 1,
    dims: int | None = 16,
    damping: float | None = None,
    batch_size: int = 0,
    device: str = "cpu",
    **sections: Any,
) -> InfluenceConfig:
    """An engine configuration with curvature ``kind``, on the CPU unless ``device`` says.

    ``model``: None keeps the default encoder. ``augment``: a view family, or the crop size
    of the default one. ``pairs``: 2 x pairs views under the disjoint-pairs estimator, views
    seeded 0 (None: the default loss). ``dims``: dims x dims projections per layer (None:
    exact gradients). ``sections``: any other settings as plain data, merged onto the above
    section by section, e.g. ``loss={"seed": 1}``, ``curvature={"damping_mode": "relative"}``,
    ``autocast="bf16"``.
    """
    data: dict[str, Any] = {
        "curvature": {"kind": kind} | ({} if damping is None else {"damping": damping}),
        "projection": {"enabled": False} if dims is None else {"dim_in": dims, "dim_out": dims},
        "batch_size": batch_size,
        "device": device,
    }
    if pairs is not None:
        data["loss"] = {"num_views": 2 * pairs, "estimator": "pairs", "seed": 0}
    for name, value in sections.items():
        both = isinstance(value, dict) and isinstance(data.get(name), dict)
        data[name] = {**data[name], **value} if both else value
    config = from_dict(InfluenceConfig, data)
    views = augment if isinstance(augment, AugmentConfig) else AugmentConfig(size=augment)
    return replace(config, model=model or config.model, augment=views)


def clustered(
    n: int,
    d: int,
    centres: int | np.ndarray,
    seed: int | np.random.Generator = 0,
    *,
    spread: float = 0.3,
    unit: bool = False,
) -> np.ndarray:
    """[n, d] float32 points: each a random one of ``centres`` (that many standard normal
    ones, or the given [C, d] array) plus ``spread`` x N(0, I); then scaled by U(0.5, 2) per
    point, so that inner product and cosine rank differently, or to unit norm if ``unit``.

    A Generator as ``seed`` continues its stream: parts of one index drawn around shared
    centres, queries after them.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if isinstance(centres, int):
        centres = rng.standard_normal((centres, d))
    elif centres.shape[1:] != (d,):
        raise ValueError(f"centres of shape {centres.shape} for points of dimension {d}")
    x = centres[rng.integers(len(centres), size=n)] + spread * rng.standard_normal((n, d))
    if unit:
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return (x * rng.uniform(0.5, 2.0, size=(n, 1))).astype(np.float32)


def spearman(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Spearman's rank correlation of two score arrays of one shape, flattened (ties share
    their mean rank). Needs scipy (the test and bench extras)."""
    from scipy.stats import spearmanr

    return float(spearmanr(np.asarray(a).ravel(), np.asarray(b).ravel()).statistic)


def top_overlap(estimate: torch.Tensor, reference: torch.Tensor, k: int = 10) -> float:
    """Mean share of each row's ``k`` largest entries (proponents) that are also among the
    reference row's ``k`` largest."""
    ours, theirs = estimate.topk(k, dim=1).indices, reference.topk(k, dim=1).indices
    return float((ours[:, :, None] == theirs[:, None, :]).any(-1).double().mean())


class ViewDataset(torch.utils.data.Dataset):
    """Precomputed views [N, V, C, s, s] as a dataset: item i is example i's [V, C, s, s]
    (what peers such as kronfluence are handed, so every method sees the same views)."""

    def __init__(self, views: torch.Tensor) -> None:
        self.views = views

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.views[index]
