"""The projection path: Conv2d / Linear projections in the layer's layout and dtype.

Conv2d rows stay channels first ([images, k, positions]: the input projected by a
convolution with P_in kernels, the output gradient by P_out as a 1x1 convolution, no
transposed copy), are contracted per image and summed per example; under bf16 autocast
Linear and Conv2d project in bf16. Checked against `P_out G P_in^T` of exact torch.func
per-example gradients (w(x) under bf16 against float32 on a trained encoder: test_engine).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import (
    LayerConfig,
    ProjectionConfig,
)
from pipeline.influence.engine import frozen_parameters
from pipeline.influence.exact import exact_gradients
from pipeline.influence.layers import Conv2dAdapter, LinearAdapter, conv_patches
from pipeline.influence.loss import consistency_loss
from pipeline.influence.tracker import GradientTracker, TrackedLayer
from tests.test_gradients import views_of
from tests.test_layers_more import AttentionNet, GroupedNet, built, projected_exact


class PathNet(nn.Module):
    """Every Conv2d / Linear case of the projection path.

    stem: bias, few inputs (identity P_in: patches plus the ones row); down: strided, no
    bias; dilated: dilation 2 (the F.unfold patches where P_in is the identity); shared:
    called twice per forward (its rows of both calls go to one example gradient); lastly a
    channels_last map into `cl`, whose output gradient is then channels_last too; Linear
    with and without bias.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1, bias=True)
        self.down = nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=True)
        self.shared = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.cl = nn.Conv2d(8, 7, 1, bias=True)
        self.fc = nn.Linear(7, 9)
        self.out = nn.Linear(9, 5, bias=False)

    def forward(self, x):
        x = torch.tanh(self.stem(x))
        x = torch.relu(self.down(x))
        x = torch.tanh(self.dilated(x))
        x = torch.sin(self.shared(torch.sin(self.shared(x))))
        x = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels_last strides
        x = torch.tanh(self.cl(x))
        return self.out(torch.tanh(self.fc(x.mean(dim=(2, 3)))))


# Projected (in, out) sides per layer: stem in 10 features -> identity, out 6 -> 4; dilated
# kept exact on both sides (the unfold path); the rest projected.
PROJECTION = ProjectionConfig(dim_in=12, dim_out=4, seed=5, per_layer={"dilated": [100, 100]})


def hooked_rows(model, tracker, views, autocast: bool = False, kind: str = "cosine"):
    batch = views.shape[0]
    with frozen_parameters(model), tracker.capture() as capture, torch.enable_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            z = model(views.flatten(0, 1))
        z = z.float().reshape(batch, views.shape[1], -1)
        consistency_loss(z, kind).sum().backward()
    return capture.rows(batch)


@pytest.mark.parametrize(
    "projection", [ProjectionConfig(enabled=False), PROJECTION], ids=["exact", "projected"]
)
def test_projected_gradients_equal_projection_of_exact(digits, projection):
    # The l2 loss: on an untrained net the cosine loss's gradient is a small difference of
    # large terms, where the channels_last layer's own rounding shows (2e-5 of the largest).
    model = built(PathNet)
    views = views_of(digits[:4], 3)
    tracker = GradientTracker(model, LayerConfig(), projection)
    rows = hooked_rows(model, tracker, views, kind="l2")
    expected = projected_exact(tracker, exact_gradients(model, views, tracker.names, "l2"))
    assert tracker.names == ["stem", "down", "dilated", "shared", "cl", "fc", "out"]
    for name in tracker.names:
        got = rows[name].gradient()
        assert got.shape == expected[name].shape == (4, *got.shape[1:]), name
        assert got.dtype == torch.float32
        scale = expected[name].abs().max()
        assert scale > 0, name
        # float32 sums in another order: 3e-5 of the largest seen on one CPU (oneDNN's kernels
        # differ by machine); a wrong gradient is off by the order of the largest.
        torch.testing.assert_close(got, expected[name], atol=1e-4 * scale, rtol=1e-4)
    by_name = {layer.name: layer for layer in tracker.layers}
    if projection.enabled:  # the sides meant to be identity and projected really are
        assert by_name["stem"].p_in is None and by_name["stem"].p_out.shape == (4, 6)
        assert by_name["dilated"].p_in is None and by_name["dilated"].p_out is None
        assert by_name["down"].p_in.shape == (12, 54)
    assert len(rows["shared"].parts) == 2  # both calls, one gradient per example


