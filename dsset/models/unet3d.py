"""The 3D U-Net of Taleb et al.'s 3D proxy tasks (METHODS.md section 2): encoder and decoder.

Volumes are channels-last [N, D, H, W, C]. The encoder is the U-Net's down path: per level
[3^3 conv (padding 1) - BatchNorm - ReLU] x 2, then a 2^3 max-pool; a bottleneck level of the same
two convs without the pool. Its pooled features feed the pretext heads; with skips=True it also
returns each level's map before the pool, for the decoder (3D segmentation fine-tuning). The
decoder goes back up level by level: 2^3 transposed conv (stride 2) to the skip's width, concat
the skip, [3^3 conv - BatchNorm - ReLU] x 2; then a 1^3 conv with bias gives the class logits.

Every conv, BatchNorm and pool comes from one `Layers`, so the XLA:CPU rewrites of dsset.ops
(docs/performance.md, "3D U-Net on XLA:CPU") apply exactly when model.cpu_fast_path is on, with
the same variables either way.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dsset.models.layers import Layers

# The model.backbone value that selects this encoder (the 2D ones are in resnet.BACKBONES).
BACKBONE = 'unet3d'
# Where Segmentation3DModel (and other wrappers) keep the encoder: pretrained encoders go there.
ENCODER_PATH = ('backbone',)

_PAD_1 = ((1, 1),) * 3


class ConvBlock3D(nn.Module):
  """[3^3 conv - BatchNorm - ReLU] x 2 with `features` channels out."""
  features: int
  layers: Layers = Layers()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for _ in range(2):
      x = self.layers.conv(self.features, (3, 3, 3), padding=_PAD_1)(x)
      x = nn.relu(self.layers.norm(train)(x))
    return x


class UNet3DEncoder(nn.Module):
  """Down path of the 3D U-Net.

  Attributes:
    filters: width of each pooled level (one ConvBlock3D and a 2^3 max-pool each).
    bottleneck: width of the deepest level (a ConvBlock3D, no pool).
    dropout: rate of the nn.Dropout after each level's ConvBlock3D, bottleneck included; 0 adds
      none. In train mode it needs rngs={'dropout': key}.
    layers: convs, BatchNorms and pools (compute dtype, CPU fast path).
  """
  filters: Sequence[int] = (16, 32, 64, 128)
  bottleneck: int = 256
  dropout: float = 0.0
  layers: Layers = Layers()

  @property
  def num_features(self) -> int:
    """Length of the pooled feature vector."""
    return self.bottleneck

  def _level(self, x: jax.Array, features: int, train: bool) -> jax.Array:
    x = ConvBlock3D(features, self.layers)(x, train)
    if self.dropout > 0:
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return x

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, skips: bool = False):
    """Encodes volumes.

    Args:
      x: float volumes [N, D, H, W, C]; each spatial side must be a multiple of 2**len(filters).
      train: BatchNorm uses and updates batch statistics; dropout is active.
      skips: also return the maps the decoder needs.

    Returns:
      skips=False: float32 features [N, bottleneck], the global average of the bottleneck map.
      skips=True: (bottleneck map [N, D/2^L, H/2^L, W/2^L, bottleneck], [skip maps, shallowest
      first]), each skip being its level's output before the pool; maps in the compute dtype.
    """
    if x.ndim != 5:
      raise ValueError(f'UNet3DEncoder expects volumes [N, D, H, W, C], got shape {x.shape}')
    factor = 2 ** len(self.filters)
    if any(side % factor for side in x.shape[1:4]):
      raise ValueError(f'each side of the volume must be a multiple of {factor} (2 ** the number '
                       f'of pooled levels, {len(self.filters)}), got {tuple(x.shape[1:4])}')
    maps = []
    for features in self.filters:
      x = self._level(x, features, train)
      maps.append(x)
      x = self.layers.max_pool(x, (2, 2, 2), (2, 2, 2), ((0, 0),) * 3)
    x = self._level(x, self.bottleneck, train)
    if skips:
      return x, maps
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2, 3))


class UNet3DDecoder(nn.Module):
  """(bottleneck map, skips shallowest first) -> float32 logits [N, D, H, W, num_classes].

  Segmentation3DModel passes the encoder's `layers`, so the decoder computes in the encoder's
  dtype and CPU path.
  """
  num_classes: int
  layers: Layers = Layers()

  @nn.compact
  def __call__(self, bottleneck_map: jax.Array, skips: Sequence[jax.Array],
               train: bool) -> jax.Array:
    x = bottleneck_map
    for skip in reversed(skips):
      width = skip.shape[-1]
      x = self.layers.conv_transpose(width, (2, 2, 2))(x)
      x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
      x = ConvBlock3D(width, self.layers)(x, train)
    logits = self.layers.conv(self.num_classes, (1, 1, 1), use_bias=True)(x)
    return logits.astype(jnp.float32)


class Segmentation3DModel(nn.Module):
  """volumes [N, D, H, W, C] -> float32 logits [N, D, H, W, num_classes].

  The encoder lives under ENCODER_PATH, the decoder under 'decoder'. train_encoder=False runs the
  encoder in eval mode (BatchNorm running statistics, no dropout) and stops gradients at its maps,
  for a warm-up with a frozen encoder.
  """
  backbone: UNet3DEncoder
  num_classes: int

  @nn.compact
  def __call__(self, volumes: jax.Array, train: bool, train_encoder: bool = True) -> jax.Array:
    bottleneck_map, skips = self.backbone(volumes, train=train and train_encoder, skips=True)
    if not train_encoder:
      bottleneck_map, skips = jax.lax.stop_gradient((bottleneck_map, skips))
    decoder = UNet3DDecoder(self.num_classes, self.backbone.layers, name='decoder')
    return decoder(bottleneck_map, skips, train)


def _positive_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value > 0


def make_unet3d(model_config: ml_collections.ConfigDict) -> UNet3DEncoder:
  """The encoder that model.unet3d.filters / .bottleneck / .dropout and model.dtype /
  model.cpu_fast_path describe; a bad value raises ValueError naming its key."""
  if 'unet3d' not in model_config:
    raise ValueError('model.unet3d is missing: it holds filters, bottleneck and dropout')
  options = model_config.unet3d
  filters = options.filters
  if (isinstance(filters, (str, bytes)) or not isinstance(filters, Sequence) or not filters
      or not all(_positive_int(f) for f in filters)):
    raise ValueError(f'model.unet3d.filters must be a non-empty sequence of positive integers, '
                     f'got {filters!r}')
  if not _positive_int(options.bottleneck):
    raise ValueError(f'model.unet3d.bottleneck must be a positive integer, '
                     f'got {options.bottleneck!r}')
  dropout = options.dropout
  if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
    raise ValueError(f'model.unet3d.dropout must be a number in [0, 1), got {dropout!r}')
  return UNet3DEncoder(tuple(filters), options.bottleneck, float(dropout),
                       Layers.for_model(model_config))
