"""ConvNeXt-T in plain torch, with torchvision's module names and state-dict layout.

`features` holds the stem (`features.0.0` 4x4 conv, `features.0.1` LayerNorm2d), the four
stages of `CNBlock`s (`features.1`, `.3`, `.5`, `.7`) and the three downsamplers between them
(`features.2`, `.4`, `.6`: LayerNorm2d then a 2x2 stride-2 conv). The classifier is
`classifier.0` (LayerNorm2d), a flatten, and `classifier.2` (the Linear); as a feature
backbone (`num_classes=0`) the model returns the normalised pooled features, and a
checkpoint's `classifier.2.*` is dropped on load (`head_prefixes`).

Stochastic depth is left out: torchvision's is the identity in eval mode, the only mode the
pipeline runs encoders in.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import LayerNorm2d, Permute

CONVNEXT_TINY = ((96, 3), (192, 3), (384, 9), (768, 3))  # (width, blocks) per stage


class CNBlock(nn.Module):
    """Depthwise 7x7 conv, LayerNorm, Linear 4x up, GELU, Linear down, per-channel scale."""

    def __init__(self, dim: int, layer_scale: float = 1e-6) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Linear(4 * dim, dim),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale * self.block(x)


class ConvNeXt(nn.Module):
    """torchvision-compatible ConvNeXt; `num_classes=0` for a `out_dim`-wide feature backbone."""

    def __init__(
        self,
        stages: tuple[tuple[int, int], ...] = CONVNEXT_TINY,
        in_channels: int = 3,
        num_classes: int = 0,
        layer_scale: float = 1e-6,
    ) -> None:
        super().__init__()
        first = stages[0][0]
        layers: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(in_channels, first, 4, stride=4), LayerNorm2d(first, eps=1e-6))
        ]
        for i, (width, blocks) in enumerate(stages):
            layers.append(nn.Sequential(*(CNBlock(width, layer_scale) for _ in range(blocks))))
            if i + 1 < len(stages):
                nxt = stages[i + 1][0]
                layers.append(
                    nn.Sequential(LayerNorm2d(width, eps=1e-6), nn.Conv2d(width, nxt, 2, stride=2))
                )
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        last = stages[-1][0]
        head: list[nn.Module] = [LayerNorm2d(last, eps=1e-6), nn.Flatten(1)]
        if num_classes > 0:
            head.append(nn.Linear(last, num_classes))
        self.classifier = nn.Sequential(*head)
        self.out_dim = num_classes if num_classes > 0 else last
        self.head_prefixes = () if num_classes > 0 else ("classifier.2.",)
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's init: truncated normal (std 0.02) convs and linears, zero biases.
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


def convnext_tiny(in_channels: int = 3, num_classes: int = 0, **kwargs: float) -> ConvNeXt:
    """ConvNeXt-T (stages 96/192/384/768 x 3/3/9/3); 768 features when `num_classes=0`."""
    return ConvNeXt(CONVNEXT_TINY, in_channels, num_classes, **kwargs)