def test_conv_rows_are_channels_first_and_pair_position_by_position(digits):
    """The curvature's rows [B, R, k] (laid out only when asked for) give the gradient."""
    model = built(PathNet)
    views = views_of(digits[:3], 2)
    tracker = GradientTracker(model, LayerConfig(), PROJECTION)
    rows = hooked_rows(model, tracker, views, kind="l2")
    for layer in tracker.layers:
        r = rows[layer.name]
        part = r.parts[0]
        if isinstance(layer.adapter, Conv2dAdapter):
            assert part.channels_first and part.held_a.shape[1] == layer.dim_in
            assert part.held_d.shape[1] == layer.dim_out
        assert r.a.shape[0] == r.d.shape[0] == 3 and r.a.shape[1] == r.d.shape[1]
        assert (r.a.shape[2], r.d.shape[2]) == (layer.dim_in, layer.dim_out)
        torch.testing.assert_close(
            torch.einsum("bro,bri->boi", r.d.double(), r.a.double()).float(),
            r.gradient(),
            rtol=1e-4,
            atol=1e-5 * r.gradient().abs().max(),
        )


def test_output_gradient_projection_is_a_1x1_convolution_in_either_layout():
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 9, 3, padding=1)
    adapter = Conv2dAdapter()
    p_out = torch.randn(4, 9)
    _, out = adapter.prepare(conv, None, p_out, torch.float32)
    assert out.weight.shape == (4, 9, 1, 1)
    g = torch.randn(3, 9, 6, 7)
    expected = torch.einsum("ko,nol->nkl", p_out, g.flatten(2))
    for layout in (torch.contiguous_format, torch.channels_last):
        got = adapter.project_output_grad(conv, g.contiguous(memory_format=layout), out)
        assert got.shape == (3, 4, 42)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Conv2d(2, 3, (3, 5), stride=(2, 1), padding=(0, 2), bias=False),
        nn.Conv2d(2, 3, 4, stride=4, padding="valid"),
        nn.Conv2d(2, 3, 3, padding=2, dilation=2),
    ],
    ids=["3x3", "3x5-strided", "patchify", "dilated"],
)
def test_conv_patches_equal_unfold(conv):
    x = torch.randn(4, 2, 13, 11)
    padding = 0 if conv.padding == "valid" else conv.padding
    expected = F.unfold(x, conv.kernel_size, conv.dilation, padding, conv.stride)
    assert torch.equal(conv_patches(x, conv), expected)
    with_ones = conv_patches(x, conv, ones=True)
    assert torch.equal(with_ones[:, :-1], expected) and bool((with_ones[:, -1] == 1).all())


# ----------------------------------------------------------------------------- bf16


def cosine_per_example(a: dict, b: dict) -> torch.Tensor:
    flat = [torch.cat([t[n].flatten(1) for n in sorted(t)], dim=1) for t in (a, b)]
    return F.cosine_similarity(flat[0].double(), flat[1].double(), dim=1)


@pytest.mark.parametrize(
    "model",
    [lambda: built(PathNet), lambda: built(GroupedNet, 4), lambda: built(AttentionNet, "kv", True)],
    ids=["conv-linear", "grouped", "attention"],
)
def test_bf16_autocast_projects_conv_and_linear_in_bf16(digits, model, monkeypatch):
    """Under autocast, Linear / Conv2d rows come out of bf16 projections of the layers' bf16
    tensors (no float32 copies first); grouped convolutions and attention in-projections
    stay float32. Against float32 projections of the same bf16 forward and backward, the
    projected gradients agree to bf16's rounding."""
    model = model()
    views = views_of(digits[:4], 3)
    tracker = GradientTracker(model, LayerConfig(), ProjectionConfig(dim_in=6, dim_out=4))
    plain, bf16 = (hooked_rows(model, tracker, views, on, "l2") for on in (False, True))
    for layer in tracker.layers:
        low = isinstance(layer.adapter, LinearAdapter | Conv2dAdapter)
        held = bf16[layer.name].parts[0].held_a
        assert held.dtype == (torch.bfloat16 if low else torch.float32), layer.name
        assert plain[layer.name].parts[0].held_a.dtype == torch.float32
        assert bf16[layer.name].gradient().dtype == torch.float32
        if low:  # the bf16 matrices are made once and kept beside the float32 ones
            assert {dtype for dtype, _ in layer.prepared} == {torch.float32, torch.bfloat16}
    monkeypatch.setattr(TrackedLayer, "compute_dtype", lambda self, x: torch.float32)
    reference = hooked_rows(model, tracker, views, True, "l2")  # float32 projections
    assert reference[tracker.names[0]].parts[0].held_a.dtype == torch.float32
    cosine = cosine_per_example(
        {n: r.gradient() for n, r in reference.items()}, {n: r.gradient() for n, r in bf16.items()}
    )
    # Measured min 0.996: the Linear layers' bf16 rows, where the sum over an example's
    # views cancels (the output gradients of its views nearly sum to zero).
    assert cosine.min() > 0.99, cosine
