"""Encoders: torchvision-identical ResNet layout, small CNNs, Encoder, building and loading."""

from __future__ import annotations

import hashlib
import logging
import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from pipeline.config import ModelConfig
from pipeline.models import (
    CheckpointError,
    Encoder,
    ProjectorMLP,
    SmallCNN,
    TinyCNN,
    build_encoder,
    load_weights,
    model_identity,
    resnet18,
    resnet50,
)

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _expand(modules: list[str]) -> list[str]:
    """Keys of convs (`.weight`) and BatchNorms (5 entries), in module order."""
    keys = []
    for m in modules:
        is_bn = m.rsplit(".", 1)[-1].startswith("bn") or m.endswith("downsample.1")
        keys += [f"{m}.{s}" for s in BN] if is_bn else [f"{m}.weight"]
    return keys


# torchvision.models.resnet18(num_classes=1000).state_dict() module order, written out.
RESNET18_MODULES = [
    "conv1", "bn1",
    "layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2", "layer1.0.bn2",
    "layer1.1.conv1", "layer1.1.bn1", "layer1.1.conv2", "layer1.1.bn2",
    "layer2.0.conv1", "layer2.0.bn1", "layer2.0.conv2", "layer2.0.bn2",
    "layer2.0.downsample.0", "layer2.0.downsample.1",
    "layer2.1.conv1", "layer2.1.bn1", "layer2.1.conv2", "layer2.1.bn2",
    "layer3.0.conv1", "layer3.0.bn1", "layer3.0.conv2", "layer3.0.bn2",
    "layer3.0.downsample.0", "layer3.0.downsample.1",
    "layer3.1.conv1", "layer3.1.bn1", "layer3.1.conv2", "layer3.1.bn2",
    "layer4.0.conv1", "layer4.0.bn1", "layer4.0.conv2", "layer4.0.bn2",
    "layer4.0.downsample.0", "layer4.0.downsample.1",
    "layer4.1.conv1", "layer4.1.bn1", "layer4.1.conv2", "layer4.1.bn2",
]  # fmt: skip
RESNET18_KEYS = [*_expand(RESNET18_MODULES), "fc.weight", "fc.bias"]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-default values everywhere (incl. BN buffers) so a load is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + (0.5 if "running_var" in name else 0))
            else:
                t.fill_(7)
    return model


# ---------------------------------------------------------------- ResNet layout


