"""A U-Net-style decoder on the feature maps of a 2D ResNet, for per-pixel segmentation.

The encoder's maps (after the stem and after each stage, ResNet(..., stages=True)) are the skips.
Starting from the deepest map, each level upsamples (bilinear) to the next skip's resolution (x2,
or x1 where a stage keeps the resolution, as the first stage does), concatenates the skip and
applies [3x3 conv - BatchNorm - ReLU] x 2 with the skip's width. Levels without a skip (the
large stem halves the input twice before its first map) continue the x2 upsampling up to the input
resolution; a 1x1 conv with bias gives the class logits.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsset.models import resnet
from dsset.models.layers import Layers

# Where SegmentationModel keeps its encoder: pretrained encoders are inserted there.
ENCODER_PATH = ('backbone',)


def _resize(x: jax.Array, size: Sequence[int]) -> jax.Array:
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  return jax.image.resize(x, (x.shape[0], *size, x.shape[3]), 'bilinear')


class ConvBlock(nn.Module):
  """[3x3 conv - BatchNorm - ReLU] x 2, `features` channels out."""
  features: int
  layers: Layers = Layers()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for _ in range(2):
      x = self.layers.conv(self.features, (3, 3), padding=((1, 1), (1, 1)))(x)
      x = nn.relu(self.layers.norm(train)(x))
    return x


class UNetDecoder(nn.Module):
  """Encoder maps [shallowest, ..., deepest] -> float32 logits [N, H, W, num_classes].

  SegmentationModel passes the encoder's `layers`: the decoder computes in the encoder's dtype and
  CPU path.
  """
  num_classes: int
  layers: Layers = Layers()

  @nn.compact
  def __call__(self, maps: Sequence[jax.Array], output_size: Sequence[int],
               train: bool) -> jax.Array:
    block = lambda width: ConvBlock(width, self.layers)
    x = maps[-1]
    for skip in reversed(maps[:-1]):
      x = _resize(x, skip.shape[1:3])
      x = block(skip.shape[-1])(jnp.concatenate([x, skip.astype(x.dtype)], axis=-1), train)
    height, width = output_size
    while 2 * x.shape[1] <= height and 2 * x.shape[2] <= width:
      x = block(x.shape[-1])(_resize(x, (2 * x.shape[1], 2 * x.shape[2])), train)
    # Input sides that are not the encoder's stride times a power of two end on a last resize.
    x = _resize(x, output_size)
    logits = self.layers.conv(self.num_classes, (1, 1), use_bias=True)(x)
    return logits.astype(jnp.float32)


class SegmentationModel(nn.Module):
  """images [N, H, W, C] (normalised) -> logits [N, H, W, num_classes].

  The encoder lives under ENCODER_PATH. train_encoder=False runs it in eval mode (BatchNorm
  running statistics) and stops gradients at its maps, for a warm-up with a frozen encoder.
  """
  backbone: resnet.ResNet
  num_classes: int

  @nn.compact
  def __call__(self, images: jax.Array, train: bool, train_encoder: bool = True) -> jax.Array:
    maps = self.backbone(images, train=train and train_encoder, stages=True)
    if not train_encoder:
      maps = jax.lax.stop_gradient(maps)
    decoder = UNetDecoder(self.num_classes, self.backbone.layers, name='decoder')
    return decoder(maps, images.shape[1:3], train)
