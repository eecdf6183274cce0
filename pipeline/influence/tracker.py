"""Select layers, hook them, and turn one forward/backward into per-example projected rows.

The tracker is the only place that touches the model's internals. A capture yields, for each
tracked layer, `a~` [B, R, k_in] and `delta~` [B, R, k_out] where R runs over every view of
the example and every position; the projected per-example gradient is then
`G~ = sum_r delta~_r a~_r^T` (see `LayerRows.gradient`; grouped convolutions hand on the
gradient itself). Module forward hooks see Linear and Conv2d layers; a MultiheadAttention
runs `attention.attention_forward` during a capture, which shows the hooks its projections.
Under autocast, Linear and Conv2d project in the autocast dtype (bf16) with copies of their
matrices in it, made once per device and dtype.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.config import LayerConfig, ProjectionConfig
from pipeline.influence.attention import attention_forward
from pipeline.influence.layers import (
    ExampleRows,
    LayerAdapter,
    LayerRows,
    adapter_for,
    batch_major,
)
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
    prepared: dict = field(default_factory=dict, repr=False, compare=False)

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The autocast dtype if autocast is on where the layer runs and its adapter projects
        in it (Linear, Conv2d), else float32."""
        device = x.device.type
        if hasattr(self.adapter, "prepare") and torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
        return torch.float32

    def projections(self, dtype: torch.dtype, device: torch.device) -> tuple:
        """(P_in, P_out) as the adapter applies them in `dtype` on `device`, made once."""
        key = (dtype, device)
        if key not in self.prepared:
            p_in, p_out = (None if p is None else p.to(device) for p in (self.p_in, self.p_out))
            prepare = getattr(self.adapter, "prepare", None)
            self.prepared[key] = (
                prepare(self.module, p_in, p_out, dtype) if prepare else (p_in, p_out)
            )
        return self.prepared[key]

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
class Capture:
    """What the hooks saw during one forward/backward: per layer, the calls made and the
    rows of each call whose output gradient has arrived."""

    calls: dict[str, int] = field(default_factory=dict)
    done: dict[str, dict[int, LayerRows]] = field(default_factory=dict)

    def start(self, name: str) -> int:
        self.calls[name] = self.calls.get(name, 0) + 1
        return self.calls[name] - 1

    def finish(self, name: str, call: int, rows: LayerRows) -> None:
        self.done.setdefault(name, {})[call] = rows

    def rows(self, num_examples: int) -> dict[str, LayerRows]:
        """Group the captured image rows by example: image i belongs to example i // views."""
        out: dict[str, LayerRows] = {}
        for name, calls in self.calls.items():
            done = self.done.get(name, {})
            if len(done) != calls:
                raise RuntimeError(
                    f"layer {name!r} got {calls} forward calls but {len(done)} "
                    "gradients: it is not on the path from the input to the loss"
                )
            out[name] = ExampleRows([done[i] for i in range(calls)], num_examples)
        return out


def active_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Module-name prefixes that get gradient from the model's forward (all by default)."""
    active = getattr(model, "active_module_prefixes", None)
    return tuple(active()) if callable(active) else ("",)


def is_active(name: str, prefixes: tuple[str, ...]) -> bool:
    """Whether module `name` is under an active prefix, or is the module a prefix names
    ("backbone" for "backbone."), whose own parameters (a ViT's cls_token and pos_embed)
    get gradient as well."""
    return name.startswith(prefixes) or f"{name}.".startswith(prefixes)


def select_layers(model: nn.Module, layers: LayerConfig) -> tuple[list[str], dict[str, str]]:
    """Names of the layers to track, and the matched-but-skipped ones with the reason."""
    prefixes = active_prefixes(model)
    chosen, skipped = [], {}
    for name, module in model.named_modules():
        adapter = adapter_for(module)
        if adapter is None or not is_active(name, prefixes):
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
            f"trackable layers in this model: {available[:20]}"
            + (f"; skipped as unsupported: {skipped}" if skipped else "")
        )
    return chosen, skipped


# Grouped / depthwise Conv2d: this share of the default dims per side. Their few weights per
# output channel (a 3x3 depthwise: 9) need less room, and MobileNet / EfficientNet have one
# per block: EfficientNet-B0 at 16 x 16 has D = 18,384 with them at 16 (per-layer dense
# only), 16,096 at 8 (within max_dense_dim, so the dense Fisher across all layers).
GROUPED_DIM_SHARE = 0.5


def layer_dims(
    name: str, projection: ProjectionConfig, module: nn.Module | None = None
) -> tuple[int, int]:
    """(dim_in, dim_out) for a layer: the first matching per-layer override, else the default
    (for a grouped or depthwise Conv2d, GROUPED_DIM_SHARE of it per side)."""
    for pattern, dims in projection.per_layer.items():
        if fnmatch.fnmatchcase(name, pattern):
            return int(dims[0]), int(dims[1])
    if isinstance(module, nn.Conv2d) and module.groups > 1:
        share = GROUPED_DIM_SHARE
        return max(1, int(projection.dim_in * share)), max(1, int(projection.dim_out * share))
    return projection.dim_in, projection.dim_out


