"""Backbones: detectron2-named ResNet and Swin Transformer, plus ImageNet weight loading.

``build_backbone(cfg)`` turns a :class:`~focus_detr.config.ResNetConfig` or
:class:`~focus_detr.config.SwinConfig` into a module following :class:`BackboneProtocol`.
"""

from __future__ import annotations

from torch import nn

from focus_detr.backbones.base import Backbone, BackboneProtocol
from focus_detr.backbones.resnet import ResNet, build_resnet
from focus_detr.backbones.swin import SwinTransformer, build_swin
from focus_detr.backbones.weights import (
    LoadReport,
    load_backbone_weights,
    load_detectron2_resnet_pkl,
    load_detectron2_resnet_state_dict,
    load_swin_imagenet,
    load_torchvision_resnet,
)
from focus_detr.config import ResNetConfig, SwinConfig


def build_backbone(cfg: ResNetConfig | SwinConfig) -> nn.Module:
    """The backbone described by ``cfg`` (randomly initialised; see :func:`load_backbone_weights`)."""
    if isinstance(cfg, ResNetConfig):
        return build_resnet(cfg)
    if isinstance(cfg, SwinConfig):
        return build_swin(cfg)
    raise TypeError(f"build_backbone expects a ResNetConfig or SwinConfig, got {type(cfg).__name__}")


__all__ = [
    "Backbone",
    "BackboneProtocol",
    "LoadReport",
    "ResNet",
    "SwinTransformer",
    "build_backbone",
    "build_resnet",
    "build_swin",
    "load_backbone_weights",
    "load_detectron2_resnet_pkl",
    "load_detectron2_resnet_state_dict",
    "load_swin_imagenet",
    "load_torchvision_resnet",
]
