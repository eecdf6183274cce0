"""How reproducible an index is: w from two independent sets of V views, compared.

`w` is a Monte-Carlo estimate over the sampled views, so two independent sets of V views
give two estimates of each example's w. Their agreement on a fixed sample is the index's
reliability (SPEC section 2):

- `median_cos`: the median over examples of cos(w_A(x), w_B(x)), the share of the direction
  of w that reproduces, which every pairwise answer (proponents, duplicates) uses;
- `self_influence_spearman`: rank agreement of s(x) = ||w(x)||^2 across the two sets;
- `top10_overlap`: mean share of the top-10 proponents (by cosine, the example itself left
  out, within the sample) that both sets name.

With more views the noise of w shrinks roughly as 1/V while its signal stays, so a
correlation-like figure r measured at V projects to m V views by the Spearman-Brown formula
`m r / (1 + (m - 1) r)`; `views_for` inverts it to the V that would reach a target.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# The figures an index should reach (issue targets); below them, answers change with the
# view draw and `build` warns.
TARGETS = {"median_cos": 0.6, "self_influence_spearman": 0.95, "top10_overlap": 0.6}
LABELS = {
    "median_cos": "median cos(w) of the same example",
    "self_influence_spearman": "self-influence Spearman",
    "top10_overlap": "top-10 proponents shared",
}
CONSEQUENCE = {
    "median_cos": "pairwise answers, proponents and duplicates, change with the view draw",
    "self_influence_spearman": "the self-influence ranking changes with the view draw",
    "top10_overlap": "a query's top proponents change with the view draw",
}
# Where refinement (many more views for the few rows a verb shows) answers each figure.
REMEDY = {
    "median_cos": "refine queries and dedup (refine=)",
    "self_influence_spearman": "refine the top of rank (rank --set refine=256)",
    "top10_overlap": "refine queries (query --set refine=256)",
}
# Figures the Spearman-Brown projection applies to (correlation-like, in [0, 1]).
PROJECTED = ("median_cos", "self_influence_spearman")


def spearman_brown(r: float, factor: float) -> float:
    """Reliability of an average of `factor` times as many views, from r at the current V."""
    r = min(max(r, 0.0), 1.0)
    denominator = 1.0 + (factor - 1.0) * r
    return factor * r / denominator if denominator > 0 else 0.0


def views_for(r: float, views: int, target: float) -> int | None:
    """The V at which `r` measured with `views` views projects to `target` (None: never)."""
    if r >= target:
        return views
    if r <= 0.0 or target >= 1.0:
        return None
    factor = target * (1.0 - r) / (r * (1.0 - target))
    return math.ceil(views * factor)


def ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    out = np.empty(len(values), dtype=np.float64)
    out[order] = np.arange(len(values), dtype=np.float64)
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denominator) if denominator > 0 else 0.0


def unit(w: torch.Tensor) -> torch.Tensor:
    w = w.double()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-300)


def top_overlap(w_a: torch.Tensor, w_b: torch.Tensor, k: int = 10) -> float:
    """Mean share of each example's top-k cosine neighbours (itself excluded) both name."""
    n = len(w_a)
    k = min(k, n - 1)
    if k < 1:
        return float("nan")
    tops = []
    for w in (w_a, w_b):
        u = unit(w)
        cos = u @ u.T
        cos.fill_diagonal_(-math.inf)
        tops.append(cos.topk(k, dim=1).indices.numpy())
    shared = [len(set(a) & set(b)) for a, b in zip(tops[0], tops[1], strict=True)]
    return float(np.mean(shared) / k)


def measure(w_a: torch.Tensor, w_b: torch.Tensor, views: int, top: int = 10) -> dict:
    """Reliability figures of w from two independent view sets of `views` views each."""
    if w_a.shape != w_b.shape or w_a.ndim != 2 or len(w_a) < 2:
        raise ValueError(
            f"need two [N >= 2, D] sets of w, got {tuple(w_a.shape)}, {tuple(w_b.shape)}"
        )
    cos = (unit(w_a) * unit(w_b)).sum(1).numpy()
    s_a, s_b = w_a.double().pow(2).sum(1).numpy(), w_b.double().pow(2).sum(1).numpy()
    figures = {
        "median_cos": float(np.median(cos)),
        "self_influence_spearman": spearman(s_a, s_b),
        "top10_overlap": top_overlap(w_a, w_b, top),
    }
    return {
        "views": int(views),
        "sample": len(w_a),
        **figures,
        "projected": {
            str(int(views * f)): {name: spearman_brown(figures[name], f) for name in PROJECTED}
            for f in (0.5, 2, 4, 8)
            if views * f >= 2
        },
        "views_for_targets": {
            name: views_for(figures[name], views, TARGETS[name]) for name in PROJECTED
        },
        "targets": dict(TARGETS),
        "below_targets": [name for name, t in TARGETS.items() if not figures[name] >= t],
    }


def describe(figures: dict) -> list[str]:
    """Lines for a terminal: the figures, what more views would give, and any warning."""
    if not figures:
        return []
    v = figures["views"]
    lines = [
        f"reliability (w from two independent sets of V = {v} views, {figures['sample']} "
        f"examples): median cos {figures['median_cos']:.2f}, self-influence Spearman "
        f"{figures['self_influence_spearman']:.3f}, top-10 proponents shared "
        f"{figures['top10_overlap']:.2f}"
    ]
    projected = "; ".join(
        f"V = {views}: cos {p['median_cos']:.2f}, self-influence {p['self_influence_spearman']:.2f}"
        for views, p in sorted(figures["projected"].items(), key=lambda item: int(item[0]))
    )
    lines.append(f"  projected (Spearman-Brown): {projected}")
    for name in figures["below_targets"]:
        needed = figures["views_for_targets"].get(name)
        reach = f"; about V = {needed} views would reach it" if needed else ""
        lines.append(
            f"  WARNING: {LABELS[name]} {figures[name]:.3f} is below the target {TARGETS[name]}"
            f" ({CONSEQUENCE[name]}){reach}: raise influence.loss.num_views, or "
            f"{REMEDY[name]}"
        )
    return lines
