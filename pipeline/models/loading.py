"""Reading encoder checkpoints: bytes from a URI, a state dict from the bytes, keys matched.

Loading is strict on purpose: an encoder with silently random layers would give plausible but
wrong influence scores. The only keys dropped are heads the config chose not to build (`fc.*`
of a classifier checkpoint into a feature backbone, or whatever the backbone lists in its
`head_prefixes`, e.g. `head.*` of a ViT; `projector.*` into an encoder without a projector),
each with a logged note.
"""

from __future__ import annotations

import hashlib
import io
import logging
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import torch
from torch import nn

from pipeline.errors import UserError

from .encoder import Encoder

logger = logging.getLogger(__name__)

OpenURI = Callable[[str], bytes]

# Top-level keys under which training checkpoints keep the model's state dict, in order of
# preference ("teacher" before nothing else: DINO evaluates the teacher).
WRAPPER_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "online_network_state_dict",
    "online_network",
    "teacher",
    "network",
    "net",
)
# Key prefixes added by wrappers (DDP, torch.compile, Lightning modules, SSL method classes),
# stripped one at a time until a key names a parameter of the encoder or its backbone.
STRIP_PREFIXES = (
    "module.",
    "_orig_mod.",
    "model.",
    "encoder.",
    "backbone.",
    "online_network.",
    "network.",
    "net.",
)
_SHOW = 5  # how many keys of each kind an error message lists


