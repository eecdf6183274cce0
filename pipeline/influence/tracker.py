"""Select layers, hook them, and turn one forward/backward into per-example projected rows.

The tracker is the only place that touches the model's internals. A capture yields, for each
tracked layer, `a~` [B, R, k_in] and `delta~` [B, R, k_out] where R runs over every view of
the example and every position; the projected per-example gradient is then
`G~ = sum_r delta~_r a~_r^T` (see `LayerRows.gradient`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.config import LayerConfig, ProjectionConfig
from pipeline.influence.layers import LayerAdapter, adapter_for
from pipeline.influence.projection import projection_matrix


@dataclass
class TrackedLayer:
    """One tracked layer with its projection (None = identity on that side)."""

    name: str
    module: nn.Module
    adapter: LayerAdapter
    features_in: int  # I (+1 for the bias)
    features_out: int  # O
    p_in: torch.Tensor | None
    p_out: torch.Tensor | None

    @property
    def dim_in(self) -> int:
        return self.features_in if self.p_in is None else self.p_in.shape[0]

    @property
    def dim_out(self) -> int:
        return self.features_out if self.p_out is None else self.p_out.shape[0]

    def describe(self) -> dict:
        return {
            "name": self.name,
            "type": type(self.module).__name__,
            "features_in": self.features_in,
            "features_out": self.features_out,
            "dim_in": self.dim_in,
            "dim_out": self.dim_out,
        }


@dataclass
class LayerRows:
    """Projected rows of one layer for a batch of examples."""

    a: torch.Tensor  # [B, R, k_in]
    d: torch.Tensor  # [B, R, k_out]

    def gradient(self) -> torch.Tensor:
        """Per-example projected gradient G~ [B, k_out, k_in]."""
        return torch.einsum("bro,bri->boi", self.d, self.a)


@dataclass
class Capture:
    """What the hooks saw during one forward/backward; per call of each layer."""

    inputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    grads: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)

    def rows(self, num_examples: int) -> dict[str, LayerRows]:
        """Group the captured image rows by example: image i belongs to example i // views."""
        out = {}
        for name, inputs in self.inputs.items():
            grads = self.grads.get(name, {})
            if len(grads) != len(inputs):
                raise RuntimeError(
                    f"layer {name!r} got {len(inputs)} forward calls but {len(grads)} "
                    "gradients: it is not on the path from the input to the loss"
                )
            a = [_by_example(x, num_examples) for x in inputs]
            d = [_by_example(grads[i], num_examples) for i in range(len(inputs))]
            out[name] = LayerRows(torch.cat(a, dim=1), torch.cat(d, dim=1))
        return out


def _by_example(rows: torch.Tensor, num_examples: int) -> torch.Tensor:
    return rows.reshape(num_examples, -1, rows.shape[-1])


def select_layers(model: nn.Module, layers: LayerConfig) -> tuple[list[str], dict[str, str]]:
    """Names of the layers to track, and the matched-but-skipped ones with the reason."""
    active = getattr(model, "active_module_prefixes", None)
    prefixes = tuple(active()) if callable(active) else ("",)
    chosen, skipped = [], {}
    for name, module in model.named_modules():
        adapter = adapter_for(module)
        if adapter is None or not name.startswith(prefixes):
            continue
        if not any(fnmatch.fnmatchcase(name, p) for p in layers.include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in layers.exclude):
            continue
        reason = adapter.unsupported(module)
        if reason:
            skipped[name] = reason
        else:
            chosen.append(name)
    if not chosen:
        available = [n for n, m in model.named_modules() if adapter_for(m) is not None]
        raise ValueError(
            f"no layer selected by include={layers.include} exclude={layers.exclude}; "
            f"Linear/Conv2d layers in this model: {available[:20]}"
            + (f"; skipped as unsupported: {skipped}" if skipped else "")
        )
    return chosen, skipped


def layer_dims(name: str, projection: ProjectionConfig) -> tuple[int, int]:
    """(dim_in, dim_out) for a layer: the first matching per-layer override, else the default."""
    for pattern, dims in projection.per_layer.items():
        if fnmatch.fnmatchcase(name, pattern):
            return int(dims[0]), int(dims[1])
    return projection.dim_in, projection.dim_out


class GradientTracker:
    """Hooks the selected Linear/Conv2d layers of `model` and captures projected rows."""

    def __init__(self, model: nn.Module, layers: LayerConfig, projection: ProjectionConfig):
        self.model = model
        names, self.skipped = select_layers(model, layers)
        modules = dict(model.named_modules())
        device = next(model.parameters()).device
        self.layers = [self._track(n, modules[n], projection, device) for n in names]

    @staticmethod
    def _track(name, module, projection: ProjectionConfig, device) -> TrackedLayer:
        adapter = adapter_for(module)
        f_in, f_out = adapter.input_features(module), adapter.output_features(module)
        p_in = p_out = None
        if projection.enabled:
            dim_in, dim_out = layer_dims(name, projection)
            p_in = projection_matrix(projection.seed, name, "in", dim_in, f_in, projection.kind)
            p_out = projection_matrix(projection.seed, name, "out", dim_out, f_out, projection.kind)
        p_in = None if p_in is None else p_in.to(device)
        p_out = None if p_out is None else p_out.to(device)
        return TrackedLayer(name, module, adapter, f_in, f_out, p_in, p_out)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def dimension(self) -> int:
        """Length of the concatenated projected gradient of all tracked layers."""
        return sum(layer.dim_in * layer.dim_out for layer in self.layers)

    def to(self, device: torch.device | str) -> GradientTracker:
        for layer in self.layers:
            layer.p_in = None if layer.p_in is None else layer.p_in.to(device)
            layer.p_out = None if layer.p_out is None else layer.p_out.to(device)
        return self

    @contextmanager
    def capture(self) -> Iterator[Capture]:
        """Record projected inputs (forward) and output gradients (backward) of each layer."""
        capture = Capture()
        handles = [
            layer.module.register_forward_hook(self._forward_hook(layer, capture))
            for layer in self.layers
        ]
        try:
            yield capture
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def _forward_hook(layer: TrackedLayer, capture: Capture):
        def hook(module, inputs, output):
            calls = capture.inputs.setdefault(layer.name, [])
            call = len(calls)
            x = inputs[0].detach()
            # Projections stay in float32 even when the model runs under bf16 autocast.
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                calls.append(layer.adapter.project_input(module, x, layer.p_in))
            if output.requires_grad:
                output.register_hook(_grad_hook(layer, capture, call))
                return None
            if not torch.is_grad_enabled():
                return None
            # The first tracked layer: the graph starts at its output, so the backward never
            # runs through (or computes input gradients of) anything before it. The clone
            # keeps in-place ops that follow (ReLU(inplace=True)) off the leaf.
            leaf = output.detach().requires_grad_(True)
            leaf.register_hook(_grad_hook(layer, capture, call))
            return leaf.clone()

        return hook


def _grad_hook(layer: TrackedLayer, capture: Capture, call: int):
    def hook(grad: torch.Tensor) -> None:
        with torch.no_grad():
            rows = layer.adapter.project_output_grad(layer.module, grad, layer.p_out)
        capture.grads.setdefault(layer.name, {})[call] = rows

    return hook
