"""Build an `Encoder` from a `ModelConfig`, and describe it for the manifest.

`cfg.arch` is a built-in name (`BUILTIN_ARCHS`), `"timm:<name>"` / `"torchvision:<name>"`
(see `external.py`), or a `"package.module:function"` factory.
A factory is called with `cfg.kwargs`, plus `in_channels=cfg.in_channels` when its signature
names `in_channels` (and `cfg.kwargs` does not). It returns either

* an `Encoder` (used as is; `cfg.projector_dims` must then be empty, and `representation`
  "auto" keeps the encoder's own choice), or
* an `nn.Module` backbone mapping images to (batch, dim) features. Its width is read from an
  int attribute `out_dim`; a backbone without one can declare it as `cfg.kwargs["out_dim"]`,
  which is then passed to the factory only if its signature accepts it.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from pipeline.config import ModelConfig

from .common import ModelError
from .convnext import convnext_tiny
from .efficientnet import efficientnet_b0
from .encoder import Encoder, resolve_representation
from .external import external_factory
from .heads import ProjectorMLP
from .loading import LoadReport, OpenURI, file_sha256, load_weights
from .mobilenet import mobilenet_v2, mobilenet_v3_large, mobilenet_v3_small
from .resnet import resnet18, resnet50
from .small import SmallCNN, TinyCNN
from .vit import (
    vit_base_patch14_dinov2,
    vit_base_patch14_reg4_dinov2,
    vit_base_patch16,
    vit_small_patch14_dinov2,
    vit_small_patch14_reg4_dinov2,
    vit_small_patch16,
    vit_tiny_patch16,
)

# Every built-in backbone keeps the state-dict keys of its public checkpoints (torchvision,
# timm, DINO, DINOv2); see each module's docstring. ViTs take `pool` ("cls" or "mean").
BUILTIN_ARCHS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet50": resnet50,
    "convnext_tiny": convnext_tiny,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3_large": mobilenet_v3_large,
    "mobilenet_v3_small": mobilenet_v3_small,
    "efficientnet_b0": efficientnet_b0,
    "vit_tiny_patch16": vit_tiny_patch16,
    "vit_small_patch16": vit_small_patch16,
    "vit_base_patch16": vit_base_patch16,
    "vit_small_patch14_dinov2": vit_small_patch14_dinov2,
    "vit_base_patch14_dinov2": vit_base_patch14_dinov2,
    "vit_small_patch14_reg4_dinov2": vit_small_patch14_reg4_dinov2,
    "vit_base_patch14_reg4_dinov2": vit_base_patch14_reg4_dinov2,
    "small_cnn": SmallCNN,
    "tiny_cnn": TinyCNN,
}


def build_encoder(
    cfg: ModelConfig, *, open_uri: OpenURI | None = None, strict: bool = True
) -> Encoder:
    """Encoder for `cfg`, with `cfg.checkpoint` loaded (see `load_weights`), in eval mode."""
    built = build_backbone(cfg)
    if isinstance(built, Encoder):
        encoder = _adopt_encoder(built, cfg)
    else:
        dims = list(cfg.projector_dims)
        projector = ProjectorMLP(built.out_dim, dims) if dims else None
        encoder = Encoder(built, projector, cfg.representation)
    if cfg.checkpoint:
        load_weights(encoder, cfg.checkpoint, open_uri=open_uri, strict=strict)
    return encoder.eval()


def _adopt_encoder(encoder: Encoder, cfg: ModelConfig) -> Encoder:
    if cfg.projector_dims:
        raise ModelError(
            f"arch {cfg.arch!r} returned a full Encoder; leave model.projector_dims empty "
            "(the factory defines its own projector)"
        )
    if cfg.representation != "auto":
        has_projector = encoder.projector is not None
        encoder.representation = resolve_representation(cfg.representation, has_projector)
    return encoder


def build_backbone(cfg: ModelConfig) -> nn.Module:
    """The backbone (or full `Encoder`) named by `cfg.arch`, freshly initialised."""
    factory = BUILTIN_ARCHS.get(cfg.arch) or external_factory(cfg.arch) or import_factory(cfg.arch)
    kwargs = dict(cfg.kwargs)
    params, var_kw = _signature(factory)
    if "in_channels" in params and "in_channels" not in kwargs:
        kwargs["in_channels"] = cfg.in_channels
    declared = None
    if "out_dim" in kwargs and "out_dim" not in params and not var_kw:
        declared = kwargs.pop("out_dim")
    try:
        built = factory(**kwargs)
    except TypeError as exc:
        raise ModelError(f"arch {cfg.arch!r} rejected arguments {kwargs}: {exc}") from exc
    return _check_built(built, cfg.arch, declared)


def import_factory(spec: str) -> Callable[..., Any]:
    """Callable named by `"package.module:function"` (the attribute may be dotted)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ModelError(
            f"unknown arch {spec!r}: use one of {sorted(BUILTIN_ARCHS)} "
            "or 'timm:<name>', 'torchvision:<name>', or a factory 'package.module:function'"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"arch {spec!r}: cannot import module {module_name!r}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelError(f"arch {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(f"arch {spec!r}: {attr!r} is not callable")
    return obj


def _signature(fn: Callable[..., Any]) -> tuple[set[str], bool]:
    """Named parameters of `fn`, and whether it takes **kwargs."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set(), True
    named = {p.name for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD}
    return named, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _check_built(built: Any, arch: str, declared: Any) -> nn.Module:
    if isinstance(built, Encoder):
        return built
    if not isinstance(built, nn.Module):
        raise ModelError(f"arch {arch!r} returned {type(built).__name__}, not an nn.Module")
    if not isinstance(getattr(built, "out_dim", None), int):
        if declared is None:
            raise ModelError(
                f"arch {arch!r} returned a backbone without an int `out_dim`; "
                "give its feature width as model.kwargs.out_dim"
            )
        built.out_dim = int(declared)
    return built


def model_identity(
    encoder: Encoder, cfg: ModelConfig, *, open_uri: OpenURI | None = None
) -> dict[str, Any]:
    """What the manifest records about the encoder (plain JSON-able data)."""
    return {
        "arch": cfg.arch,
        "checkpoint": cfg.checkpoint,
        "checkpoint_sha256": _checkpoint_sha256(encoder, cfg, open_uri),
        "num_parameters": sum(p.numel() for p in encoder.parameters()),
        "representation": encoder.representation,
        "out_dim": encoder.out_dim,
        "projector_dims": list(cfg.projector_dims),
        "in_channels": cfg.in_channels,
        "kwargs": dict(cfg.kwargs),
    }


def _checkpoint_sha256(encoder: Encoder, cfg: ModelConfig, open_uri: OpenURI | None):
    if not cfg.checkpoint:
        return None
    report = encoder.load_report
    if isinstance(report, LoadReport) and report.uri == cfg.checkpoint:
        return report.sha256  # hashed when loaded: no second read
    return file_sha256(cfg.checkpoint, open_uri)
