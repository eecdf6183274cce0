"""Built-in ViT / ConvNeXt / MobileNet / EfficientNet encoders: checkpoint layouts, published
parameter counts, forward shapes, position-grid resizing, pooling, loading and its errors,
and the `timm:` / `torchvision:` archs."""

from __future__ import annotations

import json
import math
import sys
import types
from dataclasses import replace
from functools import cache

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from pipeline.config import LayerConfig, ModelConfig, ProjectionConfig
from pipeline.errors import UserError
from pipeline.influence.engine import frozen_parameters
from pipeline.influence.exact import exact_gradients
from pipeline.influence.loss import consistency_loss
from pipeline.influence.tracker import GradientTracker
from pipeline.models import BUILTIN_ARCHS, CheckpointError, build_encoder
from pipeline.models.common import ModelError
from pipeline.models.convnext import convnext_tiny
from pipeline.models.external import strip_classifier
from pipeline.models.mobilenet import mobilenet_v3_small
from pipeline.models.vit import VisionTransformer, resize_pos_grid
from tests.model_keys_reference import FIXTURES, REFERENCES, fixture

CNNS = ["convnext_tiny", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small",
        "efficientnet_b0"]  # fmt: skip
VITS = [a for a in REFERENCES if a.startswith("vit_")]
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")

# Published parameter counts. torchvision: `meta["num_params"]` of each model's weights
# enum (1000-class classifier included). timm: `param_count` in results/*.csv, in millions
# (vit_*_patch16_224 with the 1000-class head: 22.05 / 86.57; *_dinov2 head-less: 22.06 /
# 86.58, without DINOv2's mask token); the exact counts below are those of the head-less
# layouts, which reproduce the published figures once the head is added back.
PUBLISHED = {
    "convnext_tiny": 28_589_128,
    "mobilenet_v2": 3_504_872,
    "mobilenet_v3_large": 5_483_032,
    "mobilenet_v3_small": 2_542_856,
    "efficientnet_b0": 5_288_548,
    "vit_small_patch16": 21_665_664,
    "vit_base_patch16": 85_798_656,
    "vit_small_patch14_dinov2": 22_056_576,
    "vit_base_patch14_dinov2": 86_580_480,
}
TIMM_MILLIONS = {  # (published M, head params added back, mask token removed)
    "vit_small_patch16": (22.05, 384 * 1000 + 1000, 0),
    "vit_base_patch16": (86.57, 768 * 1000 + 1000, 0),
    "vit_small_patch14_dinov2": (22.06, 0, 384),
    "vit_base_patch14_dinov2": (86.58, 0, 768),
}


@cache
def reference_model(arch: str) -> nn.Module:
    """The layout of the public checkpoint: CNNs with their 1000-class classifier."""
    kwargs = {"num_classes": 1000} if arch in CNNS else {}
    return BUILTIN_ARCHS[arch](**kwargs).eval()


def _fixture(arch: str) -> list[tuple[str, list[int]]]:
    data = json.loads((FIXTURES / f"{arch}.json").read_text())
    assert data["arch"] == arch
    return [(k, shape) for k, shape in data["keys"]]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                offset = 1.0 if "running_var" in name else 0.0
                t.copy_(torch.rand(t.shape, generator=g) * 0.1 + offset)
    return model


# ---------------------------------------------------------------- layouts and counts


@pytest.mark.parametrize("arch", list(REFERENCES))
def test_state_dict_matches_reference_layout(arch: str) -> None:
    sd = reference_model(arch).state_dict()
    assert [(k, list(v.shape)) for k, v in sd.items()] == _fixture(arch)


@pytest.mark.parametrize("arch", list(REFERENCES))
def test_fixture_is_what_the_reference_script_writes(arch: str) -> None:
    assert [list(k) for k in fixture(arch)["keys"]] == [list(k) for k in _fixture(arch)]


@pytest.mark.parametrize("arch", list(PUBLISHED))
def test_parameter_counts_are_the_published_ones(arch: str) -> None:
    from_fixture = sum(math.prod(s) for k, s in _fixture(arch) if not k.endswith(BUFFERS))
    assert from_fixture == PUBLISHED[arch]
    assert _params(reference_model(arch)) == PUBLISHED[arch]
    if arch in TIMM_MILLIONS:
        millions, head, mask = TIMM_MILLIONS[arch]
        assert round((PUBLISHED[arch] + head - mask) / 1e6, 2) == millions


def test_register_variants_add_only_the_registers() -> None:
    for size, dim in (("small", 384), ("base", 768)):
        plain = dict(_fixture(f"vit_{size}_patch14_dinov2"))
        reg = dict(_fixture(f"vit_{size}_patch14_reg4_dinov2"))
        assert set(reg) - set(plain) == {"register_tokens"}
        assert reg["register_tokens"] == [1, 4, dim]


