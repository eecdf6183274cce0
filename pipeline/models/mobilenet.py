"""MobileNetV2 and MobileNetV3 (large, small) in plain torch, with torchvision's layout.

MobileNetV2: `features.0` stem, `features.1..17` inverted residuals (`features.N.conv.M`),
`features.18` the 1x1 conv to 1280; classifier `classifier.1` (after a dropout).
MobileNetV3: `features.0` stem, inverted residuals `features.N.block.M` (squeeze-excitation
`block.M.fc1`/`fc2` as 1x1 convs), a last 1x1 conv (`features.16` / `features.12`); the
classifier is `classifier.0` (Linear to 1280 / 1024), Hardswish, dropout, `classifier.3`.

As a feature backbone (`num_classes=0`) V2 returns the 1280 pooled features. V3 keeps its
pre-logit layer `classifier.0` (+ Hardswish) and returns its 1280 / 1024 outputs, the
"features before the classifier's Linear" of a torchvision checkpoint; `pre_logits=False`
stops at the pooled 960 / 576 conv features instead (for checkpoints trained with
`classifier = Identity`). The dropped head's checkpoint keys are listed in `head_prefixes`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .common import NormFactory, SqueezeExcitation, batch_norm, conv_norm_act, init_conv_bn_linear
from .common import make_divisible as _div

# (expansion t, output channels c, repeats n, first stride s), as in the MobileNetV2 paper.
MOBILENET_V2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip


class InvertedResidualV2(nn.Module):
    """1x1 expand (when t > 1), 3x3 depthwise, linear 1x1 project; residual when shapes allow."""

    def __init__(self, inp: int, oup: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_norm_act(inp, hidden, 1, act=nn.ReLU6))
        layers += [
            conv_norm_act(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and inp == oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """torchvision-compatible MobileNetV2 (width 1.0); 1280 features when `num_classes=0`."""

    def __init__(self, in_channels: int = 3, num_classes: int = 0, dropout: float = 0.2) -> None:
        super().__init__()
        inp, last = 32, 1280
        layers: list[nn.Module] = [conv_norm_act(in_channels, inp, 3, 2, act=nn.ReLU6)]
        for t, c, n, s in MOBILENET_V2:
            for i in range(n):
                layers.append(InvertedResidualV2(inp, c, s if i == 0 else 1, t))
                inp = c
        layers.append(conv_norm_act(inp, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        head = [nn.Dropout(dropout), nn.Linear(last, num_classes)] if num_classes > 0 else []
        self.classifier = nn.Sequential(*head)
        self.out_dim = num_classes if num_classes > 0 else last
        self.head_prefixes = () if num_classes > 0 else ("classifier.",)
        init_conv_bn_linear(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


@dataclass(frozen=True)
class BneckV3:
    """One MobileNetV3 block: input, kernel, expanded and output channels, SE, act, stride."""

    inp: int
    kernel: int
    expanded: int
    out: int
    se: bool
    hardswish: bool
    stride: int


def _v3(rows: list[tuple[int, int, int, int, bool, str, int]]) -> tuple[BneckV3, ...]:
    return tuple(BneckV3(i, k, e, o, se, act == "HS", s) for i, k, e, o, se, act, s in rows)


# Rows of Table 1 / Table 2 of "Searching for MobileNetV3" (channel counts already multiples of 8).
MOBILENET_V3_LARGE = _v3([
    (16, 3, 16, 16, False, "RE", 1), (16, 3, 64, 24, False, "RE", 2),
    (24, 3, 72, 24, False, "RE", 1), (24, 5, 72, 40, True, "RE", 2),
    (40, 5, 120, 40, True, "RE", 1), (40, 5, 120, 40, True, "RE", 1),
    (40, 3, 240, 80, False, "HS", 2), (80, 3, 200, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1), (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 480, 112, True, "HS", 1), (112, 3, 672, 112, True, "HS", 1),
    (112, 5, 672, 160, True, "HS", 2), (160, 5, 960, 160, True, "HS", 1),
    (160, 5, 960, 160, True, "HS", 1),
])  # fmt: skip
MOBILENET_V3_SMALL = _v3([
    (16, 3, 16, 16, True, "RE", 2), (16, 3, 72, 24, False, "RE", 2),
    (24, 3, 88, 24, False, "RE", 1), (24, 5, 96, 40, True, "HS", 2),
    (40, 5, 240, 40, True, "HS", 1), (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 120, 48, True, "HS", 1), (48, 5, 144, 48, True, "HS", 1),
    (48, 5, 288, 96, True, "HS", 2), (96, 5, 576, 96, True, "HS", 1),
    (96, 5, 576, 96, True, "HS", 1),
])  # fmt: skip


class InvertedResidualV3(nn.Module):
    """Optional 1x1 expand, depthwise kxk, optional squeeze-excitation, linear 1x1 project."""

    def __init__(self, cfg: BneckV3, norm: NormFactory) -> None:
        super().__init__()
        act: Callable[[], nn.Module] = nn.Hardswish if cfg.hardswish else nn.ReLU
        layers: list[nn.Module] = []
        if cfg.expanded != cfg.inp:
            layers.append(conv_norm_act(cfg.inp, cfg.expanded, 1, norm=norm, act=act))
        layers.append(
            conv_norm_act(
                cfg.expanded, cfg.expanded, cfg.kernel, cfg.stride, cfg.expanded, norm, act
            )
        )
        if cfg.se:
            squeeze = _div(cfg.expanded // 4, 8)
            layers.append(SqueezeExcitation(cfg.expanded, squeeze, gate=nn.Hardsigmoid))
        layers.append(conv_norm_act(cfg.expanded, cfg.out, 1, norm=norm, act=None))
        self.block = nn.Sequential(*layers)
        self.use_residual = cfg.stride == 1 and cfg.inp == cfg.out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV3(nn.Module):
    """torchvision-compatible MobileNetV3 (width 1.0). See the module docstring for the head."""

    def __init__(
        self,
        setting: tuple[BneckV3, ...],
        last_channel: int,
        in_channels: int = 3,
        num_classes: int = 0,
        pre_logits: bool = True,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        norm = batch_norm(eps=1e-3, momentum=0.01)
        layers: list[nn.Module] = [
            conv_norm_act(in_channels, setting[0].inp, 3, 2, norm=norm, act=nn.Hardswish)
        ]
        layers += [InvertedResidualV3(cfg, norm) for cfg in setting]
        conv_out = 6 * setting[-1].out
        layers.append(conv_norm_act(setting[-1].out, conv_out, 1, norm=norm, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        head: list[nn.Module] = []
        if num_classes > 0 or pre_logits:
            head += [nn.Linear(conv_out, last_channel), nn.Hardswish()]
        if num_classes > 0:
            head += [nn.Dropout(dropout), nn.Linear(last_channel, num_classes)]
        self.classifier = nn.Sequential(*head)
        self.out_dim = num_classes or (last_channel if pre_logits else conv_out)
        if num_classes > 0:
            self.head_prefixes: tuple[str, ...] = ()
        else:
            self.head_prefixes = ("classifier.3.",) if pre_logits else ("classifier.",)
        init_conv_bn_linear(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def mobilenet_v2(in_channels: int = 3, num_classes: int = 0, **kwargs: float) -> MobileNetV2:
    """MobileNetV2 (width 1.0); 1280 features when `num_classes=0`."""
    return MobileNetV2(in_channels, num_classes, **kwargs)


def mobilenet_v3_large(
    in_channels: int = 3, num_classes: int = 0, pre_logits: bool = True, **kwargs: float
) -> MobileNetV3:
    """MobileNetV3-Large; 1280 features (960 with `pre_logits=False`) when `num_classes=0`."""
    return MobileNetV3(MOBILENET_V3_LARGE, 1280, in_channels, num_classes, pre_logits, **kwargs)


def mobilenet_v3_small(
    in_channels: int = 3, num_classes: int = 0, pre_logits: bool = True, **kwargs: float
) -> MobileNetV3:
    """MobileNetV3-Small; 1024 features (576 with `pre_logits=False`) when `num_classes=0`."""
    return MobileNetV3(MOBILENET_V3_SMALL, 1024, in_channels, num_classes, pre_logits, **kwargs)
