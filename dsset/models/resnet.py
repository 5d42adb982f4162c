"""2D ResNets in torchvision's layout, without the classifier, for grey (or RGB) slices.

`ResNet(...).apply(variables, x, train=...)` maps images [N, H, W, C] to features [N, D] (float32);
`method=ResNet.features_and_stage_pools` also gives every stage's pooled output, same variables.
The number of input channels is taken from the input, so single-channel scans need no repetition.
"""

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dsset.models.layers import Conv, Layers, Padding


def _global_average_pool(x: jax.Array) -> jax.Array:
  """[N, h, w, c] in any dtype -> float32 [N, c], averaged in float32."""
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def _pad(kernel: int) -> Padding:
  # torchvision pads every conv and the max-pool symmetrically by kernel // 2.
  return ((kernel // 2, kernel // 2),) * 2


class _Block(nn.Module):
  """Shared plumbing of the residual blocks: torchvision's square convs and the shortcut."""
  width: int
  strides: int
  layers: Layers

  def conv(self, features: int, kernel: int, strides: int = 1) -> Conv:
    return self.layers.conv(features, (kernel, kernel), (strides, strides), _pad(kernel))

  def shortcut(self, x: jax.Array, out_features: int, train: bool,
               mask: jax.Array | None) -> jax.Array:
    # torchvision projects the identity (1x1 conv + BN) only when the shape changes.
    if self.strides == 1 and x.shape[-1] == out_features:
      return x
    return self.layers.norm(train)(self.conv(out_features, 1, self.strides)(x), mask=mask)


class BasicBlock(_Block):
  """Two 3x3 convs (ResNet-18/34); output width = `width`."""
  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None) -> jax.Array:
    y = nn.relu(self.layers.norm(train)(self.conv(self.width, 3, self.strides)(x), mask=mask))
    y = self.layers.norm(train)(self.conv(self.width, 3)(y), mask=mask)
    return nn.relu(y + self.shortcut(x, self.width, train, mask))


class Bottleneck(_Block):
  """1x1 - 3x3 (strided, as torchvision's v1.5) - 1x1 convs; output width = 4 * `width`."""
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None) -> jax.Array:
    out = self.width * self.expansion
    y = nn.relu(self.layers.norm(train)(self.conv(self.width, 1)(x), mask=mask))
    y = nn.relu(self.layers.norm(train)(self.conv(self.width, 3, self.strides)(y), mask=mask))
    y = self.layers.norm(train)(self.conv(out, 1)(y), mask=mask)
    return nn.relu(y + self.shortcut(x, out, train, mask))


class ResNet(nn.Module):
  """Feature extractor: stem, four stages of residual blocks, global average pool.

  Attributes:
    stage_sizes: blocks per stage.
    block: BasicBlock or Bottleneck.
    small_stem: 3x3/1 stem conv and no max-pool (for 28-64 px inputs) instead of 7x7/2 + 3x3/2 pool.
    width_multiplier: scales every layer's width (64, 128, 256, 512 base widths).
    layers: the convs, BatchNorms and max-pool of every block (compute dtype, CPU fast path);
      parameters and returned features stay float32 either way.
  """
  stage_sizes: Sequence[int]
  block: type[_Block]
  small_stem: bool = False
  width_multiplier: float = 1.0
  layers: Layers = Layers()

  def stage_width(self, stage: int) -> int:
    return max(1, int(64 * 2**stage * self.width_multiplier))

  @property
  def num_features(self) -> int:
    """Length D of the feature vector."""
    return self.stage_width(len(self.stage_sizes) - 1) * self.block.expansion

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None,
               stages: bool = False) -> jax.Array | list[jax.Array]:
    """Encodes images.

    Args:
      x: images [N, H, W, C].
      train: BatchNorm uses (and updates) batch statistics instead of running averages.
      mask: optional boolean [N]; in train mode only the True images enter the batch statistics.
      stages: return the feature maps of every level instead of the pooled features (for dense
        decoders such as dsset.models.unet). The parameters are the same either way.

    Returns:
      float32 features [N, num_features]; with stages=True the list [stem, stage 1, ..., stage S]
      of maps [N, h, w, c] in the compute dtype, the stem's taken before the max-pool.
    """
    bn_mask = None if mask is None else mask.reshape(-1, 1, 1, 1)
    kernel, stride = (3, 1) if self.small_stem else (7, 2)
    x = self.layers.conv(self.stage_width(0), (kernel, kernel), (stride, stride), _pad(kernel))(x)
    x = nn.relu(self.layers.norm(train)(x, mask=bn_mask))
    maps = [x]
    if not self.small_stem:
      x = self.layers.max_pool(x, (3, 3), (2, 2), _pad(3))
    for stage, num_blocks in enumerate(self.stage_sizes):
      for index in range(num_blocks):
        strides = 2 if stage > 0 and index == 0 else 1
        x = self.block(self.stage_width(stage), strides, self.layers)(x, train, bn_mask)
      maps.append(x)
    if stages:
      return maps
    return _global_average_pool(x)

  def features_and_stage_pools(self, x: jax.Array, train: bool = False,
                               mask: jax.Array | None = None) -> tuple[jax.Array, list[jax.Array]]:
    """Encodes images once and returns the features together with every stage's pooled output.

    Same arguments and variables as calling the module. Returns (features [N, num_features], the
    same as the call returns, and [pool of stage 1, ..., stage S], each float32 [N, stage width])
    from ONE forward pass; the last pool is the features. The slice embedding of
    dsset.models.slice_transformer concatenates them.
    """
    pools = [_global_average_pool(m) for m in self(x, train, mask, stages=True)[1:]]
    return pools[-1], pools


# ResNet-10 (one basic block per stage) is not in torchvision; it is a quick model for laptops and
# for tests, where compile time rather than compute dominates.
ResNet10 = functools.partial(ResNet, stage_sizes=(1, 1, 1, 1), block=BasicBlock)
ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block=Bottleneck)

BACKBONES = {'resnet10': ResNet10, 'resnet18': ResNet18, 'resnet50': ResNet50}

def make_backbone(model_config: ml_collections.ConfigDict) -> ResNet:
  """Builds the encoder named by model.backbone with the model section's options."""
  if model_config.backbone not in BACKBONES:
    raise ValueError(f'model.backbone must be one of {sorted(BACKBONES)}, '
                     f'got {model_config.backbone!r}')
  if not model_config.width_multiplier > 0:
    raise ValueError(
        f'model.width_multiplier must be positive, got {model_config.width_multiplier}')
  return BACKBONES[model_config.backbone](
      small_stem=model_config.small_stem, width_multiplier=model_config.width_multiplier,
      layers=Layers.for_model(model_config))


def feature_dim(model_config: ml_collections.ConfigDict) -> int:
  """Feature length D of the backbone that `make_backbone(model_config)` builds."""
  return make_backbone(model_config).num_features
