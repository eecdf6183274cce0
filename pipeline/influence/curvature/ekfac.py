"""Projected EK-FAC: Kronecker eigenbases with an eigenvalue correction, per layer.

Pass "covariance": A = E[a~ a~^T], S = E[d~ d~^T] over examples and positions, then
eigenbases Q_A, Q_S (float64). Pass "eigencorrection": L = E_x[(Q_S^T G~(x) Q_A)^2], the
empirical Fisher's diagonal in that basis. Whitening: (Q_S^T G~ Q_A) / sqrt(L + lambda).
"""

from __future__ import annotations

import torch

from pipeline.influence.curvature.base import (
    Curvature,
    ProjectedBatch,
    check_fitted,
    damping,
    symmetric_eigh,
)
from pipeline.influence.statistics import Statistics


def rotate(gradient: torch.Tensor, q_out: torch.Tensor, q_in: torch.Tensor) -> torch.Tensor:
    """Q_S^T G Q_A for a batch of gradients G [B, o, i]."""
    return q_out.T @ gradient @ q_in


class EkfacCurvature(Curvature):
    kind = "ekfac"
    passes = ("covariance", "eigencorrection")

    def __init__(self, layers, config) -> None:
        super().__init__(layers, config)
        self.factors: dict[str, dict[str, torch.Tensor]] = {}

    def _accumulate(self, pass_name: str, stats: Statistics, batch: ProjectedBatch) -> None:
        if pass_name == "covariance":
            rows = batch.require_rows()
            for layer in self.layers:
                a = rows[layer.name].a.reshape(-1, layer.dim_in).to(torch.float64)
                d = rows[layer.name].d.reshape(-1, layer.dim_out).to(torch.float64)
                stats.add(f"{layer.name}/A", a.T @ a, a.shape[0])
                stats.add(f"{layer.name}/S", d.T @ d, d.shape[0])
            return
        gradients = batch.gradients()
        for layer in self.layers:
            f = self.factors[layer.name]
            rotated = rotate(gradients[layer.name].to(torch.float64), f["Q_S"], f["Q_A"])
            stats.add(f"{layer.name}/L", rotated.pow(2).sum(0), rotated.shape[0])

    def _complete(self, pass_name: str, stats: Statistics) -> None:
        # A layer with zero output gradients (S) or zero inputs (A) has zero gradients: refused
        # after the first pass, not after the second. Per layer, the smaller moment's sum.
        parts = ("A", "S") if pass_name == "covariance" else ("L",)
        moments = {
            layer.name: torch.stack(
                [stats.mean(f"{layer.name}/{p}").abs().sum() for p in parts]
            ).amin()
            for layer in self.layers
        }
        first = f"{self.layers[0].name}/L"
        check_fitted(moments, stats.counts[first] if pass_name != "covariance" else None)
        for layer in self.layers:
            if pass_name == "covariance":
                _, q_in = symmetric_eigh(stats.mean(f"{layer.name}/A"))
                _, q_out = symmetric_eigh(stats.mean(f"{layer.name}/S"))
                self.factors[layer.name] = {"Q_A": q_in, "Q_S": q_out}
            else:
                name = f"{layer.name}/L"
                corrected = stats.mean(name)
                f = self.factors[layer.name]
                f["L"] = corrected
                lam = damping(corrected, self.config, stats.counts[name])
                f["lambda"] = torch.tensor(lam, dtype=torch.float64)

    def _whiten(self, gradients: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        for layer in self.layers:
            g = gradients[layer.name]
            f = self.cast_factors(layer.name, self.factors[layer.name], g)
            parts.append((rotate(g, f["Q_S"], f["Q_A"]) / (f["L"] + f["lambda"]).sqrt()).flatten(1))
        return torch.cat(parts, dim=1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            f"{name}/{key}": value
            for name, factors in self.factors.items()
            for key, value in factors.items()
        }

    def load_state_dict(self, state: dict[str, torch.Tensor], completed: list[str]) -> None:
        self.factors = {}
        for key, value in state.items():
            name, part = key.rsplit("/", 1)
            self.factors.setdefault(name, {})[part] = value.to(torch.float64)
        self.completed = list(completed)
        self._cast.clear()
