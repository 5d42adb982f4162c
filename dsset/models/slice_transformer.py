"""The 3D half of intra-inter clustering (Nguyen et al., AAAI 2023): slice tokens, a deformable
transformer over them, and the volume feature.

    features, pools = backbone.features_and_stage_pools(slices)  # [B*T, H, W, C]; ResNet
    tokens = SliceEmbedding(d_model)([*pools, features])         # [B*T, d_model] -> [B, T, d_model]
    tokens = SliceTransformer(...)(tokens, train)                 # [B, T, d_model]
    volume = volume_feature(tokens)                               # [B, d_model], unit length

The transformer attends along the slice axis: each of the T tokens is one slice. The released code
passes its [B, T, d_model] tokens to a DeformableAttention1D that expects channels first
([batch, channels, length]) and builds it with dim = T, so there the 64 slices are the channels and
attention, offsets, downsampling and the position bias run along the 640 embedding dimensions.
Here they run along the slices, as the paper describes (a transformer over the slices of a
volume); checkpoints of the released model therefore do not map onto this one.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsset.models.deformable_attention import (LAYER_NORM_EPSILON, DeformableAttention1D,
                                              DeformableTransformerBlock)


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """x / ||x|| along `axis` in at least float32; an all-zero vector stays zero."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), 1e-24))


class SliceEmbedding(nn.Module):
  """Slice token from the per-slice features of the 2D encoder: each feature vector L2-normalised,
  all concatenated, then one Dense to d_model (the released code's 1x1 ConvTranspose1d, a linear
  map with bias).

  The released model feeds it the pooled outputs of the four ResNet stages and the final feature,
  which for a torchvision ResNet is the last stage's pool again: ResNet-50 gives
  256 + 512 + 1024 + 2048 + 2048 = 5888 inputs. `ResNet.features_and_stage_pools` gives both.

  Attributes:
    d_model: token width (640 in the paper).
    dtype: compute dtype of the Dense; the tokens are returned in float32.
  """
  d_model: int = 640
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jax.Array]) -> jax.Array:
    """features: arrays [..., D_i] with the same leading axes -> float32 [..., d_model]."""
    joined = jnp.concatenate([l2_normalize(f) for f in features], axis=-1)
    return nn.Dense(self.d_model, dtype=self.dtype, name='project')(joined).astype(jnp.float32)


class SliceTransformer(nn.Module):
  """`num_layers` DeformableTransformerBlocks (named block_0, block_1, ...) over slice tokens.

  Defaults are the released code's: 4 layers, feed-forward width 720, dropout 0.1, post-LN, and
  its attention settings (downsample 4, offset scale 2, offset kernel 6, one offset group per
  head; 8 heads). With pre_ln a final LayerNorm `final_norm` closes the stack.
  See DeformableAttention1D for the attention attributes.
  """
  num_layers: int = 4
  num_heads: int = 8
  offset_groups: int | None = None
  downsample: int = 4
  offset_kernel: int = 6
  offset_scale: float = 2.0
  position_bias: bool = True
  ffn_hidden: int = 720
  dropout: float = 0.1
  pre_ln: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    """tokens [B, T, d_model] -> float32 [B, T, d_model]; train enables dropout
    (rngs={'dropout': key})."""
    x = tokens
    for layer in range(self.num_layers):
      # Built unbound so that the block adopts it as block_<layer>/attention.
      attention = DeformableAttention1D(
          self.num_heads, self.offset_groups, self.downsample, self.offset_kernel,
          self.offset_scale, self.position_bias, self.dtype, parent=None)
      x = DeformableTransformerBlock(attention, self.ffn_hidden, self.dropout, self.pre_ln,
                                     self.dtype, name=f'block_{layer}')(x, train)
    if self.pre_ln:
      x = nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=jnp.float32, name='final_norm')(x)
    return x.astype(jnp.float32)


def volume_feature(tokens: jax.Array) -> jax.Array:
  """The volume's representation: the mean of its output tokens [B, T, D], L2-normalised [B, D]."""
  return l2_normalize(jnp.mean(tokens.astype(jnp.float32), axis=1))


def make_slice_transformer(settings, dtype: Any = jnp.float32) -> SliceTransformer:
  """The SliceTransformer that the keys of model.slice_transformer describe: a ConfigDict, or the
  plain dict of a run's config.json (so that evaluation rebuilds the pretrained one). d_model is
  not an attribute: it is the width of the tokens given."""
  return SliceTransformer(
      num_layers=int(settings['num_layers']), num_heads=int(settings['num_heads']),
      downsample=int(settings['downsample']), offset_kernel=int(settings['offset_kernel']),
      offset_scale=float(settings['offset_scale']), position_bias=bool(settings['position_bias']),
      ffn_hidden=int(settings['ffn_hidden']), dropout=float(settings['dropout']),
      pre_ln=bool(settings['pre_ln']), dtype=dtype)
