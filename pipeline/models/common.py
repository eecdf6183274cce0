"""Building blocks shared by the built-in encoders, laid out as torchvision lays them out.

torchvision's `Conv2dNormActivation` is an `nn.Sequential` of (conv, norm, activation), so its
parameters are keyed `<name>.0.*` (conv) and `<name>.1.*` (norm); `conv_norm_act` builds the
same layout. Activations here are never in-place: the influence tracker hooks layer outputs,
and an in-place op on one would corrupt the captured tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import UserError


class ModelError(UserError, ValueError):
    """A model setting that cannot work: unknown arch, bad kwargs, an input of the wrong size."""


NormFactory = Callable[[int], nn.Module]


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of `divisor`, never more than 10% below `value`
    (the rounding rule MobileNet/EfficientNet channel tables are defined with)."""
    floor = divisor if min_value is None else min_value
    rounded = max(floor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def conv_norm_act(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: int = 1,
    groups: int = 1,
    norm: NormFactory = nn.BatchNorm2d,
    act: Callable[[], nn.Module] | None = nn.ReLU,
) -> nn.Sequential:
    """Conv (no bias: the norm has one) + norm + optional activation, "same" padding."""
    conv = nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=(kernel_size - 1) // 2,
        groups=groups,
        bias=False,
    )
    layers: list[nn.Module] = [conv, norm(out_channels)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """Channel gating: pool, 1x1 conv down, activation, 1x1 conv up, gate (`fc1`/`fc2` keys)."""

    def __init__(
        self,
        channels: int,
        squeeze: int,
        act: Callable[[], nn.Module] = nn.ReLU,
        gate: Callable[[], nn.Module] = nn.Sigmoid,
    ) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = act()
        self.scale_activation = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return x * self.scale_activation(scale)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (keys `weight`, `bias`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    """`torch.permute` as a module, so it can sit inside an `nn.Sequential`."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


def batch_norm(eps: float = 1e-5, momentum: float = 0.1) -> NormFactory:
    """BatchNorm2d factory with non-default eps/momentum (MobileNetV3 uses 1e-3 / 0.01)."""
    return partial(nn.BatchNorm2d, eps=eps, momentum=momentum)


def init_conv_bn_linear(model: nn.Module, linear_std: float | None = 0.01) -> None:
    """torchvision's MobileNet/EfficientNet init: Kaiming fan-out convs, unit norms,
    small-normal Linear layers (`linear_std=None` keeps PyTorch's default Linear init)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)
