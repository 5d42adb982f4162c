"""Encoders, the set encoder and heads (Flax Linen modules used through init/apply)."""

from dsset.models.deepset import SetEncoder
from dsset.models.heads import LinearHead, ProjectionHead
from dsset.models.resnet import (BACKBONES, ResNet, ResNet18, ResNet50, feature_dim, make_backbone,
                                 resolve_cpu_fast_path, resolve_dtype)

__all__ = [
    'BACKBONES', 'LinearHead', 'ProjectionHead', 'ResNet', 'ResNet18', 'ResNet50', 'SetEncoder',
    'feature_dim', 'make_backbone', 'resolve_cpu_fast_path', 'resolve_dtype',
]
