"""Encoders: torchvision-compatible ResNets, small CNNs, projector heads, checkpoint loading."""

from .encoder import Encoder, resolve_representation
from .heads import ProjectorMLP
from .loading import (
    CheckpointError,
    LoadReport,
    OpenURI,
    load_weights,
    parse_checkpoint,
    read_bytes,
)
from .registry import BUILTIN_ARCHS, build_backbone, build_encoder, import_factory, model_identity
from .resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet50
from .small import MixedNet, SmallCNN, TinyCNN

__all__ = [
    "BUILTIN_ARCHS",
    "BasicBlock",
    "Bottleneck",
    "CheckpointError",
    "Encoder",
    "LoadReport",
    "MixedNet",
    "OpenURI",
    "ProjectorMLP",
    "ResNet",
    "SmallCNN",
    "TinyCNN",
    "build_backbone",
    "build_encoder",
    "import_factory",
    "load_weights",
    "model_identity",
    "parse_checkpoint",
    "read_bytes",
    "resnet18",
    "resnet50",
    "resolve_representation",
]
