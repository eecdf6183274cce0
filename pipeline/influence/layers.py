"""Per-layer-type maths: how a layer's inputs and output gradients become rows.

A tracked layer's weight gradient for one image is `sum_p delta_p a_p^T` over positions `p`.
Each adapter turns the layer input into projected rows `a~_p = P_in a_p` (bias folded in as
a constant-1 input) and the output gradient into `delta~_p = P_out delta_p`: rows
[images, positions, k], or for a convolution its projected maps [images, k, positions]
(`LayerRows.channels_first`). The full `a_p` of a large layer is never formed when
projecting. Linear and Conv2d project in the dtype the layer ran in under autocast (bf16),
with float32 accumulation inside the matmuls and convolutions; the others in float32.

Every adapter states its gradient layout, the [O, I] matrix that P_out (k_out x O) and
P_in (k_in x I) project: `parameter_names` and `gradient_layout` build it from per-example
parameter gradients (the exact reference, `pipeline.influence.exact`), and the projected
gradient of a layer is always `P_out G P_in^T`, [k_out, k_in], whatever the layer type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn


class LayerRows:
    """Projected rows of one layer: per example of a batch, or per image of one hooked call.

    `a` [n, R, k_in] and `d` [n, R, k_out]; `gradient()` is `sum_r d_r a_r^T`, unless `grad`
    [n, k_out, k_in] holds it: then the rows only reproduce the second moments `sum a a^T`
    and `sum d d^T` (and may differ in number), which is all the curvature needs of them
    (see `GroupedConv2dAdapter`).

    `channels_first`: the tensors are held as [n, k, R] (a convolution's projected NCHW maps,
    flattened, never transposed); `a` and `d` are transposed views of them.
    """

    def __init__(
        self,
        a: torch.Tensor,
        d: torch.Tensor,
        grad: torch.Tensor | None = None,
        *,
        channels_first: bool = False,
    ) -> None:
        self.held_a, self.held_d, self._grad = a, d, grad
        self.channels_first = channels_first

    @property
    def a(self) -> torch.Tensor:
        return self.held_a.mT if self.channels_first else self.held_a

    @property
    def d(self) -> torch.Tensor:
        return self.held_d.mT if self.channels_first else self.held_d

    @property
    def grad(self) -> torch.Tensor | None:
        return self._grad

    def gradient(self) -> torch.Tensor:
        """Projected gradient G~ [n, k_out, k_in], float32 for bf16 rows."""
        if self._grad is not None:
            return self._grad
        if self.channels_first:
            # (a d^T)^T: with the few output rows on the right, 20-30% faster on the CPU.
            return contract(self.held_a, self.held_d.mT).mT.contiguous()
        return contract(self.held_d.mT, self.held_a)

    def example_gradient(self, num_examples: int) -> torch.Tensor:
        """[B, k_out, k_in] of B = num_examples: image i belongs to example i // (n / B)."""
        n = self.held_a.shape[0]
        if n == num_examples:
            return self.gradient()
        if self._grad is None and not self.channels_first:
            # An example's rows lie side by side: one contraction per example.
            return contract(
                self.example_rows("d", num_examples).mT, self.example_rows("a", num_examples)
            )
        # Per image (channels first: in the layout the projections produced), then summed.
        return self.gradient().unflatten(0, (num_examples, -1)).sum(1)

    def example_rows(self, side: str, num_examples: int) -> torch.Tensor:
        """`a` or `d` grouped by example, [B, R', k]; channels first: a copy of the rows."""
        held = self.held_a if side == "a" else self.held_d
        if not self.channels_first:
            return held.reshape(num_examples, -1, held.shape[-1])
        return held.unflatten(0, (num_examples, -1)).transpose(2, 3).flatten(1, 2)


class ExampleRows(LayerRows):
    """A layer's rows per example, from the parts (per image) of its calls in one capture.

    The gradient is contracted part by part in the layout the hooks produced; `a` and `d`
    are laid out by example only when asked for (the curvature's statistics), so the
    embedding pass, which needs only the gradient, never copies rows.
    """

    def __init__(self, parts: list[LayerRows], num_examples: int) -> None:
        self.parts, self.num_examples = parts, num_examples
        self._cache: dict[str, torch.Tensor | None] = {}
        self.channels_first = False

    def _combined(self, what: str) -> torch.Tensor | None:
        if what not in self._cache:
            b = self.num_examples
            if what == "grad":
                has = self.parts[0].grad is not None
                value = sum(p.example_gradient(b) for p in self.parts) if has else None
            elif what == "gradient":
                value = self._combined("grad")
                if value is None:
                    value = sum(p.example_gradient(b) for p in self.parts)
            else:
                value = torch.cat([p.example_rows(what, b) for p in self.parts], dim=1)
            self._cache[what] = value
        return self._cache[what]

    @property
    def a(self) -> torch.Tensor:
        return self._combined("a")

    @property
    def d(self) -> torch.Tensor:
        return self._combined("d")

    @property
    def grad(self) -> torch.Tensor | None:
        return self._combined("grad")

    def gradient(self) -> torch.Tensor:
        return self._combined("gradient")


