"""Projection heads put on top of a backbone (SimCLR/BYOL style)."""

from __future__ import annotations

import itertools

import torch
from torch import nn


class ProjectorMLP(nn.Module):
    """MLP `in_dim -> dims[0] -> ... -> dims[-1]`.

    Hidden layers are Linear -> BatchNorm1d -> ReLU; the last is a plain Linear, as in
    SimCLR/BYOL. Kept in `self.layers` so keys read `layers.0.weight`, `layers.1.running_mean`...
    """

    def __init__(self, in_dim: int, dims: list[int]) -> None:
        super().__init__()
        if not dims:
            raise ValueError("ProjectorMLP needs at least one output width in `dims`")
        modules: list[nn.Module] = []
        widths = [in_dim, *dims]
        for i, (d_in, d_out) in enumerate(itertools.pairwise(widths)):
            modules.append(nn.Linear(d_in, d_out))
            if i < len(dims) - 1:
                modules += [nn.BatchNorm1d(d_out), nn.ReLU()]
        self.layers = nn.Sequential(*modules)
        self.in_dim = in_dim
        self.out_dim = dims[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
