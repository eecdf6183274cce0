"""EfficientNet-B0 in plain torch, with torchvision's module names and state-dict layout.

`features.0` is the stem, `features.1..7` the seven MBConv stages (`features.S.B.block.M`:
optional 1x1 expand, depthwise kxk, squeeze-excitation `fc1`/`fc2`, linear 1x1 project),
`features.8` the 1x1 conv to 1280; the classifier is a dropout and `classifier.1`. As a
feature backbone (`num_classes=0`) the model returns the 1280 pooled features and a
checkpoint's `classifier.*` is dropped on load (`head_prefixes`).

Stochastic depth is left out: torchvision's is the identity in eval mode, the only mode the
pipeline runs encoders in.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import SqueezeExcitation, conv_norm_act, init_conv_bn_linear, make_divisible

# (expand ratio, kernel, first stride, input channels, output channels, blocks) per stage,
# Table 1 of the EfficientNet paper (B0: width and depth multipliers 1.0).
EFFICIENTNET_B0 = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2),
                   (6, 3, 2, 40, 80, 3), (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4),
                   (6, 3, 1, 192, 320, 1))  # fmt: skip


class MBConv(nn.Module):
    """Mobile inverted bottleneck with squeeze-excitation (SiLU activations)."""

    def __init__(self, expand: int, kernel: int, stride: int, inp: int, out: int) -> None:
        super().__init__()
        hidden = make_divisible(inp * expand, 8)
        layers: list[nn.Module] = []
        if hidden != inp:
            layers.append(conv_norm_act(inp, hidden, 1, act=nn.SiLU))
        layers += [
            conv_norm_act(hidden, hidden, kernel, stride, groups=hidden, act=nn.SiLU),
            SqueezeExcitation(hidden, max(1, inp // 4), act=nn.SiLU),
            conv_norm_act(hidden, out, 1, act=None),
        ]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and inp == out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class EfficientNet(nn.Module):
    """torchvision-compatible EfficientNet (V1); `num_classes=0` for a feature backbone."""

    def __init__(
        self,
        stages: tuple[tuple[int, ...], ...] = EFFICIENTNET_B0,
        in_channels: int = 3,
        num_classes: int = 0,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_norm_act(in_channels, stages[0][3], 3, 2, act=nn.SiLU)]
        for expand, kernel, stride, inp, out, blocks in stages:
            stage = [
                MBConv(expand, kernel, stride if i == 0 else 1, inp if i == 0 else out, out)
                for i in range(blocks)
            ]
            layers.append(nn.Sequential(*stage))
        last_in = stages[-1][4]
        last = 4 * last_in
        layers.append(conv_norm_act(last_in, last, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        head = [nn.Dropout(dropout), nn.Linear(last, num_classes)] if num_classes > 0 else []
        self.classifier = nn.Sequential(*head)
        self.out_dim = num_classes if num_classes > 0 else last
        self.head_prefixes = () if num_classes > 0 else ("classifier.",)
        init_conv_bn_linear(self, linear_std=None)
        for m in self.classifier.modules():
            if isinstance(m, nn.Linear):  # torchvision: uniform in +-1/sqrt(out_features)
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def efficientnet_b0(in_channels: int = 3, num_classes: int = 0, **kwargs: float) -> EfficientNet:
    """EfficientNet-B0; 1280 features when `num_classes=0`."""
    return EfficientNet(EFFICIENTNET_B0, in_channels, num_classes, **kwargs)