# Whether CUDA's bmm takes bf16 inputs with a float32 result (out_dtype); False once refused.
_CUDA_BMM_OUT_DTYPE = {"ok": True}


def contract(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Batched x @ y with a float32 result for bf16 rows (float64 stays float64).

    The per-example gradient is a sum over positions and views whose terms largely cancel
    (the views of an example nearly agree): a bf16 result per image would round away 1-20%
    of it (measured on an untrained net). On CUDA the product reads the bf16 rows and
    writes float32 (out_dtype); elsewhere the rows (small: k channels) are upcast first."""
    if x.dtype in (torch.float32, torch.float64):
        return torch.bmm(x, y)
    if x.is_cuda and _CUDA_BMM_OUT_DTYPE["ok"]:
        try:
            return torch.bmm(x, y, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # a torch or GPU without it: the upcast below
            _CUDA_BMM_OUT_DTYPE["ok"] = False
    return torch.bmm(x.float(), y.float())


class LayerAdapter(Protocol):
    def input_features(self, module: nn.Module) -> int: ...

    def output_features(self, module: nn.Module) -> int: ...

    def unsupported(self, module: nn.Module) -> str | None: ...

    def parameter_names(self, module: nn.Module) -> list[str]: ...

    def gradient_layout(self, module: nn.Module, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, O, I] from per-example gradients {parameter name: [B, *shape]}."""
        ...

    def keep_input(self, module: nn.Module, x: torch.Tensor, p_in: Any) -> Any:
        """What the forward hook keeps of the layer input until the output gradient comes.

        `p_in`, `p_out`: the tracked layer's matrices (None: identity), or what the
        adapter's `prepare` (optional) made of them for the dtype the layer ran in.
        """
        ...

    def rows(
        self, module: nn.Module, kept: Any, g: torch.Tensor, p_in: Any, p_out: Any
    ) -> LayerRows: ...


def _append_ones(rows: torch.Tensor, dim: int = -1) -> torch.Tensor:
    shape = list(rows.shape)
    shape[dim] = 1
    return torch.cat([rows, rows.new_ones(shape)], dim=dim)


def _weight_and_bias(module: nn.Module, grads: dict[str, torch.Tensor]) -> torch.Tensor:
    weight = grads["weight"].flatten(2)
    bias = grads.get("bias")
    return weight if bias is None else torch.cat([weight, bias[..., None]], dim=-1)


@dataclass(frozen=True)
class Projection:
    """One side's projection as a RowAdapter applies it, made once per device and dtype.

    `weight` None: the identity. The adapters project in `dtype` (bf16 under autocast, else
    float32); matmuls and convolutions accumulate in float32 inside whatever their inputs.
    """

    dtype: torch.dtype
    weight: torch.Tensor | None = None  # Linear: [k, I]; Conv2d: [k, C, kh, kw] kernels
    bias: torch.Tensor | None = None  # P_in's bias column, folded into the projection


class RowAdapter:
    """A layer whose rows pair position by position: a~ kept from the forward, d~ from the
    backward (Linear, Conv2d)."""

    channels_first = False  # how project_input / project_output_grad hand their rows back

    def parameter_names(self, module: nn.Module) -> list[str]:
        return [n for n in ("weight", "bias") if getattr(module, n, None) is not None]

    def gradient_layout(self, module, grads):
        """The weight flattened to [O, I] (conv: I = C*kh*kw), the bias as a last column."""
        return _weight_and_bias(module, grads)

    def prepare(
        self, module: nn.Module, p_in: torch.Tensor | None, p_out: torch.Tensor | None, dtype
    ) -> tuple[Projection, Projection]:
        """P_in, P_out (already on the device) in the form and dtype the hooks apply them."""
        raise NotImplementedError

    def keep_input(self, module, x, p_in: Projection):
        return self.project_input(module, x.to(p_in.dtype), p_in)

    def rows(self, module, kept, g, p_in: Projection, p_out: Projection) -> LayerRows:
        d = self.project_output_grad(module, g.to(p_out.dtype), p_out)
        return LayerRows(kept, d, channels_first=self.channels_first)

    def project_input(self, module, x, p_in: Projection) -> torch.Tensor:
        raise NotImplementedError

    def project_output_grad(self, module, g, p_out: Projection) -> torch.Tensor:
        raise NotImplementedError


def _split_bias(p: torch.Tensor | None, bias: bool) -> tuple[torch.Tensor | None, ...]:
    """P_in [a; 1] = P_in[:, :I] a + P_in[:, I]: the ones column becomes a bias."""
    if p is None or not bias:
        return p, None
    return p[:, :-1].contiguous(), p[:, -1].contiguous()


class LinearAdapter(RowAdapter):
    """nn.Linear on [N, ..., I] inputs; every leading position (e.g. a token) is a row.

    The first axis must be the image: a sequence-first [T, N, I] input would group rows by
    token (MultiheadAttention's out_proj is therefore fed by `attention_forward`).
    """

    def input_features(self, module: nn.Module) -> int:
        return module.in_features + (module.bias is not None)

    def output_features(self, module: nn.Module) -> int:
        return module.out_features

    def unsupported(self, module: nn.Module) -> str | None:
        return None

    def prepare(self, module, p_in, p_out, dtype):
        cast = [None if p is None else p.to(dtype) for p in (p_in, p_out)]
        weight, bias = _split_bias(cast[0], module.bias is not None)
        return Projection(dtype, weight, bias), Projection(dtype, cast[1])

    def project_input(self, module, x, p_in):
        rows = x.reshape(x.shape[0], -1, x.shape[-1])
        if p_in.weight is None:
            return _append_ones(rows) if module.bias is not None else rows
        return F.linear(rows, p_in.weight, p_in.bias)

    def project_output_grad(self, module, g, p_out):
        rows = g.reshape(g.shape[0], -1, g.shape[-1])
        return rows if p_out.weight is None else F.linear(rows, p_out.weight)


def _conv_unsupported(module: nn.Module) -> str | None:
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r} (only 'zeros' is supported)"
    if isinstance(module.padding, str) and module.padding != "valid":
        return f"padding={module.padding!r} (give explicit padding)"
    return None


