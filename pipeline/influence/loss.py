"""The augmentation-consistency loss of SPEC section 2, per example."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_KINDS = ("cosine", "l2")


def consistency_loss(z: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Per-example loss from representations of K view pairs.

    `z` is [B, 2K, d] with index 2j + side holding side `side` of pair j. Returns [B]:
    `(1/K) sum_j ||n(z_j0) - n(z_j1)||^2` (kind "cosine", = 2 - 2cos) or the same without
    normalisation (kind "l2").
    """
    if z.dim() != 3 or z.shape[1] % 2:
        raise ValueError(f"expected z of shape [B, 2K, d], got {tuple(z.shape)}")
    if kind == "cosine":
        z = F.normalize(z, dim=-1, eps=1e-12)
    elif kind != "l2":
        raise ValueError(f"unknown loss kind {kind!r}; choose one of {LOSS_KINDS}")
    first, second = z[:, 0::2], z[:, 1::2]
    return (first - second).pow(2).sum(-1).mean(-1)
