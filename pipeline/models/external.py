"""`model.arch = "timm:<name>"` / `"torchvision:<name>"`: backbones from those packages.

Neither package is a dependency: each is imported only when such an arch is asked for, and a
missing one is a `ModelError` that says what to install. Models are built with random
weights (timm `pretrained=False`, torchvision `weights=None`): nothing is downloaded, the
weights come from `model.checkpoint`. The classifier is removed, the width of what remains is
the backbone's `out_dim`, and the classifier's checkpoint keys are dropped on load
(`head_prefixes`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import partial
from types import ModuleType
from typing import Any

from torch import nn

from .common import ModelError

PREFIXES = ("timm:", "torchvision:")
# Attributes that hold the classifier in torchvision's classification models.
TORCHVISION_HEADS = ("fc", "classifier", "head", "heads")
_DOWNLOAD_ARGS = ("pretrained", "weights", "pretrained_cfg_overlay")


def external_factory(arch: str) -> Callable[..., nn.Module] | None:
    """Factory for a `timm:` / `torchvision:` arch, None for any other arch string."""
    package, sep, name = arch.partition(":")
    if not sep or package not in ("timm", "torchvision"):
        return None
    if not name:
        raise ModelError(f"arch {arch!r} names no model: use '{package}:<model name>'")
    builder = timm_backbone if package == "timm" else torchvision_backbone
    return partial(builder, name)


def _require(module: str, package: str, name: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModelError(
            f"arch '{package}:{name}' needs the {package} package, which is not importable "
            f"({exc}): install it (pip install {package}) or use a built-in arch"
        ) from exc


def _refuse_downloads(package: str, kwargs: dict[str, Any]) -> None:
    given = sorted(k for k in _DOWNLOAD_ARGS if k in kwargs)
    if given:
        raise ModelError(
            f"model.kwargs {given} would make {package} download weights; "
            "leave them out and give the weights as model.checkpoint"
        )


def timm_backbone(name: str, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """timm model `name` without its classifier (`num_classes=0`): pooled pre-logit features."""
    _refuse_downloads("timm", kwargs)
    timm = _require("timm", "timm", name)
    model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_channels, **kwargs)
    # head_hidden_size: the pre-logits width where a model has a hidden head layer (timm's
    # MobileNetV3 conv_head); older timm has only num_features.
    width = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    if not isinstance(width, int):
        raise ModelError(f"timm model {name!r} reports no feature width (num_features)")
    model.out_dim = width
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or "head"
    names = classifier if isinstance(classifier, tuple | list) else (classifier,)
    model.head_prefixes = tuple(f"{n}." for n in names)
    return model


def torchvision_backbone(name: str, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """torchvision classification model `name` with its last classifier Linear replaced by
    `nn.Identity`: the output is what fed that Linear."""
    _refuse_downloads("torchvision", kwargs)
    if in_channels != 3:
        raise ModelError(
            f"torchvision:{name} takes 3-channel images, not model.in_channels={in_channels}: "
            "set model.in_channels=3 (grey images can be repeated to RGB) or use a built-in arch"
        )
    models = _require("torchvision.models", "torchvision", name)
    if hasattr(models, "get_model"):
        model = models.get_model(name, weights=None, **kwargs)
    elif callable(getattr(models, name, None)):
        model = getattr(models, name)(pretrained=False, **kwargs)
    else:
        raise ModelError(f"torchvision.models has no model {name!r}")
    strip_classifier(model, name)
    return model


def strip_classifier(model: nn.Module, name: str = "model") -> int:
    """Replace the last nn.Linear under a classifier attribute (`TORCHVISION_HEADS`) by
    `nn.Identity`; set and return `model.out_dim` (that Linear's input width) and
    `model.head_prefixes` (its checkpoint keys, to drop on load)."""
    found = [
        (path, m)
        for path, m in model.named_modules()
        if isinstance(m, nn.Linear) and path.split(".")[0] in TORCHVISION_HEADS
    ]
    if not found:
        raise ModelError(
            f"{name}: no nn.Linear classifier under {TORCHVISION_HEADS} to remove; "
            "wrap the model in a 'package.module:function' factory that returns features"
        )
    path, linear = found[-1]
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, nn.Identity())
    model.out_dim = int(linear.in_features)
    model.head_prefixes = (f"{path}.",)
    return model.out_dim