class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be read, or does not fit the encoder."""


@dataclass
class LoadReport:
    """What `load_weights` did; kept on the encoder as `encoder.load_report`."""

    uri: str
    sha256: str
    loaded: int
    dropped: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def read_bytes(uri: str, open_uri: OpenURI | None = None) -> bytes:
    """Bytes of a checkpoint. `open_uri` (e.g. the storage layer's reader) handles any URI;
    without it only local paths and `file://` URIs are readable."""
    if open_uri is not None:
        try:
            return open_uri(uri)
        except Exception as exc:
            raise CheckpointError(f"cannot read checkpoint {uri}: {exc}") from exc
    path = local_path(uri)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path.read_bytes()


def local_path(uri: str) -> Path:
    """Path of a local path or `file://` URI; other schemes need an `open_uri` reader."""
    if "://" not in uri:
        return Path(uri).expanduser()
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        raise CheckpointError(
            f"cannot read checkpoint {uri}: scheme {parsed.scheme!r} needs an `open_uri` reader"
        )
    host = parsed.netloc if parsed.netloc not in ("", "localhost") else ""
    return Path(unquote(host + parsed.path))


def parse_checkpoint(data: bytes, uri: str) -> dict[str, torch.Tensor]:
    """Flat state dict from checkpoint bytes: safetensors, else `torch.load(weights_only)`."""
    is_safetensors = uri.endswith(".safetensors") or _looks_like_safetensors(data)
    fmt = "safetensors" if is_safetensors else "torch (weights_only)"
    try:
        if is_safetensors:
            from safetensors.torch import load as load_safetensors

            obj: Any = load_safetensors(data)
        else:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot parse checkpoint {uri} as {fmt}: {exc}") from exc
    return find_state_dict(obj, uri)


def _looks_like_safetensors(data: bytes) -> bool:
    # Layout: u64 little-endian header length, then a JSON object.
    if len(data) < 10:
        return False
    (n,) = struct.unpack("<Q", data[:8])
    return n <= len(data) - 8 and data[8:9] == b"{"


def find_state_dict(obj: Any, uri: str) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint object: descend through wrapper keys, then flatten
    nested mappings to dotted keys and drop non-tensor entries (epoch, config, ...)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"checkpoint {uri} holds a {type(obj).__name__}, expected a state dict (a mapping)"
        )
    for key in WRAPPER_KEYS:
        if isinstance(obj.get(key), Mapping):
            return find_state_dict(obj[key], uri)
    flat = _flatten(obj)
    if not flat:
        raise CheckpointError(
            f"checkpoint {uri} holds no tensors; top-level keys: {_first(list(obj))}"
        )
    return flat


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    flat: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            flat[prefix + str(key)] = value
        elif isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def load_weights(
    encoder: Encoder,
    uri: str,
    *,
    open_uri: OpenURI | None = None,
    strict: bool = True,
) -> LoadReport:
    """Load a checkpoint into `encoder` in place.

    Accepts a raw state dict or one under a wrapper key (`WRAPPER_KEYS`), with keys either of
    the full encoder (`backbone.*`, `projector.*`) or of the backbone alone, possibly behind
    `STRIP_PREFIXES`. Missing keys and shape mismatches are always an error (except
    `num_batches_tracked` and the backbone's `optional_keys`, unused in eval mode); unexpected
    keys are an error when `strict`, else logged and ignored.
    """
    data = read_bytes(uri, open_uri)
    source = parse_checkpoint(data, uri)
    target = encoder.state_dict()
    mapped, dropped, unexpected = match_keys(source, encoder, uri)
    # Unused in eval mode, so a checkpoint may lack them: BatchNorm step counts, and keys a
    # backbone lists as `optional_keys` (DINOv2's mask token, absent from timm's conversions).
    optional = {f"backbone.{k}" for k in getattr(encoder.backbone, "optional_keys", ())}
    missing = [
        k
        for k in target
        if k not in mapped and not k.endswith("num_batches_tracked") and k not in optional
    ]
    # Listed in model order: safetensors does not keep the file's key order.
    shapes = [
        f"{k} (checkpoint {tuple(mapped[k].shape)}, model {tuple(t.shape)})"
        for k, t in target.items()
        if k in mapped and mapped[k].shape != t.shape
    ]
    if missing or shapes or (unexpected and strict):
        raise CheckpointError(_mismatch_message(uri, missing, unexpected if strict else [], shapes))
    if unexpected:
        logger.warning("checkpoint %s: ignored %d unexpected keys", uri, len(unexpected))
    if dropped:
        logger.info("checkpoint %s: dropped head keys not in the model: %s", uri, _first(dropped))
    encoder.load_state_dict({**target, **mapped}, strict=True)
    report = LoadReport(uri, hashlib.sha256(data).hexdigest(), len(mapped), dropped, unexpected)
    encoder.load_report = report
    return report


def match_keys(
    source: dict[str, torch.Tensor], encoder: Encoder, uri: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Rename checkpoint keys to encoder keys: returns (mapped, dropped heads, unexpected)."""
    full = set(encoder.state_dict())
    backbone = set(encoder.backbone.state_dict())
    fc_is_identity = isinstance(getattr(encoder.backbone, "fc", None), nn.Identity)
    # Classifier keys of backbones that do not build their classifier (built-in ViT,
    # ConvNeXt, MobileNet, EfficientNet; timm:/torchvision: archs).
    head_prefixes = tuple(getattr(encoder.backbone, "head_prefixes", ()))
    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    dropped: list[str] = []
    unexpected: list[str] = []
    for key, value in source.items():
        name, stripped = _resolve(key, full, backbone)
        if name is None:
            is_fc = (fc_is_identity and stripped.startswith("fc.")) or stripped.startswith(
                head_prefixes
            )
            is_head = encoder.projector is None and stripped.startswith("projector.")
            (dropped if is_fc or is_head else unexpected).append(key)
            continue
        if name in mapped:
            raise CheckpointError(
                f"checkpoint {uri}: keys {origin[name]!r} and {key!r} both map to {name!r}"
            )
        mapped[name], origin[name] = value, key
    if any(k.startswith("projector.") for k in dropped):
        logger.warning(
            "checkpoint %s has projector weights but the encoder has no projector; "
            "they are not loaded (set model.projector_dims to use them)",
            uri,
        )
    return mapped, sorted(dropped), sorted(unexpected)


def _resolve(key: str, full: set[str], backbone: set[str]) -> tuple[str | None, str]:
    """Encoder key for checkpoint `key` (None if none), and the key with prefixes stripped."""
    while True:
        if key in full:
            return key, key
        if key in backbone:
            return "backbone." + key, key
        for prefix in STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        else:
            return None, key


def _mismatch_message(
    uri: str, missing: list[str], unexpected: list[str], shapes: list[str]
) -> str:
    parts = [f"checkpoint {uri} does not fit the encoder:"]
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_first(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_first(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches ({len(shapes)}): {_first(shapes)}")
    return "\n  ".join(parts)


def _first(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f", ... (+{len(items) - _SHOW} more)" if len(items) > _SHOW else "")


def file_sha256(uri: str, open_uri: OpenURI | None = None) -> str:
    """sha256 of the checkpoint's bytes."""
    return hashlib.sha256(read_bytes(uri, open_uri)).hexdigest()