# Normalisation layers: per-channel scales and shifts, not weight layers; never tracked and
# left out of the share of untracked parameters.
NORM_TYPES: tuple[type, ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
UNTRACKED_WARNING = 0.10  # warn at fit when more of the weight parameters are untracked


class GradientTracker:
    """Hooks the selected layers of `model` and captures projected rows."""

    def __init__(self, model: nn.Module, layers: LayerConfig, projection: ProjectionConfig):
        self.model = model
        names, self.skipped = select_layers(model, layers)
        modules = dict(model.named_modules())
        device = next(model.parameters()).device
        self.layers = [self._track(n, modules[n], projection, device) for n in names]
        # MultiheadAttention modules whose forward must run their projections in view, with
        # the tracked (in-projection, out_proj) layers of each.
        self.attention: dict[int, list] = {}
        for layer in self.layers:
            owner = _attention_owner(layer, modules)
            if owner is not None:
                entry = self.attention.setdefault(id(owner), [owner, None, None])
                entry[1 if owner is layer.module else 2] = layer

    @staticmethod
    def _track(name, module, projection: ProjectionConfig, device) -> TrackedLayer:
        adapter = adapter_for(module)
        f_in, f_out = adapter.input_features(module), adapter.output_features(module)
        p_in = p_out = None
        if projection.enabled:
            dim_in, dim_out = layer_dims(name, projection, module)
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
            layer.prepared.clear()
        return self

    @contextmanager
    def capture(self) -> Iterator[Capture]:
        """Record projected inputs (forward) and output gradients (backward) of each layer."""
        capture = Capture()
        handles = [
            layer.module.register_forward_hook(_forward_hook(layer, capture))
            for layer in self.layers
            if not any(layer is e for entry in self.attention.values() for e in entry[1:])
        ]
        swapped = []
        for mha, in_layer, out_layer in self.attention.values():
            swapped.append((mha, mha.__dict__.get("forward")))
            watch_in = _watch_attention_in(in_layer, capture) if in_layer else None
            watch_out = _watch_attention_out(out_layer, capture) if out_layer else None
            mha.forward = attention_forward(mha, watch_in, watch_out)
        try:
            yield capture
        finally:
            for handle in handles:
                handle.remove()
            for mha, previous in swapped:
                if previous is None:
                    del mha.forward
                else:
                    mha.forward = previous

    def coverage(self) -> dict:
        """Which parameters of the encoder the tracked layers cover, for the manifest.

        `tracked_layers`: name, type, parameters. `skipped_layers`: every other module with
        parameters of its own that get gradient (normalisation layers aside), with why; the
        backbone's own parameters (a ViT's cls_token, pos_embed) among them.
        `layer_parameters`: counts over the weight parameters, i.e. every parameter of an
        active module (`is_active`) except normalisation layers'.
        """
        covered = {
            id(getattr(layer.module, n))
            for layer in self.layers
            for n in layer.adapter.parameter_names(layer.module)
        }
        tracked = [
            {
                "name": layer.name,
                "type": type(layer.module).__name__,
                "parameters": _count(layer.module, layer.adapter.parameter_names(layer.module)),
            }
            for layer in self.layers
        ]
        skipped, total, norms = [], 0, 0
        prefixes = active_prefixes(self.model)
        for name, module in self.model.named_modules():
            own = dict(module.named_parameters(recurse=False))
            if not own or not is_active(name, prefixes):
                continue
            if isinstance(module, NORM_TYPES):
                norms += _count(module, list(own))
                continue
            total += _count(module, list(own))
            left = [n for n, p in own.items() if id(p) not in covered]
            if left:
                why = self._why_untracked(name, module, left, len(left) < len(own))
                skipped.append(
                    {
                        "name": name,
                        "type": type(module).__name__,
                        "parameters": _count(module, left),
                        "why": why,
                    }
                )
        untracked = sum(entry["parameters"] for entry in skipped)
        return {
            "tracked_layers": tracked,
            "skipped_layers": skipped,
            "layer_parameters": {
                "weight": total,
                "tracked": total - untracked,
                "untracked": untracked,
                "untracked_fraction": untracked / total if total else 0.0,
                "normalisation": norms,
            },
        }

    def _why_untracked(self, name: str, module: nn.Module, left: list[str], partly: bool) -> str:
        if partly:
            return f"parameters {', '.join(left)} are outside its tracked gradient"
        if name in self.skipped:
            return f"unsupported: {self.skipped[name]}"
        if adapter_for(module) is not None:
            return "not selected by layers.include / layers.exclude"
        why = f"no per-example gradient for {type(module).__name__} parameters"
        # A container's own parameters (a ViT's cls_token, pos_embed) are named.
        return why + (f" ({', '.join(left)})" if next(module.children(), None) else "")


def coverage_warning(coverage: dict) -> str | None:
    """A warning when more than UNTRACKED_WARNING of the weight parameters are untracked."""
    counts = coverage["layer_parameters"]
    if counts["untracked_fraction"] <= UNTRACKED_WARNING:
        return None
    largest = sorted(coverage["skipped_layers"], key=lambda e: -e["parameters"])[:3]
    named = "; ".join(f"{e['name'] or '(root)'} ({e['parameters']:,}: {e['why']})" for e in largest)
    return (
        f"{counts['untracked_fraction']:.0%} of the encoder's weight parameters "
        f"({counts['untracked']:,} of {counts['weight']:,}, normalisation layers aside) are not "
        f"tracked, so w(x) ignores them; largest: {named}. Check influence.layers, or see "
        "skipped_layers in the manifest"
    )


def _count(module: nn.Module, names: list[str]) -> int:
    return sum(getattr(module, n).numel() for n in names)


def _attention_owner(layer: TrackedLayer, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The MultiheadAttention that runs this layer: itself, or the parent of its out_proj."""
    if isinstance(layer.module, nn.MultiheadAttention):
        return layer.module
    parent = modules.get(layer.name.rpartition(".")[0])
    if isinstance(parent, nn.MultiheadAttention) and parent.out_proj is layer.module:
        return parent
    return None


def _kept(x: torch.Tensor, keep: Callable[[], object]) -> object:
    # Autocast off: each projection runs in the dtype its adapter was given (bf16 matrices
    # for bf16 inputs under autocast, float32 otherwise), never re-cast behind its back.
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        return keep()


def _watch(
    name: str, capture: Capture, output: torch.Tensor, finish: Callable[[torch.Tensor], LayerRows]
) -> torch.Tensor:
    """Have `finish(grad of output)` give the rows of this call; returns the output to use."""
    call = capture.start(name)

    def hook(grad: torch.Tensor) -> None:
        with torch.no_grad(), torch.autocast(grad.device.type, enabled=False):
            capture.finish(name, call, finish(grad))

    if output.requires_grad:
        output.register_hook(hook)
        return output
    if not torch.is_grad_enabled():
        return output
    # The first tracked layer: the graph starts at its output, so the backward never runs
    # through (or computes input gradients of) anything before it.
    started = start_graph(output)
    started.register_hook(hook)
    return started


def start_graph(output: torch.Tensor) -> torch.Tensor:
    """`output` itself, made the start of the autograd graph (it has no history)."""
    return _GraphStart.apply(output, torch.empty(0, requires_grad=True))


class _GraphStart(torch.autograd.Function):
    """Identity, in place, that gives a tensor without history a place in the graph (through
    `anchor`, an empty leaf). Its gradient reaches the hooks and stops: unlike a leaf, it is
    never accumulated into a `.grad` (a full copy of the layer's output gradient), and unlike
    a leaf's clone it copies nothing in the forward either; in-place ops that follow
    (ReLU(inplace=True)) are ordinary in-place ops on a non-leaf."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, None]:
        return None, None


def _forward_hook(layer: TrackedLayer, capture: Capture):
    def hook(module, inputs, output):
        x = inputs[0].detach()
        p_in, p_out = layer.projections(layer.compute_dtype(x), x.device)
        kept = _kept(x, lambda: layer.adapter.keep_input(module, x, p_in))

        def finish(grad: torch.Tensor) -> LayerRows:
            return layer.adapter.rows(module, kept, grad, p_in, p_out)

        used = _watch(layer.name, capture, output, finish)
        return None if used is output else used

    return hook


def _watch_attention_in(layer: TrackedLayer, capture: Capture):
    adapter, module = layer.adapter, layer.module

    def watch(x: torch.Tensor, which: str, output: torch.Tensor) -> torch.Tensor:
        part = adapter.part(module, which)
        x = x.detach()
        kept = _kept(x, lambda: adapter.keep_part(module, x, part, layer.p_in))

        def finish(grad: torch.Tensor) -> LayerRows:
            return adapter.part_rows(module, kept, part, grad, layer.p_out)

        return _watch(layer.name, capture, output, finish)

    return watch


def _watch_attention_out(layer: TrackedLayer, capture: Capture):
    adapter, module = layer.adapter, layer.module

    def watch(x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        rows = batch_major(x.detach())
        p_in, p_out = layer.projections(layer.compute_dtype(rows), rows.device)
        kept = _kept(rows, lambda: adapter.keep_input(module, rows, p_in))

        def finish(grad: torch.Tensor) -> LayerRows:
            return adapter.rows(module, kept, batch_major(grad), p_in, p_out)

        return _watch(layer.name, capture, output, finish)

    return watch