# ---------------------------------------------------------------- feature backbones


FEATURES = {
    "convnext_tiny": (768, ("classifier.2.",)),
    "mobilenet_v2": (1280, ("classifier.",)),
    "mobilenet_v3_large": (1280, ("classifier.3.",)),
    "mobilenet_v3_small": (1024, ("classifier.3.",)),
    "efficientnet_b0": (1280, ("classifier.",)),
}


@pytest.mark.parametrize("arch", CNNS)
def test_cnn_backbone_drops_only_the_classifier_linear(arch: str) -> None:
    width, head = FEATURES[arch]
    model = BUILTIN_ARCHS[arch]().eval()
    assert model.out_dim == width and model.head_prefixes == head
    expected = [(k, s) for k, s in _fixture(arch) if not k.startswith(head)]
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == expected
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, width)


def test_cnn_backbone_features_are_the_classifier_input() -> None:
    full = _randomize(convnext_tiny(num_classes=1000)).eval()
    backbone = convnext_tiny().eval()
    backbone.load_state_dict(
        {k: v for k, v in full.state_dict().items() if "classifier.2" not in k}
    )
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = backbone(x)
        torch.testing.assert_close(full(x), full.classifier[2](feats))


def test_mobilenet_v3_pre_logits_and_grey_input() -> None:
    conv_only = mobilenet_v3_small(pre_logits=False, in_channels=1).eval()
    assert conv_only.out_dim == 576 and conv_only.head_prefixes == ("classifier.",)
    assert not any(k.startswith("classifier") for k in conv_only.state_dict())
    assert conv_only.features[0][0].weight.shape == (16, 1, 3, 3)
    with torch.no_grad():
        assert conv_only(torch.randn(2, 1, 32, 32)).shape == (2, 576)


def test_vit_forward_shapes_and_base_once() -> None:
    small = reference_model("vit_small_patch16")
    with torch.no_grad():
        assert small(torch.randn(2, 3, 32, 32)).shape == (2, 384)
        assert reference_model("vit_base_patch16")(torch.randn(1, 3, 32, 32)).shape == (1, 768)
        dinov2 = reference_model("vit_small_patch14_reg4_dinov2")
        assert dinov2(torch.randn(1, 3, 28, 42)).shape == (1, 384)  # non-square grid


# ---------------------------------------------------------------- ViT position grid, pooling


def test_position_grid_resize() -> None:
    d, old = 3, (4, 4)
    const = torch.full((1, 16, d), 0.7)
    assert resize_pos_grid(const, old, old) is const  # same grid: untouched
    for offset, antialias in ((0.1, False), (0.0, True)):
        out = resize_pos_grid(const, old, (6, 2), offset, antialias)
        assert out.shape == (1, 12, d)
        torch.testing.assert_close(out, torch.full_like(out, 0.7))
    # A left-to-right ramp stays a left-to-right ramp, on every row, scaled up and down.
    ramp = torch.arange(4.0).repeat(4)[None, :, None].expand(1, 16, d)
    for new in ((8, 8), (2, 3)):
        grid = resize_pos_grid(ramp, old, new).reshape(*new, d)
        assert torch.all(grid[:, 1:] > grid[:, :-1])
        torch.testing.assert_close(grid, grid[:1].expand_as(grid))  # rows stay alike


def test_vit_uses_the_stored_grid_at_its_size_and_resizes_otherwise() -> None:
    torch.manual_seed(0)
    vit = VisionTransformer(patch_size=4, embed_dim=8, depth=1, num_heads=2, img_size=16).eval()
    assert vit.pos_embed.shape == (1, 1 + 16, 8)
    torch.testing.assert_close(vit.position_embedding((4, 4)), vit.pos_embed)
    resized = vit.position_embedding((2, 3))
    assert resized.shape == (1, 1 + 6, 8)
    torch.testing.assert_close(resized[:, 0], vit.pos_embed[:, 0])  # class position kept
    with torch.no_grad():
        assert vit.tokens(torch.randn(2, 3, 8, 12)).shape == (2, 7, 8)
    with pytest.raises(ModelError, match="multiple of the 4-pixel patch"):
        vit(torch.randn(1, 3, 10, 12))


