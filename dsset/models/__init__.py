"""Encoders, the set encoder and heads (Flax Linen modules used through init/apply)."""

from dsset.models.deepset import SetEncoder
from dsset.models.heads import LinearHead, ProjectionHead
from dsset.models.layers import Layers, resolve_cpu_fast_path, resolve_dtype
from dsset.models.resnet import BACKBONES, ResNet, ResNet10, ResNet18, ResNet50, feature_dim, make_backbone

__all__ = [
    'BACKBONES', 'Layers', 'LinearHead', 'ProjectionHead', 'ResNet', 'ResNet10', 'ResNet18', 'ResNet50', 'SetEncoder',
    'feature_dim', 'make_backbone', 'resolve_cpu_fast_path', 'resolve_dtype',
]
