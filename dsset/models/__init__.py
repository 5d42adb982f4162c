"""Encoders, the set encoder, the slice transformer and heads (Flax Linen modules used through
init/apply)."""

from dsset.models.deepset import SetEncoder
from dsset.models.deformable_attention import DeformableAttention1D, DeformableTransformerBlock
from dsset.models.heads import LinearHead, PretextHead, ProjectionHead
from dsset.models.layers import Layers, resolve_cpu_fast_path, resolve_dtype
from dsset.models.resnet import BACKBONES, ResNet, ResNet10, ResNet18, ResNet50, feature_dim, make_backbone
from dsset.models.slice_transformer import SliceEmbedding, SliceTransformer, volume_feature
from dsset.models.unet3d import Segmentation3DModel, UNet3DDecoder, UNet3DEncoder, make_unet3d

__all__ = [
    'BACKBONES', 'DeformableAttention1D', 'DeformableTransformerBlock', 'Layers', 'LinearHead',
    'PretextHead', 'ProjectionHead', 'ResNet', 'ResNet10', 'ResNet18', 'ResNet50',
    'Segmentation3DModel', 'SetEncoder', 'SliceEmbedding', 'SliceTransformer', 'UNet3DDecoder',
    'UNet3DEncoder', 'feature_dim', 'make_backbone', 'make_unet3d', 'resolve_cpu_fast_path',
    'resolve_dtype', 'volume_feature',
]
