"""Influence on every built-in encoder: fit + embed at small sizes, coverage of the weight
layers (the backbone's own parameters counted), half projection dims on grouped / depthwise
convolutions, the zero-curvature error, and projection-off `dense_all` == exact influence on
a tiny ViT and a tiny depthwise net."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import CurvatureConfig, LayerConfig, ModelConfig, ProjectionConfig
from pipeline.errors import UserError
from pipeline.influence.curvature import resolve_kind
from pipeline.influence.curvature.base import ZeroCurvatureError
from pipeline.influence.engine import InfluenceSSL, default_keys
from pipeline.influence.exact import damped_inverse_scores, exact_gradients
from pipeline.influence.scoring import influence
from pipeline.influence.tracker import NORM_TYPES, GradientTracker, coverage_warning
from pipeline.models import BUILTIN_ARCHS, Encoder, build_encoder
from pipeline.models.common import conv_norm_act
from pipeline.models.efficientnet import MBConv
from pipeline.models.mobilenet import InvertedResidualV2
from pipeline.testing import engine_config

TRACKABLE = {"Conv2d", "Linear", "MultiheadAttention", "NonDynamicallyQuantizableLinear"}
GREY = {"small_cnn", "tiny_cnn"}  # built for 1-channel digits


def photo_crops(side: int, count: int, seed: int = 0) -> torch.Tensor:
    """Random square crops of scikit-image's colour photographs, resized to `side`."""
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        x = torch.from_numpy(np.ascontiguousarray(photos[i % len(photos)])).permute(2, 0, 1)
        h, w = x.shape[1:]
        size = int(rng.integers(min(h, w) // 6, min(h, w) // 2))
        top, left = int(rng.integers(0, h - size)), int(rng.integers(0, w - size))
        crop = x[None, :, top : top + size, left : left + size].float() / 255
        out.append(nn.functional.interpolate(crop, size=side, mode="bilinear", antialias=True)[0])
    return torch.stack(out).clamp(0, 1)


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    return photo_crops(32, 40)


def small_kwargs(arch: str) -> dict:
    """Tiny widths where the arch takes them (ViTs); the CNNs have fixed channel tables."""
    if arch.startswith("vit_"):
        return {"embed_dim": 24, "depth": 1, "num_heads": 2}
    if arch == "small_cnn":
        return {"width": 4, "out_dim": 8}
    return {}


def randomised(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and LayerScales, as a trained model has."""
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
        for name, p in model.named_parameters():
            if name.endswith(("layer_scale", "gamma")):
                p.uniform_(0.5, 1.5)
    return model


def own_parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


@pytest.mark.parametrize("arch", sorted(BUILTIN_ARCHS))
def test_every_builtin_arch_fits_embeds_and_tracks_every_weight_layer(arch, photos):
    torch.manual_seed(0)
    grey = arch in GREY
    model = ModelConfig(arch=arch, in_channels=1 if grey else 3, kwargs=small_kwargs(arch))
    encoder = randomised(build_encoder(model))
    size = 28 if "patch14" in arch else 32  # a whole number of patches
    images = photos[:, :1] if grey else photos
    images = nn.functional.interpolate(images, size=size, mode="bilinear", antialias=True)
    config = engine_config("auto", model=model, augment=size, pairs=1, dims=4)
    engine = InfluenceSSL(encoder, config).fit(images[:6])
    w = engine.embed(images[6:9])
    assert w.shape == (3, engine.dimension) and torch.isfinite(w).all() and w.abs().max() > 0

    coverage = engine.tracker.coverage()
    assert engine.tracker.skipped == {}
    assert not [e for e in coverage["skipped_layers"] if e["type"] in TRACKABLE]
    counts = coverage["layer_parameters"]
    backbone = encoder.backbone
    norms = sum(own_parameter_count(m) for m in backbone.modules() if isinstance(m, NORM_TYPES))
    assert counts["weight"] == sum(p.numel() for p in backbone.parameters()) - norms
    assert counts["normalisation"] == norms
    assert counts["tracked"] == sum(e["parameters"] for e in coverage["tracked_layers"])
    assert counts["untracked"] == counts["weight"] - counts["tracked"]
    own = [e for e in coverage["skipped_layers"] if e["name"] == "backbone"]
    if arch.startswith("vit_"):  # cls_token, pos_embed (+ registers, mask token): untracked
        assert own[0]["parameters"] == own_parameter_count(backbone) > 0
        assert "cls_token, pos_embed" in own[0]["why"]
    else:
        assert own == []


def test_backbone_own_parameters_count_towards_the_untracked_share_and_warning():
    """A ViT whose position embedding outweighs its blocks: its share is reported and warned."""
    kwargs = {"embed_dim": 8, "depth": 1, "num_heads": 2}
    encoder = build_encoder(ModelConfig(arch="vit_tiny_patch16", kwargs=kwargs))
    tracker = GradientTracker(encoder, LayerConfig(), ProjectionConfig())
    coverage = tracker.coverage()
    own = 8 + (1 + 14 * 14) * 8  # cls_token + pos_embed at 224 px, 16-pixel patches
    counts = coverage["layer_parameters"]
    assert counts["untracked"] == own and counts["untracked_fraction"] > 0.10
    warning = coverage_warning(coverage)
    assert warning and f"backbone ({own:,}: no per-example gradient" in warning
    norms = sum(own_parameter_count(m) for m in encoder.modules() if isinstance(m, NORM_TYPES))
    assert counts["weight"] == sum(p.numel() for p in encoder.parameters()) - norms


def test_vit_tiny_patch16_is_timm_vit_tiny():
    """timm `vit_tiny_patch16_224`: 5.72M parameters with its 1000-class head; ViT-S's keys."""
    tiny, small = BUILTIN_ARCHS["vit_tiny_patch16"](), BUILTIN_ARCHS["vit_small_patch16"]()
    assert tiny.out_dim == 192 and len(tiny.blocks) == 12 and tiny.blocks[0].attn.num_heads == 3
    params = sum(p.numel() for p in tiny.parameters())
    assert round((params + 192 * 1000 + 1000) / 1e6, 2) == 5.72
    halve = {384: 192, 1152: 576, 1536: 768}
    expected = {k: [halve.get(d, d) for d in v.shape] for k, v in small.state_dict().items()}
    assert {k: list(v.shape) for k, v in tiny.state_dict().items()} == expected


# ----------------------------------------------------------------------------- projection dims


def test_grouped_convs_get_half_dims_so_efficientnet_b0_fits_dense_all():
    encoder = build_encoder(ModelConfig(arch="efficientnet_b0"))
    modules = dict(encoder.named_modules())
    projection = ProjectionConfig()  # 16 x 16
    tracker = GradientTracker(encoder, LayerConfig(), projection)
    grouped = [layer for layer in tracker.layers if modules[layer.name].groups > 1]
    assert len(grouped) == 16  # one depthwise conv per MBConv block
    for layer in tracker.layers:
        k = 8 if layer in grouped else 16
        assert layer.dim_in == min(k, layer.features_in)
        assert layer.dim_out == min(k, layer.features_out)
    assert tracker.dimension == sum(layer.dim_in * layer.dim_out for layer in tracker.layers)
    shapes = _shapes(tracker)
    assert tracker.dimension <= CurvatureConfig().max_dense_dim
    assert resolve_kind(shapes, CurvatureConfig()) == "dense_all"
    # A per-layer override still wins: every layer at 16 x 16 no longer fits dense_all.
    full = GradientTracker(encoder, LayerConfig(), replace(projection, per_layer={"*": [16, 16]}))
    assert all(layer.dim_out == min(16, layer.features_out) for layer in full.layers)
    assert full.dimension > CurvatureConfig().max_dense_dim
    assert resolve_kind(_shapes(full), CurvatureConfig()) == "dense"


def _shapes(tracker: GradientTracker):
    from pipeline.influence.curvature import LayerShape

    return [LayerShape(layer.name, layer.dim_in, layer.dim_out) for layer in tracker.layers]


# ----------------------------------------------------------------------------- zero curvature


class Gated(nn.Module):
    """An MLP encoder plus a `dead` layer whose output is multiplied by `gate`."""

    def __init__(self, gate: float) -> None:
        super().__init__()
        self.fc1, self.fc2, self.dead = nn.Linear(64, 8), nn.Linear(8, 4), nn.Linear(64, 4)
        self.gate = gate

    def forward(self, x):
        x = x.flatten(1)
        return self.fc2(torch.relu(self.fc1(x))) + self.gate * self.dead(x)


def gated(gate: float, zero_output: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = Gated(gate).eval()
    if zero_output:  # z = 0 for every view: the loss is flat, every gradient exactly zero
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
    return model


@pytest.mark.parametrize("kind", ["dense_all", "dense", "ekfac"])
def test_all_zero_gradients_are_a_clear_one_line_error(photos, kind):
    images = photos[:12, :1, :8, :8]
    engine = InfluenceSSL(gated(1.0, zero_output=True), engine_config(kind, augment=8))
    with pytest.raises(ZeroCurvatureError) as caught:
        engine.fit(images)
    message = str(caught.value)
    assert isinstance(caught.value, UserError) and "\n" not in message
    assert "are all zero over" in message and "w(x) would be NaN" in message
    if kind == "dense_all":
        assert message.startswith("the per-example gradients of all 3 tracked layers")
    else:
        assert message.startswith("the per-example gradients of fc1, fc2, dead are all zero")


def test_one_zero_layer_is_named_where_it_has_its_own_block(photos):
    images = photos[:12, :1, :8, :8]
    with pytest.raises(ZeroCurvatureError, match=r"gradients of dead are all zero over the 12"):
        InfluenceSSL(gated(0.0), engine_config("dense", augment=8)).fit(images)
    # Across all layers the block has curvature: w stays finite.
    engine = InfluenceSSL(gated(0.0), engine_config("dense_all", augment=8)).fit(images)
    assert torch.isfinite(engine.embed(images[:4])).all()


def test_non_finite_gradients_are_refused(photos):
    model = gated(1.0)
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("inf")
    engine = InfluenceSSL(model, engine_config("dense_all", augment=8))
    with pytest.raises(ZeroCurvatureError, match="is not finite"):
        engine.fit(photos[:8, :1, :8, :8])


# ----------------------------------------------------------------------------- exact influence


class TinyDepthwise(nn.Module):
    """MobileNetV2's inverted residual (depthwise 3x3) and EfficientNet's MBConv (depthwise
    5x5, squeeze-excitation), the built-in blocks, at 8 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_norm_act(3, 8, 3, 2, act=nn.ReLU6)
        self.v2 = InvertedResidualV2(8, 8, 1, 2)
        self.mb = MBConv(2, 5, 1, 8, 8)
        self.out_dim = 8

    def forward(self, x):
        return self.mb(self.v2(self.stem(x))).mean((2, 3))


def tiny_vit() -> nn.Module:
    cfg = ModelConfig(
        arch="vit_tiny_patch16",
        kwargs={"patch_size": 4, "embed_dim": 8, "depth": 1, "num_heads": 2, "img_size": 8},
    )
    return build_encoder(cfg)


@pytest.mark.parametrize("which", ["vit", "depthwise"])
def test_projection_off_dense_all_equals_exact_influence(photos, which):
    torch.manual_seed(0)
    if which == "vit":
        encoder, size = randomised(tiny_vit()), 8
    else:
        encoder, size = randomised(Encoder(TinyDepthwise()).eval()), 16
    images = nn.functional.interpolate(photos, size=size, mode="bilinear", antialias=True)
    config = engine_config("dense_all", augment=size, pairs=None, dims=None)
    config = replace(config, loss=replace(config.loss, num_views=4))  # all pairs of 4
    engine = InfluenceSSL(encoder, config)
    tracker = engine.tracker
    skipped = [e["name"] for e in tracker.coverage()["skipped_layers"]]
    assert skipped == (["backbone"] if which == "vit" else [])  # a ViT's cls_token, pos_embed
    if which == "depthwise":
        assert sum(encoder.get_submodule(n).groups > 1 for n in tracker.names) == 2
    train, query = images[:30], images[30:36]
    train_keys, query_keys = default_keys(30), [f"q{i}" for i in range(6)]
    engine.fit(train, train_keys)
    scores = influence(engine.embed(query, query_keys), engine.embed(train, train_keys)).double()

    def exact(batch, keys):
        grads = exact_gradients(encoder, engine.make_views(batch, keys), tracker.names)
        return torch.cat([grads[n].flatten(1) for n in tracker.names], dim=1)

    g_train = exact(train, train_keys)
    assert g_train.shape[1] == engine.dimension > len(train)  # fewer fit examples than D
    expected = damped_inverse_scores(g_train, exact(query, query_keys))
    torch.testing.assert_close(scores, expected, atol=2e-4 * expected.abs().max(), rtol=1e-3)
