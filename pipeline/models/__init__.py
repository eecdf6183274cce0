"""Encoders keyed like public checkpoints (torchvision ResNet/ConvNeXt/MobileNet/EfficientNet,
timm/DINO/DINOv2 ViTs), small CNNs, projector heads, checkpoint loading."""

from .common import ModelError
from .convnext import ConvNeXt, convnext_tiny
from .efficientnet import EfficientNet, efficientnet_b0
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
from .mobilenet import (
    MobileNetV2,
    MobileNetV3,
    mobilenet_v2,
    mobilenet_v3_large,
    mobilenet_v3_small,
)
from .registry import BUILTIN_ARCHS, build_backbone, build_encoder, import_factory, model_identity
from .resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet50
from .small import MixedNet, SmallCNN, TinyCNN
from .vit import VisionTransformer

__all__ = [
    "BUILTIN_ARCHS",
    "BasicBlock",
    "Bottleneck",
    "CheckpointError",
    "ConvNeXt",
    "EfficientNet",
    "Encoder",
    "LoadReport",
    "MixedNet",
    "MobileNetV2",
    "MobileNetV3",
    "ModelError",
    "OpenURI",
    "ProjectorMLP",
    "ResNet",
    "SmallCNN",
    "TinyCNN",
    "VisionTransformer",
    "build_backbone",
    "build_encoder",
    "convnext_tiny",
    "efficientnet_b0",
    "import_factory",
    "load_weights",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "model_identity",
    "parse_checkpoint",
    "read_bytes",
    "resnet18",
    "resnet50",
    "resolve_representation",
]