@pytest.mark.parametrize("registers", [0, 4])
def test_vit_cls_and_mean_pooling(registers: int) -> None:
    torch.manual_seed(0)
    args = dict(patch_size=4, embed_dim=8, depth=2, num_heads=2, img_size=16)
    cls = VisionTransformer(**args, num_register_tokens=registers).eval()
    mean = VisionTransformer(**args, num_register_tokens=registers, pool="mean").eval()
    mean.load_state_dict(cls.state_dict())
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        tokens = cls.tokens(x)
        assert tokens.shape == (3, 1 + registers + 16, 8)
        torch.testing.assert_close(cls(x), tokens[:, 0])
        torch.testing.assert_close(mean(x), tokens[:, 1 + registers :].mean(1))
        assert not torch.allclose(cls(x), mean(x))
    with pytest.raises(ModelError, match="pool must be"):
        VisionTransformer(**args, pool="max")


def test_pool_through_the_config() -> None:
    enc = build_encoder(ModelConfig(arch="vit_small_patch16", kwargs={"pool": "mean", "depth": 1}))
    assert enc.backbone.pool == "mean" and enc.out_dim == 384 and len(enc.backbone.blocks) == 1


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # SDPA under vmap
def test_vit_token_layers_give_exact_per_example_gradients() -> None:
    torch.manual_seed(0)
    vit = VisionTransformer(
        patch_size=4, embed_dim=8, depth=1, num_heads=2, img_size=8, layer_scale=0.5
    ).eval()
    tracker = GradientTracker(vit, LayerConfig(), ProjectionConfig(enabled=False))
    assert tracker.names == [
        "patch_embed.proj", "blocks.0.attn.qkv", "blocks.0.attn.proj",
        "blocks.0.mlp.fc1", "blocks.0.mlp.fc2",
    ]  # fmt: skip
    views = torch.rand(3, 4, 3, 8, 8)
    with frozen_parameters(vit), tracker.capture() as capture, torch.enable_grad():
        z = vit(views.flatten(0, 1)).reshape(3, 4, -1)
        consistency_loss(z, "cosine", "all_pairs").sum().backward()
    hooked = {name: rows.gradient() for name, rows in capture.rows(3).items()}
    exact = exact_gradients(vit, views, tracker.names)
    for name in tracker.names:
        scale = exact[name].abs().max()
        assert scale > 0
        torch.testing.assert_close(hooked[name], exact[name], atol=1e-5 * scale, rtol=1e-4)


# ---------------------------------------------------------------- checkpoints


def test_torchvision_classifier_checkpoint_loads_into_the_backbone(tmp_path) -> None:
    tv = _randomize(mobilenet_v3_small(num_classes=1000)).eval()
    path = tmp_path / "mobilenet_v3_small.pth"
    torch.save(tv.state_dict(), path)
    enc = build_encoder(ModelConfig(arch="mobilenet_v3_small", checkpoint=str(path)))
    assert enc.load_report.dropped == ["classifier.3.bias", "classifier.3.weight"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = tv.classifier[:2](torch.flatten(tv.avgpool(tv.features(x)), 1))
        torch.testing.assert_close(enc(x), expected)


def test_timm_head_and_dino_teacher_heads_are_dropped(tmp_path) -> None:
    cfg = ModelConfig(arch="vit_small_patch16", kwargs={"depth": 2})
    src = _randomize(build_encoder(cfg))
    sd = src.backbone.state_dict()
    path = tmp_path / "vit.safetensors"
    save_file({**sd, "head.weight": torch.zeros(10, 384), "head.bias": torch.zeros(10)}, str(path))
    dst = build_encoder(replace(cfg, checkpoint=str(path)))
    assert dst.load_report.dropped == ["head.bias", "head.weight"]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))
    # DINO training checkpoint: {"teacher": {"backbone.*": ..., "head.mlp.*": ...}}
    teacher = {**{f"backbone.{k}": v for k, v in sd.items()}, "head.mlp.0.weight": torch.zeros(2)}
    torch.save({"teacher": teacher, "epoch": 100}, tmp_path / "dino.pth")
    dino = build_encoder(replace(cfg, checkpoint=str(tmp_path / "dino.pth")))
    assert dino.load_report.dropped == ["head.mlp.0.weight"]


def test_dinov2_checkpoint_without_mask_token_loads(tmp_path) -> None:
    cfg = ModelConfig(arch="vit_small_patch14_dinov2", kwargs={"depth": 1})
    src = _randomize(build_encoder(cfg))
    sd = {k: v for k, v in src.backbone.state_dict().items() if k != "mask_token"}
    assert "blocks.0.ls1.gamma" in sd
    torch.save(sd, tmp_path / "timm_dinov2.pth")
    dst = build_encoder(replace(cfg, checkpoint=str(tmp_path / "timm_dinov2.pth")))
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))


