"""Influence from index vectors: plain inner products of w (SPEC section 2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def influence(
    query_w: torch.Tensor, train_w: torch.Tensor, normalized: bool = False
) -> torch.Tensor:
    """I(q, t) = <w(q), w(t)> as [Q, N]; `normalized` gives cos(w(q), w(t)).

    Positive: t is a proponent (upweighting t lowers the query's loss).
    """
    if normalized:
        query_w, train_w = F.normalize(query_w, dim=1), F.normalize(train_w, dim=1)
    return query_w @ train_w.T


def self_influence(w: torch.Tensor) -> torch.Tensor:
    """s(x) = ||w(x)||^2, [N]."""
    return w.pow(2).sum(dim=1)


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices [Q, k] of the top proponents (largest) and top opponents (smallest) per row."""
    k = min(k, scores.shape[1])
    proponents = scores.topk(k, dim=1).indices
    opponents = scores.topk(k, dim=1, largest=False).indices
    return proponents, opponents
