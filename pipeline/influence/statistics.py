"""Mergeable partial sums: what a worker returns and one reduce combines.

A `Statistics` is a bag of named float64 sums, each with the count of items it summed. Sums
and counts add, so statistics of disjoint splits merged equal those of the whole, in any
order and any grouping. Exported as a flat dict of tensors (safetensors-friendly, no pickle).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class Statistics:
    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, value: torch.Tensor, count: int) -> None:
        """Add `value` (a sum over `count` items) to the running sum `name`."""
        value = value.detach().to(torch.float64)
        if name in self.sums:
            self.sums[name] += value
        else:
            self.sums[name] = value.clone()
        self.counts[name] = self.counts.get(name, 0) + int(count)

    def mean(self, name: str) -> torch.Tensor:
        if self.counts.get(name, 0) == 0:
            raise ValueError(f"no data accumulated for {name!r}: was the pass run on any example?")
        return self.sums[name] / self.counts[name]

    def merge(self, other: Statistics) -> Statistics:
        """Add `other` into this one (in place) and return self."""
        for name, value in other.sums.items():
            self.add(name, value.to(self._device(value)), other.counts[name])
        return self

    def _device(self, value: torch.Tensor) -> torch.device:
        existing = next(iter(self.sums.values()), None)
        return value.device if existing is None else existing.device

    @classmethod
    def merged(cls, parts: Iterable[Statistics]) -> Statistics:
        total = cls()
        for part in parts:
            total.merge(part)
        return total

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat, CPU, contiguous tensors: `sum/<name>` and `count/<name>`."""
        out = {}
        for name, value in self.sums.items():
            out[f"sum/{name}"] = value.cpu().contiguous()
            out[f"count/{name}"] = torch.tensor(self.counts[name], dtype=torch.int64)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> Statistics:
        stats = cls()
        for key, value in tensors.items():
            if key.startswith("sum/"):
                name = key[len("sum/") :]
                stats.sums[name] = value.to(torch.float64).clone()
                stats.counts[name] = int(tensors[f"count/{name}"])
        return stats

    def __repr__(self) -> str:
        return f"Statistics({', '.join(f'{k}: n={v}' for k, v in self.counts.items())})"