@pytest.mark.parametrize(
    ("arch", "old", "new"),
    [("vit_small_patch16", "blocks.", "layers."), ("efficientnet_b0", ".block.", ".layers.")],
)
def test_renamed_keys_give_a_clear_mismatch_error(tmp_path, arch: str, old: str, new: str) -> None:
    kwargs = {"depth": 1} if arch.startswith("vit") else {}
    sd = BUILTIN_ARCHS[arch](**kwargs).state_dict()
    path = tmp_path / "renamed.pt"
    torch.save({k.replace(old, new): v for k, v in sd.items()}, path)
    with pytest.raises(CheckpointError) as info:
        build_encoder(ModelConfig(arch=arch, checkpoint=str(path), kwargs=kwargs))
    assert isinstance(info.value, UserError)
    msg = str(info.value)
    renamed = [k for k in sd if old in k and not k.endswith("num_batches_tracked")]
    assert f"missing keys ({len(renamed)})" in msg
    assert "unexpected keys" in msg and new in msg and old in msg.split("unexpected")[0]


# ---------------------------------------------------------------- timm: and torchvision:


@pytest.mark.parametrize(
    ("arch", "package"),
    [("timm:vit_small_patch16_224", "timm"), ("torchvision:convnext_tiny", "torchvision")],
)
def test_external_arch_without_its_package(monkeypatch, arch: str, package: str) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # importing it raises ImportError
    with pytest.raises(ModelError, match=f"pip install {package}") as info:
        build_encoder(ModelConfig(arch=arch))
    assert isinstance(info.value, UserError)


def test_external_arch_refusals() -> None:
    with pytest.raises(ModelError, match="names no model"):
        build_encoder(ModelConfig(arch="timm:"))
    with pytest.raises(ModelError, match="download"):
        build_encoder(ModelConfig(arch="timm:resnet18", kwargs={"pretrained": True}))
    with pytest.raises(ModelError, match="3-channel"):
        build_encoder(ModelConfig(arch="torchvision:resnet18", in_channels=1))


def test_timm_arch_with_a_stand_in_package(monkeypatch) -> None:
    calls = []

    def create_model(name, **kwargs):
        calls.append((name, kwargs))
        model = VisionTransformer(
            patch_size=4, embed_dim=8, depth=1, num_heads=2, img_size=8,
            in_channels=kwargs["in_chans"],
        )  # fmt: skip
        model.num_features, model.head_hidden_size = 8, 8
        model.pretrained_cfg = {"classifier": "head"}
        return model

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    enc = build_encoder(ModelConfig(arch="timm:tiny_vit", in_channels=1, kwargs={"depth": 1}))
    assert calls == [
        ("tiny_vit", {"pretrained": False, "num_classes": 0, "in_chans": 1, "depth": 1})
    ]
    assert enc.out_dim == 8 and enc.backbone.head_prefixes == ("head.",)
    assert enc(torch.randn(2, 1, 8, 8)).shape == (2, 8)


def test_torchvision_arch_with_a_stand_in_package(monkeypatch, tmp_path) -> None:
    built = {"convnext_tiny": lambda: convnext_tiny(num_classes=10),
             "mobilenet_v3_small": lambda: mobilenet_v3_small(num_classes=10)}  # fmt: skip
    calls = []

    def get_model(name, **kwargs):
        calls.append((name, kwargs))
        return _randomize(built[name]())

    models = types.ModuleType("torchvision.models")
    models.get_model = get_model
    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    enc = build_encoder(ModelConfig(arch="torchvision:mobilenet_v3_small"))
    assert calls[-1] == ("mobilenet_v3_small", {"weights": None})
    assert enc.out_dim == 1024 and enc.backbone.head_prefixes == ("classifier.3.",)
    assert isinstance(enc.backbone.classifier[3], nn.Identity)
    assert enc(torch.randn(2, 3, 32, 32)).shape == (2, 1024)
    # A torchvision checkpoint (classifier included) loads, its last Linear dropped.
    full = _randomize(convnext_tiny(num_classes=10), seed=1)
    torch.save(full.state_dict(), tmp_path / "tv.pth")
    cfg = ModelConfig(arch="torchvision:convnext_tiny", checkpoint=str(tmp_path / "tv.pth"))
    enc = build_encoder(cfg)
    assert enc.out_dim == 768
    assert enc.load_report.dropped == ["classifier.2.bias", "classifier.2.weight"]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(full.eval().classifier[2](enc(x)), full(x))


def test_strip_classifier_picks_the_last_head_linear() -> None:
    model = nn.Sequential()
    model.features = nn.Linear(4, 6)  # not under a head attribute: kept
    model.classifier = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    assert strip_classifier(model) == 5
    assert isinstance(model.classifier[2], nn.Identity) and isinstance(model.features, nn.Linear)
    assert model.head_prefixes == ("classifier.2.",)
    with pytest.raises(ModelError, match=r"no nn\.Linear classifier"):
        strip_classifier(nn.Sequential(nn.Conv2d(3, 4, 1)), "squeezenet")
