"""Dense empirical Fisher of the projected gradients, per layer or across all layers.

One pass "fisher": F = E_x[g~ g~^T] per block (a block is one layer, or every layer
concatenated), eigendecomposed in float64 as U D U^T. Whitening: (D + lambda)^-1/2 U^T g~,
so <w(q), w(t)> = g~_q^T (F + lambda I)^-1 g~_t exactly, within the block structure.
"""

from __future__ import annotations

import torch

from pipeline.influence.curvature.base import (
    Curvature,
    LayerShape,
    ProjectedBatch,
    check_fitted,
    damping,
    flatten,
    symmetric_eigh,
)
from pipeline.influence.statistics import Statistics


class DenseCurvature(Curvature):
    kind = "dense"
    passes = ("fisher",)
    gradients_only = True

    def __init__(self, layers, config, across_layers: bool = False) -> None:
        super().__init__(layers, config)
        self.kind = "dense_all" if across_layers else "dense"
        self.blocks: list[list[LayerShape]] = (
            [self.layers] if across_layers else [[layer] for layer in self.layers]
        )
        for block in self.blocks:
            size = sum(layer.size for layer in block)
            if size > config.max_dense_dim:
                raise ValueError(
                    f"dense curvature block of dimension {size} exceeds max_dense_dim="
                    f"{config.max_dense_dim}; lower the projection dims, use per-layer "
                    "'dense' or 'ekfac'"
                )
        self.factors: dict[int, dict[str, torch.Tensor]] = {}

    def _accumulate(self, pass_name: str, stats: Statistics, batch: ProjectedBatch) -> None:
        gradients = batch.gradients()
        for index, block in enumerate(self.blocks):
            g = flatten(gradients, block).to(torch.float64)
            stats.add(f"block{index}/F", g.T @ g, g.shape[0])

    def _complete(self, pass_name: str, stats: Statistics) -> None:
        fishers = {
            self._block_name(b): stats.mean(f"block{i}/F") for i, b in enumerate(self.blocks)
        }
        check_fitted(fishers, stats.counts["block0/F"])
        for index, fisher in enumerate(fishers.values()):
            name = f"block{index}/F"
            values, vectors = symmetric_eigh(fisher)
            lam = damping(values, self.config, stats.counts[name])
            lam = torch.tensor(lam, dtype=torch.float64)
            self.factors[index] = {"U": vectors, "D": values, "lambda": lam}

    def _block_name(self, block: list[LayerShape]) -> str:
        if len(self.blocks) == 1 and len(self.layers) > 1:
            return f"all {len(block)} tracked layers"
        return block[0].name

    def _whiten(self, gradients: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        for index, block in enumerate(self.blocks):
            g = flatten(gradients, block)
            f = self.cast_factors(index, self.factors[index], g)
            parts.append((g @ f["U"]) / (f["D"] + f["lambda"]).sqrt())
        return torch.cat(parts, dim=1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            f"block{index}/{key}": value
            for index, factors in self.factors.items()
            for key, value in factors.items()
        }

    def load_state_dict(self, state: dict[str, torch.Tensor], completed: list[str]) -> None:
        self.factors = {}
        for key, value in state.items():
            block, part = key.split("/", 1)
            self.factors.setdefault(int(block[len("block") :]), {})[part] = value.to(torch.float64)
        self.completed = list(completed)
        self._cast.clear()
