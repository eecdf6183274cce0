"""Small encoders: `SmallCNN` for demos on tiny images, `TinyCNN` for exact-maths tests."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks, global average pool, linear head to `out_dim` features.

    Sized for 28x28 grayscale or 32x32 RGB images (any size works: the pool is adaptive).
    """

    def __init__(self, in_channels: int = 3, out_dim: int = 64, width: int = 32) -> None:
        super().__init__()
        w1, w2, w3 = width, 2 * width, 4 * width
        self.conv1 = nn.Conv2d(in_channels, w1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.conv2 = nn.Conv2d(w1, w2, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w2)
        self.conv3 = nn.Conv2d(w2, w3, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(w3)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class TinyCNN(nn.Module):
    """Two strided convs, no BatchNorm: small enough (~400 parameters for RGB) that tests can
    compare against exact per-example gradients and dense curvature matrices.

    The first conv has a bias and the second not, so both layer kinds are exercised.
    """

    def __init__(self, in_channels: int = 3, hidden: int = 4, out_dim: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden, 3, stride=2, padding=1, bias=True)
        self.conv2 = nn.Conv2d(hidden, out_dim, 3, stride=2, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        return torch.flatten(self.pool(x), 1)


class MixedNet(nn.Module):
    """Every layer variant the gradient maths handles, in ~320 parameters (1-channel input).

    Conv2d with stride, padding and bias; Conv2d without bias; Linear with and without bias.
    Small enough for exact per-example gradients and dense Fisher inverses in tests and in
    the agreement benchmarks.
    """

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