def _conv_padding(module: nn.Module):
    return 0 if module.padding == "valid" else module.padding


class Conv2dAdapter(RowAdapter):
    """nn.Conv2d (groups=1, zero padding): rows are output locations, inputs unfolded patches.

    Both projections are convolutions that keep the NCHW layout, so neither the unfolded
    input nor a transposed copy of the output gradient is ever made: P_in as [k_in, C, kh, kw]
    kernels with the layer's stride, padding and dilation (its bias column as the bias), and
    P_out as a 1x1 convolution [k_out, O, 1, 1] on the gradient (on the CPU computed as the
    same product, a batched matmul). The rows stay channels first, [n, k, L]; only these
    small projected maps are ever laid out otherwise.
    """

    channels_first = True

    def input_features(self, module: nn.Module) -> int:
        c, kh, kw = module.weight.shape[1:]
        return c * kh * kw + (module.bias is not None)

    def output_features(self, module: nn.Module) -> int:
        return module.out_channels

    def unsupported(self, module: nn.Module) -> str | None:
        if module.groups != 1:
            return f"groups={module.groups} (GroupedConv2dAdapter handles it)"
        return _conv_unsupported(module)

    def prepare(self, module, p_in, p_out, dtype):
        cast = [None if p is None else p.to(dtype) for p in (p_in, p_out)]
        weight, bias = _split_bias(cast[0], module.bias is not None)
        if weight is not None:
            weight = weight.reshape(len(weight), *module.weight.shape[1:]).contiguous()
        out = None if cast[1] is None else cast[1][:, :, None, None].contiguous()
        return Projection(dtype, weight, bias), Projection(dtype, out)

    def project_input(self, module, x, p_in):
        padding = _conv_padding(module)
        if p_in.weight is None:
            return conv_patches(x, module, module.bias is not None)
        out = F.conv2d(x, p_in.weight, p_in.bias, module.stride, padding, module.dilation)
        return out.flatten(2)

    def project_output_grad(self, module, g, p_out):
        if p_out.weight is None:
            return g.flatten(2)
        if g.device.type == "cpu" and g.is_contiguous():
            # The same 1x1 convolution as P_out @ g[n] per image on the NCHW maps: on the CPU
            # 1.4-5x faster than oneDNN's 1x1 convolution at ResNet / SmallCNN shapes.
            return torch.matmul(p_out.weight[:, :, 0, 0], g.flatten(2))
        # cuDNN; a channels_last gradient gives channels_last maps: only they are copied.
        return F.conv2d(g, p_out.weight).flatten(2)


