"""No curvature: w(x) is the projected gradient itself (TracIn-style gradient dot product)."""

from __future__ import annotations

import torch

from pipeline.influence.curvature.base import Curvature, ProjectedBatch, flatten
from pipeline.influence.statistics import Statistics


class IdentityCurvature(Curvature):
    kind = "identity"
    passes = ()

    def _accumulate(self, pass_name: str, stats: Statistics, batch: ProjectedBatch) -> None:
        raise AssertionError("identity curvature has no passes")

    def _complete(self, pass_name: str, stats: Statistics) -> None:
        raise AssertionError("identity curvature has no passes")

    def _whiten(self, gradients: dict[str, torch.Tensor]) -> torch.Tensor:
        return flatten(gradients, self.layers)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor], completed: list[str]) -> None:
        self.completed = list(completed)
