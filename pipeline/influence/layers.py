"""Per-layer-type maths: how a layer's inputs and output gradients become rows.

A tracked layer's weight gradient for one image is `sum_p delta_p a_p^T` over positions `p`.
Each adapter turns the layer input into projected rows `a~_p = P_in a_p` (bias folded in as
a constant-1 input) and the output gradient into `delta~_p = P_out delta_p`, both shaped
[images, positions, k]. The full `a_p` of a large layer is never formed when projecting.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class LayerAdapter(Protocol):
    def input_features(self, module: nn.Module) -> int: ...

    def output_features(self, module: nn.Module) -> int: ...

    def unsupported(self, module: nn.Module) -> str | None: ...

    def project_input(
        self, module: nn.Module, x: torch.Tensor, p_in: torch.Tensor | None
    ) -> torch.Tensor: ...

    def project_output_grad(
        self, module: nn.Module, g: torch.Tensor, p_out: torch.Tensor | None
    ) -> torch.Tensor: ...


def _append_ones(rows: torch.Tensor) -> torch.Tensor:
    ones = rows.new_ones(*rows.shape[:-1], 1)
    return torch.cat([rows, ones], dim=-1)


def _project_rows(rows: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
    return rows if p is None else rows @ p.T


class LinearAdapter:
    """nn.Linear on [N, ..., I] inputs; every leading position (e.g. a token) is a row."""

    def input_features(self, module: nn.Module) -> int:
        return module.in_features + (module.bias is not None)

    def output_features(self, module: nn.Module) -> int:
        return module.out_features

    def unsupported(self, module: nn.Module) -> str | None:
        return None

    def project_input(self, module, x, p_in):
        rows = x.reshape(x.shape[0], -1, x.shape[-1]).float()
        if module.bias is None:
            return _project_rows(rows, p_in)
        if p_in is None:
            return _append_ones(rows)
        # P_in [a; 1] = P_in[:, :I] a + P_in[:, I]: no need to append the ones column.
        return rows @ p_in[:, :-1].T + p_in[:, -1]

    def project_output_grad(self, module, g, p_out):
        rows = g.reshape(g.shape[0], -1, g.shape[-1]).float()
        return _project_rows(rows, p_out)


class Conv2dAdapter:
    """nn.Conv2d (groups=1, zero padding): rows are output locations, inputs unfolded patches.

    Projecting unfolded patches with P_in is itself a convolution with P_in reshaped to
    [k_in, C, kh, kw] kernels, so the unfolded input is never materialised.
    """

    def input_features(self, module: nn.Module) -> int:
        c, kh, kw = module.weight.shape[1:]
        return c * kh * kw + (module.bias is not None)

    def output_features(self, module: nn.Module) -> int:
        return module.out_channels

    def unsupported(self, module: nn.Module) -> str | None:
        if module.groups != 1:
            return f"groups={module.groups} (only groups=1 is supported)"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (only 'zeros' is supported)"
        if isinstance(module.padding, str) and module.padding != "valid":
            return f"padding={module.padding!r} (give explicit padding)"
        return None

    def project_input(self, module, x, p_in):
        x = x.float()
        padding = 0 if module.padding == "valid" else module.padding
        if p_in is None:
            patches = F.unfold(
                x, module.kernel_size, module.dilation, padding, module.stride
            ).transpose(1, 2)
            return _append_ones(patches) if module.bias is not None else patches
        dim_in = p_in.shape[0]
        kernel = p_in[:, : module.weight[0].numel()].reshape(dim_in, *module.weight.shape[1:])
        bias = p_in[:, -1] if module.bias is not None else None
        out = F.conv2d(x, kernel, bias, module.stride, padding, module.dilation)
        return out.flatten(2).transpose(1, 2)

    def project_output_grad(self, module, g, p_out):
        rows = g.float().flatten(2).transpose(1, 2)
        return _project_rows(rows, p_out)


ADAPTERS: dict[type, LayerAdapter] = {nn.Linear: LinearAdapter(), nn.Conv2d: Conv2dAdapter()}


def adapter_for(module: nn.Module) -> LayerAdapter | None:
    """The adapter of a module's exact type (subclasses with other maths are not guessed)."""
    return ADAPTERS.get(type(module))


def weight_gradient(module: nn.Module) -> torch.Tensor:
    """A layer's `.grad` in the adapter's layout: [O, I] with the bias as the last column."""
    grad = module.weight.grad.reshape(module.weight.shape[0], -1)
    if module.bias is not None:
        grad = torch.cat([grad, module.bias.grad[:, None]], dim=1)
    return grad