def conv_patches(x: torch.Tensor, module: nn.Module, ones: bool = False) -> torch.Tensor:
    """F.unfold's [n, C*kh*kw (+1 row of ones), L] patches of a Conv2d's input.

    Undilated: one strided copy of a sliding-window view (about 4x faster than F.unfold,
    which on the CPU runs im2col image by image), written straight into the result beside
    the ones row (no concatenation)."""
    kh, kw = module.kernel_size
    (sh, sw), padding = module.stride, _conv_padding(module)
    if module.dilation != (1, 1):
        patches = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)
        return _append_ones(patches, dim=1) if ones else patches
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    windows = F.pad(x, (pw, pw, ph, ph)).unfold(2, kh, sh).unfold(3, kw, sw)  # [n,C,H',W',kh,kw]
    n, c, h, w = windows.shape[:4]
    out = x.new_empty(n, c * kh * kw + ones, h * w)
    if ones:
        out[:, -1] = 1
    out[:, : c * kh * kw].view(n, c, kh, kw, h, w).copy_(windows.permute(0, 1, 4, 5, 2, 3))
    return out


# Transient float32 elements one chunk of images may hold in GroupedConv2dAdapter.rows.
GROUPED_CHUNK_ELEMENTS = 1 << 25


def moment_rows(moment: torch.Tensor, positions: int) -> torch.Tensor:
    """k rows Z per image with Z^T Z = moment * k / positions ([B, k, k] -> [B, k, k]).

    Their mean outer product over the k rows is `moment / positions`, the mean over the
    real positions, so curvature statistics averaged over rows keep their meaning.
    """
    sym = (moment.double() + moment.double().transpose(1, 2)) / 2
    values, vectors = torch.linalg.eigh(sym)
    rows = (vectors * values.clamp_min(0).sqrt()[:, None, :]).transpose(1, 2)
    return (rows * math.sqrt(moment.shape[-1] / positions)).float()