def test_resnet18_keys_match_torchvision() -> None:
    assert len(RESNET18_KEYS) == 122
    sd = resnet18(num_classes=1000).state_dict()
    assert list(sd) == RESNET18_KEYS
    assert sd["conv1.weight"].shape == (64, 3, 7, 7)
    assert sd["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert sd["layer4.1.conv2.weight"].shape == (512, 512, 3, 3)
    assert sd["fc.weight"].shape == (1000, 512)
    assert sd["bn1.num_batches_tracked"].dtype == torch.long
    # Without a classifier: same keys less fc.
    assert list(resnet18().state_dict()) == RESNET18_KEYS[:-2]


def test_resnet_param_counts() -> None:
    assert _params(resnet18(num_classes=1000)) == 11_689_512
    assert _params(resnet50(num_classes=1000)) == 25_557_032


def test_resnet50_layout() -> None:
    model = resnet50(num_classes=1000)
    sd = model.state_dict()
    # stem 6 + 16 bottlenecks x 18 + 4 downsamples x 6 + fc 2
    assert len(sd) == 320
    assert sd["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert sd["layer1.0.downsample.1.running_var"].shape == (256,)
    assert sd["layer3.5.conv3.weight"].shape == (1024, 256, 1, 1)
    assert sd["layer4.2.bn3.num_batches_tracked"].shape == ()
    assert sd["fc.weight"].shape == (1000, 2048)
    # v1.5: the stride sits on the 3x3 conv
    assert model.layer2[0].conv2.stride == (2, 2)
    assert model.layer2[0].conv1.stride == (1, 1)


def test_resnet_features_and_stems() -> None:
    r18 = resnet18().eval()
    assert r18.out_dim == 512 and isinstance(r18.fc, nn.Identity)
    assert r18(torch.randn(2, 3, 64, 64)).shape == (2, 512)
    small = resnet18(in_channels=1, small_input=True).eval()
    assert small.conv1.weight.shape == (64, 1, 3, 3)
    assert isinstance(small.maxpool, nn.Identity)
    assert list(small.state_dict()) == RESNET18_KEYS[:-2]
    assert small(torch.randn(2, 1, 28, 28)).shape == (2, 512)
    r50 = resnet50(small_input=True).eval()
    assert r50.out_dim == 2048
    assert r50(torch.randn(1, 3, 32, 32)).shape == (1, 2048)


def test_resnet_init_follows_torchvision() -> None:
    torch.manual_seed(0)
    model = resnet18()
    assert torch.all(model.layer3[1].bn2.weight == 1) and torch.all(model.layer3[1].bn2.bias == 0)
    w = model.layer4[0].conv2.weight  # fan_out = 512 * 3 * 3
    assert w.std().item() == pytest.approx(math.sqrt(2 / (512 * 9)), rel=0.05)


# ---------------------------------------------------------------- small models, heads, Encoder


def test_small_cnn_shapes() -> None:
    gray = SmallCNN(in_channels=1).eval()
    assert gray.out_dim == 64
    assert gray(torch.randn(3, 1, 28, 28)).shape == (3, 64)
    rgb = SmallCNN(in_channels=3, out_dim=16).eval()
    assert rgb(torch.randn(2, 3, 32, 32)).shape == (2, 16)


def test_tiny_cnn_is_tiny_and_batchnorm_free() -> None:
    model = TinyCNN(in_channels=3)
    assert model.out_dim == 8
    assert _params(model) == 4 * 27 + 4 + 8 * 36
    assert _params(TinyCNN(in_channels=1)) < 5000
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert model.conv1.bias is not None and model.conv2.bias is None
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 8)


def test_projector_layout() -> None:
    proj = ProjectorMLP(64, [32, 16])
    assert list(proj.state_dict()) == [
        "layers.0.weight",
        "layers.0.bias",
        *(f"layers.1.{s}" for s in BN),
        "layers.3.weight",
        "layers.3.bias",
    ]
    assert isinstance(proj.layers[2], nn.ReLU) and proj.out_dim == 16
    assert isinstance(ProjectorMLP(8, [4]).layers[0], nn.Linear)
    with pytest.raises(ValueError, match="at least one"):
        ProjectorMLP(8, [])


def test_encoder_representations() -> None:
    x = torch.randn(2, 3, 16, 16)
    enc = Encoder(TinyCNN(), ProjectorMLP(8, [6, 5])).eval()
    assert enc.representation == "projector" and enc.out_dim == 5
    assert enc(x).shape == (2, 5) and enc.features(x).shape == (2, 8)
    assert enc.active_module_prefixes() == ["backbone.", "projector."]
    bb = Encoder(TinyCNN(), ProjectorMLP(8, [5]), representation="backbone")
    assert bb(x).shape == (2, 8) and bb.out_dim == 8
    assert bb.active_module_prefixes() == ["backbone."]
    assert Encoder(TinyCNN()).representation == "backbone"
    with pytest.raises(ValueError, match="no projector"):
        Encoder(TinyCNN(), representation="projector")
    with pytest.raises(ValueError, match="representation must be"):
        Encoder(TinyCNN(), representation="head")


# ---------------------------------------------------------------- build_encoder


def test_build_encoder_builtins_in_eval_mode() -> None:
    enc = build_encoder(ModelConfig(arch="small_cnn", in_channels=1, projector_dims=[32, 16]))
    assert not enc.training and not enc.backbone.training
    assert enc.representation == "projector" and enc.out_dim == 16
    assert enc(torch.randn(2, 1, 28, 28)).shape == (2, 16)
    r18 = build_encoder(ModelConfig(arch="resnet18", kwargs={"small_input": True}))
    assert isinstance(r18.backbone.maxpool, nn.Identity) and r18.out_dim == 512
    with pytest.raises(ValueError, match="no projector"):
        build_encoder(ModelConfig(arch="tiny_cnn", representation="projector"))


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        ("resnet99", "unknown arch"),
        ("pipeline.models.small", "unknown arch"),
        ("no_such_pkg.mod:make", "cannot import module"),
        ("pipeline.models.small:NoSuchNet", "has no attribute"),
        ("pipeline.models.small:torch", "not callable"),
    ],
)
def test_bad_arch_errors(arch: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_encoder(ModelConfig(arch=arch))


def test_bad_kwargs_error() -> None:
    with pytest.raises(ValueError, match="rejected arguments"):
        build_encoder(ModelConfig(arch="tiny_cnn", kwargs={"depth": 3}))


def make_backbone(in_channels: int = 3) -> nn.Module:
    """Factory whose module has no `out_dim`: width comes from model.kwargs.out_dim."""
    return nn.Sequential(nn.Conv2d(in_channels, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def make_full_encoder() -> Encoder:
    return Encoder(TinyCNN(), ProjectorMLP(8, [4]), representation="backbone")


def test_factory_arch() -> None:
    enc = build_encoder(ModelConfig(arch="pipeline.models.small:SmallCNN", kwargs={"out_dim": 12}))
    assert isinstance(enc.backbone, SmallCNN) and enc.out_dim == 12
    cfg = ModelConfig(
        arch=f"{__name__}:make_backbone", in_channels=1, projector_dims=[3], kwargs={"out_dim": 5}
    )
    enc = build_encoder(cfg)
    assert enc.backbone[0].in_channels == 1 and enc.backbone.out_dim == 5
    assert enc(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    with pytest.raises(ValueError, match="out_dim"):
        build_encoder(ModelConfig(arch=f"{__name__}:make_backbone"))


def test_factory_returning_encoder() -> None:
    enc = build_encoder(ModelConfig(arch=f"{__name__}:make_full_encoder"))
    assert enc.representation == "backbone" and enc.out_dim == 8  # "auto" keeps its choice
    enc = build_encoder(
        ModelConfig(arch=f"{__name__}:make_full_encoder", representation="projector")
    )
    assert enc.out_dim == 4
    with pytest.raises(ValueError, match="projector_dims"):
        build_encoder(ModelConfig(arch=f"{__name__}:make_full_encoder", projector_dims=[4]))


# ---------------------------------------------------------------- loading


def _small_cfg(checkpoint: str | None = None, projector: bool = True) -> ModelConfig:
    dims = [16, 8] if projector else []
    return ModelConfig(arch="small_cnn", in_channels=1, projector_dims=dims, checkpoint=checkpoint)


def _assert_same(a: Encoder, b: Encoder) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_round_trip_full_encoder(tmp_path, fmt: str) -> None:
    src = _randomize(build_encoder(_small_cfg()))
    path = tmp_path / f"enc.{fmt}"
    if fmt == "safetensors":
        save_file(src.state_dict(), str(path))
    else:
        torch.save(src.state_dict(), path)
    dst = build_encoder(_small_cfg(str(path)))
    _assert_same(src, dst)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(dst(x), src.eval()(x))
    assert dst.load_report.loaded == len(src.state_dict())


def test_safetensors_detected_without_extension(tmp_path) -> None:
    src = _randomize(build_encoder(_small_cfg()))
    path = tmp_path / "weights.bin"
    save_file(src.state_dict(), str(path))
    _assert_same(src, build_encoder(_small_cfg(f"file://{path}")))


def test_wrapped_and_prefixed_backbone_keys(tmp_path) -> None:
    src = _randomize(build_encoder(_small_cfg(projector=False)))
    ddp = {f"module.{k}": v for k, v in src.backbone.state_dict().items()}
    path = tmp_path / "ddp.pt"
    torch.save({"state_dict": ddp, "epoch": 3, "arch": "small_cnn"}, path)
    _assert_same(src, build_encoder(_small_cfg(str(path), projector=False)))
    # Lightning-style: full-encoder keys behind "model." under "model"
    nested = {f"model.{k}": v for k, v in src.state_dict().items()}
    torch.save({"model": nested, "optimizer_lr": 0.1}, path)
    _assert_same(src, build_encoder(_small_cfg(str(path), projector=False)))


def test_backbone_only_checkpoint_into_encoder_with_projector_fails(tmp_path) -> None:
    src = build_encoder(_small_cfg(projector=False))
    path = tmp_path / "bb.safetensors"
    save_file({f"encoder.{k}": v for k, v in src.backbone.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match=r"missing keys \(\d+\): projector\.layers\.0"):
        build_encoder(_small_cfg(str(path)))


def test_projector_keys_dropped_without_projector(tmp_path, caplog) -> None:
    src = _randomize(build_encoder(_small_cfg()))
    path = tmp_path / "full.pt"
    torch.save(src.state_dict(), path)
    with caplog.at_level(logging.WARNING, logger="pipeline.models.loading"):
        dst = build_encoder(_small_cfg(str(path), projector=False))
    assert "no projector" in caplog.text
    assert all(k.startswith("projector.") for k in dst.load_report.dropped)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(dst(x), src.eval().features(x))


def test_torchvision_layout_with_fc(tmp_path, caplog) -> None:
    tv = _randomize(resnet18(num_classes=1000))
    # Old torchvision weights have no num_batches_tracked; those are not needed in eval mode.
    sd = {k: v for k, v in tv.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "resnet18.pth"
    torch.save(sd, path)
    with caplog.at_level(logging.INFO, logger="pipeline.models.loading"):
        enc = build_encoder(ModelConfig(arch="resnet18", checkpoint=str(path)))
    assert sorted(enc.load_report.dropped) == ["fc.bias", "fc.weight"]
    assert "fc.weight" in caplog.text
    assert torch.equal(enc.backbone.layer4[1].bn2.running_var, tv.layer4[1].bn2.running_var)
    x = torch.randn(1, 3, 32, 32)
    tv.eval().fc = nn.Identity()
    torch.testing.assert_close(enc(x), tv(x))


def test_missing_file_error(tmp_path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError, match=r"not found.*nope\.safetensors"):
        build_encoder(_small_cfg(str(path)))


@pytest.mark.parametrize("name", ["junk.pt", "junk.safetensors"])
def test_corrupt_file_error(tmp_path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(
        torch.randint(
            0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
        )
        .numpy()
        .tobytes()
    )
    with pytest.raises(CheckpointError, match=f"cannot parse checkpoint .*{name}"):
        build_encoder(_small_cfg(str(path)))


def test_non_state_dict_error(tmp_path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="holds a list"):
        build_encoder(_small_cfg(str(path)))
    torch.save({"epoch": 3}, path)
    with pytest.raises(CheckpointError, match="holds no tensors"):
        build_encoder(_small_cfg(str(path)))


def test_wrong_architecture_error(tmp_path) -> None:
    path = tmp_path / "r18.safetensors"
    save_file(resnet18().state_dict(), str(path))
    with pytest.raises(CheckpointError) as info:
        build_encoder(ModelConfig(arch="resnet50", checkpoint=str(path)))
    msg = str(info.value)
    assert "r18.safetensors" in msg and "layer1.0.conv3.weight" in msg
    assert "shape mismatches" in msg and "(64, 64, 3, 3)" in msg


def test_unexpected_keys_error_and_non_strict(tmp_path, caplog) -> None:
    src = _randomize(build_encoder(_small_cfg()))
    path = tmp_path / "extra.pt"
    torch.save({**src.state_dict(), "momentum_backbone.conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): momentum_backbone"):
        build_encoder(_small_cfg(str(path)))
    with caplog.at_level(logging.WARNING, logger="pipeline.models.loading"):
        dst = build_encoder(_small_cfg(str(path)), strict=False)
    _assert_same(src, dst)
    assert dst.load_report.ignored == ["momentum_backbone.conv1.weight"]


def test_colliding_keys_error(tmp_path) -> None:
    src = build_encoder(_small_cfg(projector=False))
    sd = src.backbone.state_dict()
    both = {
        **{f"encoder.{k}": v for k, v in sd.items()},
        **{f"model.{k}": v for k, v in sd.items()},
    }
    path = tmp_path / "both.pt"
    torch.save(both, path)
    with pytest.raises(CheckpointError, match="both map to"):
        build_encoder(_small_cfg(str(path), projector=False))


def test_remote_uri_needs_open_uri(tmp_path) -> None:
    src = _randomize(build_encoder(_small_cfg()))
    path = tmp_path / "enc.safetensors"
    save_file(src.state_dict(), str(path))
    uri = "s3://bucket/enc.safetensors"
    with pytest.raises(CheckpointError, match="open_uri"):
        build_encoder(_small_cfg(uri))
    store = {uri: path.read_bytes()}
    dst = build_encoder(_small_cfg(uri), open_uri=store.__getitem__)
    _assert_same(src, dst)
    with pytest.raises(CheckpointError, match="cannot read checkpoint s3://bucket/other"):
        load_weights(dst, "s3://bucket/other", open_uri=store.__getitem__)


def test_model_identity(tmp_path) -> None:
    enc = build_encoder(_small_cfg())
    ident = model_identity(enc, _small_cfg())
    assert ident["checkpoint"] is None and ident["checkpoint_sha256"] is None
    assert ident["num_parameters"] == _params(enc)
    assert ident["representation"] == "projector" and ident["out_dim"] == 8
    assert ident["arch"] == "small_cnn"
    path = tmp_path / "enc.safetensors"
    save_file(enc.state_dict(), str(path))
    cfg = _small_cfg(str(path))
    loaded = build_encoder(cfg)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert model_identity(loaded, cfg)["checkpoint_sha256"] == expected
    assert model_identity(enc, cfg)["checkpoint_sha256"] == expected  # re-read when not loaded
