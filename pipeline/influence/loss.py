"""The augmentation-consistency loss of SPEC section 2, per example."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_KINDS = ("cosine", "l2")
ESTIMATORS = ("all_pairs", "pairs")


def consistency_loss(
    z: torch.Tensor, kind: str = "cosine", estimator: str = "all_pairs"
) -> torch.Tensor:
    """Per-example loss from the representations of V views, `z` [B, V, d] -> [B].

    `all_pairs` (default): the mean of ||n(z_a) - n(z_b)||^2 over all C(V, 2) pairs a < b,
    computed in O(V) as `2V/(V-1) * (mean_a ||n(z_a)||^2 - ||mean_a n(z_a)||^2)`.
    `pairs`: the K = V/2 disjoint pairs (views 2j, 2j + 1), `(1/K) sum_j ||n(z_2j) - n(z_2j+1)||^2`.
    Both estimate the same expected loss; all pairs with less noise. `kind` "cosine"
    normalises (n(z) = z/||z||, so each term is 2 - 2cos), "l2" does not.
    """
    if z.dim() != 3 or z.shape[1] < 2:
        raise ValueError(f"expected z of shape [B, V >= 2, d], got {tuple(z.shape)}")
    if kind == "cosine":
        z = F.normalize(z, dim=-1, eps=1e-12)
    elif kind != "l2":
        raise ValueError(f"unknown loss kind {kind!r}; choose one of {LOSS_KINDS}")
    if estimator == "pairs":
        if z.shape[1] % 2:
            raise ValueError(f"the pairs estimator needs an even number of views, got {z.shape[1]}")
        first, second = z[:, 0::2], z[:, 1::2]
        return (first - second).pow(2).sum(-1).mean(-1)
    if estimator != "all_pairs":
        raise ValueError(f"unknown loss estimator {estimator!r}; choose one of {ESTIMATORS}")
    v = z.shape[1]
    spread = z.pow(2).sum(-1).mean(-1) - z.mean(1).pow(2).sum(-1)
    return (2.0 * v / (v - 1)) * spread