class GroupedConv2dAdapter:
    """nn.Conv2d with groups > 1 (grouped and depthwise), zero padding.

    Layout: the weight as PyTorch stores it, [O, C/groups * kh * kw] (+ the bias column),
    i.e. exactly the non-zero entries of the block-diagonal [O, C*kh*kw] weight: row o holds
    the kernel of output channel o, whose group g = o // (O/groups) reads input channels
    g*C/groups .. (g+1)*C/groups - 1. P_out [k_out, O] and P_in [k_in, C/groups*kh*kw (+1)]
    project it like any layer, one Kronecker projection of all groups at once: the projected
    gradient is [k_out, k_in], k_out = min(dim_out, O), k_in = min(dim_in, C/groups*kh*kw
    (+1)), a flat vector of k_out * k_in to the curvature like every layer's. Depthwise 3x3
    with the default dims: P_in is the identity on the 9 (+1) taps and P_out mixes all C
    channels, 16 x 9(10) per layer. Per position p and group g the gradient adds
    `(P_out[:, g] delta_{p,g}) (P_in a_{p,g})^T`, P_out[:, g] the columns of g's channels.

    Rows per image would be positions x groups (depthwise at 112x112 with 32 channels:
    400k rows), so the per-example gradient is computed in the backward hook, batched over
    the group axis (unfold + batched matmuls, no loop over groups), and the rows handed on are
    k x k per image with the same second moments `sum a~ a~^T`, `sum d~ d~^T` (over
    positions and groups) as the positions x groups rows: what EK-FAC fits. The forward
    keeps the layer input itself (no projected copy) until then.
    """

    def input_features(self, module: nn.Module) -> int:
        return module.weight[0].numel() + (module.bias is not None)

    def output_features(self, module: nn.Module) -> int:
        return module.out_channels

    def unsupported(self, module: nn.Module) -> str | None:
        return _conv_unsupported(module)

    def parameter_names(self, module: nn.Module) -> list[str]:
        return [n for n in ("weight", "bias") if getattr(module, n, None) is not None]

    def gradient_layout(self, module, grads):
        return _weight_and_bias(module, grads)

    def keep_input(self, module, x, p_in):
        return x, x._version

    def rows(self, module, kept, g, p_in, p_out):
        x, version = kept
        if x._version != version:
            raise RuntimeError(
                "the input of a grouped Conv2d was modified in place after the layer ran; "
                "its per-example gradient needs the input as the layer saw it"
            )
        groups, out = module.groups, module.out_channels
        dim_in = p_in.shape[0] if p_in is not None else self.input_features(module)
        p_out = p_out if p_out is not None else torch.eye(out, device=g.device)
        p_out = p_out.reshape(p_out.shape[0], groups, out // groups)  # [k_out, G, O/G]
        per_image = (groups * dim_in + 2 * out) * g[0, 0].numel()
        step = max(1, GROUPED_CHUNK_ELEMENTS // per_image)
        parts = [
            self._moments(module, x[i : i + step], g[i : i + step], p_in, p_out)
            for i in range(0, len(x), step)
        ]
        grad, a_moment, d_moment = (torch.cat(t) for t in zip(*parts, strict=True))
        positions = groups * g[0, 0].numel()
        return LayerRows(moment_rows(a_moment, positions), moment_rows(d_moment, positions), grad)

    def _moments(self, module, x, g, p_in, p_out):
        """Per image: G~ [n, k_out, k_in], sum a~ a~^T [n, k_in, k_in], sum d~ d~^T."""
        groups = module.groups
        a = self._input_rows(module, x.float(), p_in)  # [n, G, k_in, L]
        d = g.float().flatten(2).unflatten(1, (groups, -1))  # [n, G, O/G, L]
        # Batched matmuls over (image, group), then sums over groups: an einsum contracting
        # groups and locations at once would copy `a` into another layout first.
        per_group = d @ a.transpose(2, 3)  # [n, G, O/G, k_in]
        grad = torch.einsum("kgo,ngoi->nki", p_out, per_group)
        a_moment = (a @ a.transpose(2, 3)).sum(1)
        d_moment = torch.einsum("kgo,ngop,jgp->nkj", p_out, d @ d.transpose(2, 3), p_out)
        return grad, a_moment, d_moment

    def _input_rows(self, module, x, p_in) -> torch.Tensor:
        """a~ of every group at every output location: [n, G, k_in, L]."""
        groups, padding = module.groups, _conv_padding(module)
        if p_in is None:
            patches = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)
            patches = patches.unflatten(1, (groups, -1))  # channels of a group are contiguous
            return _append_ones(patches, dim=2) if module.bias is not None else patches
        # The same P_in for every group: one grouped convolution with P_in tiled G times.
        dim_in = p_in.shape[0]
        kernel = p_in[:, : module.weight[0].numel()].reshape(dim_in, *module.weight.shape[1:])
        bias = p_in[:, -1].repeat(groups) if module.bias is not None else None
        out = F.conv2d(
            x, kernel.repeat(groups, 1, 1, 1), bias, module.stride, padding, module.dilation, groups
        )
        return out.flatten(2).unflatten(1, (groups, dim_in))


def batch_major(t: torch.Tensor) -> torch.Tensor:
    """A sequence-first [T, B, E] tensor (or an unbatched [T, E] one) as [B, T, E] rows."""
    return t.transpose(0, 1) if t.dim() == 3 else t[None]


@dataclass(frozen=True)
class AttentionPart:
    """One in-projection matmul of an attention call: the input columns and output rows of
    the [3E, I] layout it fills."""

    in_start: int
    in_stop: int
    out_start: int
    out_stop: int


class MultiheadAttentionAdapter:
    """nn.MultiheadAttention's input projection (q, k and v together) as one layer.

    Layout [3E, I]: rows q, k, v (in_proj_weight's order), then a bias column from
    in_proj_bias. With kdim = vdim = E (in_proj_weight) I = E (+1): self-attention is
    exactly a Linear on the tokens, and cross-attention adds rows `(P_out[:, part] d) (P_in
    x)^T` per part (q from the query tokens, k and v from the key / value tokens). With
    other kdim / vdim (q_proj_weight, k_proj_weight, v_proj_weight) I = E + kdim + vdim
    (+1) and the three weights are the diagonal blocks, the rest structural zeros.

    `out_proj` is a Linear (LinearAdapter) but nn.MultiheadAttention never calls it as a
    module; `pipeline.influence.attention.attention_forward` runs both projections where
    the tracker's hooks see them, with tensors sequence-first as torch's functional does.
    """

    def in_dims(self, module: nn.MultiheadAttention) -> list[int]:
        if module._qkv_same_embed_dim:
            return [module.embed_dim]
        return [module.embed_dim, module.kdim, module.vdim]

    def input_features(self, module: nn.Module) -> int:
        return sum(self.in_dims(module)) + (module.in_proj_bias is not None)

    def output_features(self, module: nn.Module) -> int:
        return 3 * module.embed_dim

    def unsupported(self, module: nn.Module) -> str | None:
        return None

    def parameter_names(self, module: nn.Module) -> list[str]:
        names = (
            ["in_proj_weight"]
            if module._qkv_same_embed_dim
            else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
        )
        return names + (["in_proj_bias"] if module.in_proj_bias is not None else [])

    def gradient_layout(self, module, grads):
        if module._qkv_same_embed_dim:
            weight = grads["in_proj_weight"]
        else:
            blocks = [grads[n] for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight")]
            shape = (len(blocks[0]), 3 * module.embed_dim, sum(self.in_dims(module)))
            weight = blocks[0].new_zeros(shape)
            for part, block in zip("qkv", blocks, strict=True):
                p = self.part(module, part)
                weight[:, p.out_start : p.out_stop, p.in_start : p.in_stop] = block
        bias = grads.get("in_proj_bias")
        return weight if bias is None else torch.cat([weight, bias[..., None]], dim=-1)

    def part(self, module: nn.Module, which: str) -> AttentionPart:
        """`which` of "q", "k", "v", "kv" (k and v from one input) or "qkv" (self-attention)."""
        e = module.embed_dim
        first = "qkv".index(which[0])
        out = (first * e, (first + len(which)) * e)
        if module._qkv_same_embed_dim:
            return AttentionPart(0, e, *out)
        starts = [0, e, e + module.kdim, e + module.kdim + module.vdim]
        return AttentionPart(starts[first], starts[first + 1], *out)

    def keep_part(self, module, x, part: AttentionPart, p_in) -> torch.Tensor:
        """a~ rows [B, T, k_in] of one part's sequence-first input x."""
        rows = batch_major(x).float()
        bias = module.in_proj_bias is not None
        if p_in is None:
            full = rows.new_zeros(*rows.shape[:-1], self.input_features(module))
            full[..., part.in_start : part.in_stop] = rows
            if bias:
                full[..., -1] = 1
            return full
        projected = rows @ p_in[:, part.in_start : part.in_stop].T
        return projected + p_in[:, -1] if bias else projected

    def part_rows(self, module, kept, part: AttentionPart, g, p_out) -> LayerRows:
        rows = batch_major(g).float()
        if p_out is None:
            d = rows.new_zeros(*rows.shape[:-1], self.output_features(module))
            d[..., part.out_start : part.out_stop] = rows
        else:
            d = rows @ p_out[:, part.out_start : part.out_stop].T
        return LayerRows(kept, d)

    def keep_input(self, module, x, p_in):
        raise TypeError("MultiheadAttention is captured through attention_forward, not hooks")

    def rows(self, module, kept, g, p_in, p_out):
        raise TypeError("MultiheadAttention is captured through attention_forward, not hooks")


LINEAR, CONV, GROUPED_CONV = LinearAdapter(), Conv2dAdapter(), GroupedConv2dAdapter()
ADAPTERS: dict[type, LayerAdapter] = {
    nn.Linear: LINEAR,
    # MultiheadAttention.out_proj: a Linear subclass that only blocks dynamic quantisation.
    nn.modules.linear.NonDynamicallyQuantizableLinear: LINEAR,
    nn.Conv2d: CONV,
    nn.MultiheadAttention: MultiheadAttentionAdapter(),
}


def adapter_for(module: nn.Module) -> LayerAdapter | None:
    """The adapter of a module's exact type (subclasses with other maths are not guessed)."""
    adapter = ADAPTERS.get(type(module))
    if adapter is CONV and module.groups != 1:
        return GROUPED_CONV
    return adapter


def weight_gradient(module: nn.Module) -> torch.Tensor:
    """A layer's `.grad` in its adapter's layout: [O, I] with the bias as the last column."""
    adapter = adapter_for(module)
    grads = {n: getattr(module, n).grad[None] for n in adapter.parameter_names(module)}
    return adapter.gradient_layout(module, grads)[0]
