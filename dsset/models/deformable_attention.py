"""1D deformable self-attention and the transformer block built on it.

The attention is DAT's (Xia et al., "Vision Transformer with Deformable Attention", CVPR 2022)
reduced to one token axis, as the released code of Nguyen et al. (AAAI 2023) uses it over the
slices of a volume. Every query attends to a short sequence of keys that are not tokens but points
sampled between them:

1. reference points: the token axis [0, T) is cut into ceil(T / downsample) cells of `downsample`
   tokens (the last one shorter when T is not a multiple); each cell's reference point is its
   centre, in token units (DAT's centres of the downsampled grid);
2. offsets: an offset network on the queries, one strided window per cell, predicts a shift of
   each reference point, bounded by tanh to +-offset_scale cells;
3. keys and values are projected from the tokens linearly interpolated at the shifted, fractional
   positions (DAT's bilinear grid_sample with zero padding, in 1D: `linear_interpolate`);
4. multi-head attention of every token's query over those keys, plus a relative position bias
   that DAT interpolates from a learned table at the query-to-key displacement.

The channels are split into `offset_groups` groups: each group gets its own sampling positions
(the offset network's weights are shared by the groups), and the heads of a group share them in
the position bias. With zero offsets the layer is ordinary attention over the tokens interpolated
at the cell centres; with downsample 1 those are the tokens themselves (full attention).

Dtypes: the projections compute in `dtype` (float32 parameters); sampling positions, attention
logits, softmax and LayerNorms are float32, as are the block's residual stream and outputs.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# torch.nn.LayerNorm's default, which the released code uses.
LAYER_NORM_EPSILON = 1e-5


def linear_interpolate(values: jax.Array, positions: jax.Array) -> jax.Array:
  """Samples a sequence at fractional positions by linear interpolation.

  Args:
    values: [..., N, C], N samples along the second-to-last axis.
    positions: [..., P] in index units (0 is the first sample, N - 1 the last); leading axes
      broadcast against those of `values`.

  Returns:
    [..., P, C]. Integer positions return the samples exactly. Beyond the ends the sequence is
    taken as zero (DAT's grid_sample with zero padding), so a position between N - 1 and N fades
    linearly to zero and one past N or below -1 gives zeros; the gradient with respect to the
    positions is the slope between the two neighbours.
  """
  length = values.shape[-2]
  lower = jnp.floor(positions)
  weight_upper = (positions - lower)[..., None]
  lower = lower.astype(jnp.int32)

  def neighbour(index):
    inside = (index >= 0) & (index < length)
    picked = jnp.take_along_axis(values, jnp.clip(index, 0, length - 1)[..., None], axis=-2)
    return jnp.where(inside[..., None], picked, 0)

  return (1 - weight_upper) * neighbour(lower) + weight_upper * neighbour(lower + 1)


def reference_points(length: int, downsample: int) -> np.ndarray:
  """Centres (token units) of the ceil(length / downsample) cells of `downsample` tokens; the
  last cell holds the remaining tokens when length is not a multiple of downsample."""
  starts = np.arange(0, length, downsample)
  ends = np.minimum(starts + downsample, length)
  return (starts + ends - 1) / 2


class DeformableAttention1D(nn.Module):
  """Deformable multi-head self-attention along the token axis of [B, T, C] inputs.

  Attributes:
    num_heads: attention heads; C must be a multiple.
    offset_groups: channel groups with their own sampling positions; a divisor of num_heads.
      None: one group per head (the released code's default).
    downsample: tokens per cell; T tokens give ceil(T / downsample) keys.
    offset_kernel: window of the offset network's depthwise conv along the token axis; at least
      `downsample`, so that the windows cover every token.
    offset_scale: largest shift of a sampling position, in cells (offset_scale * downsample
      tokens).
    position_bias: add the learned relative position bias. Without it (and with zero offsets)
      the layer is blind to the token order.
    dtype: compute dtype of the projections and the offset network's conv.

  Parameters: Dense `query`, `key`, `value`, `out` (C -> C, with biases, as DAT's 1x1 convs);
  the offset network `offset_conv` (depthwise, stride `downsample`), `offset_norm` (LayerNorm),
  `offset` (Dense to one value, no bias); `position_bias` [num_heads, 2T - 1] when enabled (its
  size depends on T, so a model is tied to the number of slices it was initialised with).
  The sampling positions [B, groups, keys] (token units) are sown as intermediates 'positions'.
  """
  num_heads: int = 8
  offset_groups: int | None = None
  downsample: int = 4
  offset_kernel: int = 6
  offset_scale: float = 2.0
  position_bias: bool = True
  dtype: Any = jnp.float32

  def check(self, channels: int) -> int:
    """Validates the settings against the token width; returns the number of groups."""
    groups = self.offset_groups or self.num_heads
    if channels % self.num_heads:
      raise ValueError(f'the token width {channels} must be a multiple of the number of heads '
                       f'{self.num_heads}')
    if self.num_heads % groups:
      raise ValueError(f'the number of heads {self.num_heads} must be a multiple of '
                       f'offset_groups {groups}')
    if self.downsample < 1:
      raise ValueError(f'downsample must be at least 1, got {self.downsample}')
    if self.offset_kernel < self.downsample:
      raise ValueError(f'offset_kernel {self.offset_kernel} must be at least the downsample '
                       f'factor {self.downsample}, or the offset windows skip tokens')
    return groups

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, T, C] -> [B, T, C] in `dtype`."""
    batch, length, channels = x.shape
    groups = self.check(channels)
    group_channels = channels // groups
    head_channels = channels // self.num_heads
    dense = lambda name: nn.Dense(channels, dtype=self.dtype, name=name)

    def split_groups(t):  # [B, T', C] -> [B, G, T', C / G]
      return t.reshape(batch, t.shape[1], groups, group_channels).transpose(0, 2, 1, 3)

    queries = dense('query')(x)
    offsets = self.offset_network(
        split_groups(queries).reshape(batch * groups, length, group_channels), length)
    positions = reference_points(length, self.downsample) + offsets.reshape(batch, groups, -1)
    self.sow('intermediates', 'positions', positions)
    num_keys = positions.shape[-1]

    sampled = linear_interpolate(split_groups(x.astype(self.dtype)), positions)
    sampled = sampled.transpose(0, 2, 1, 3).reshape(batch, num_keys, channels).astype(self.dtype)
    keys = dense('key')(sampled).reshape(batch, num_keys, self.num_heads, head_channels)
    values = dense('value')(sampled).reshape(batch, num_keys, self.num_heads, head_channels)
    queries = queries.reshape(batch, length, self.num_heads, head_channels)

    logits = jnp.einsum('bqhc,bkhc->bhqk', queries, keys).astype(jnp.float32)
    logits = logits * head_channels**-0.5
    if self.position_bias:
      logits = logits + self.relative_bias(positions, length)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqk,bkhc->bqhc', weights, values).reshape(batch, length, channels)
    return dense('out')(out)

  def offset_network(self, grouped_queries: jax.Array, length: int) -> jax.Array:
    """Queries [B * G, T, C / G] -> float32 offsets [B * G, ceil(T / downsample)], token units.

    DAT's conv_offset in 1D: a depthwise conv with stride `downsample` gives one window per cell,
    then LayerNorm, GELU and a bias-free projection to one value per cell, bounded by tanh. The
    windows are centred on full cells ((kernel - downsample) / 2 tokens of zero padding on either
    side); when T is not a multiple of downsample the end is padded with zeros up to the next
    multiple, so the last, shorter cell gets a window too.
    """
    channels = grouped_queries.shape[-1]
    num_keys = -(-length // self.downsample)
    overlap = self.offset_kernel - self.downsample
    padding = (overlap // 2, overlap - overlap // 2 + num_keys * self.downsample - length)
    h = nn.Conv(channels, (self.offset_kernel,), (self.downsample,), [padding],
                feature_group_count=channels, dtype=self.dtype, name='offset_conv')(grouped_queries)
    h = nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=jnp.float32, name='offset_norm')(h)
    # Exact (erf) GELU, as torch.nn.GELU.
    h = nn.gelu(h, approximate=False)
    raw = nn.Dense(1, use_bias=False, dtype=jnp.float32, name='offset')(h)[..., 0]
    return jnp.tanh(raw) * (self.offset_scale * self.downsample)

  def relative_bias(self, positions: jax.Array, length: int) -> jax.Array:
    """Bias [B, heads, T, keys] from positions [B, G, keys]: each head's learned table of 2T - 1
    entries, one per integer displacement query - key in -(T-1)..T-1, linearly interpolated at
    the fractional displacement and zero beyond it (DAT's table, sampled with grid_sample)."""
    batch, groups, num_keys = positions.shape
    heads_per_group = self.num_heads // groups
    table = self.param('position_bias', nn.initializers.truncated_normal(0.01),
                       (self.num_heads, 2 * length - 1), jnp.float32)
    displacement = jnp.arange(length, dtype=jnp.float32)[:, None] - positions[..., None, :]
    grouped_table = table.reshape(1, groups, heads_per_group, -1).transpose(0, 1, 3, 2)
    bias = linear_interpolate(grouped_table,
                              (displacement + length - 1).reshape(batch, groups, -1))
    bias = bias.reshape(batch, groups, length, num_keys, heads_per_group)
    return bias.transpose(0, 1, 4, 2, 3).reshape(batch, self.num_heads, length, num_keys)


class DeformableTransformerBlock(nn.Module):
  """Transformer encoder layer: deformable self-attention, then a GELU feed-forward network,
  each in a residual branch with dropout and LayerNorm.

  Post-LN (the released code's order, pre_ln False): x = LN(x + Dropout(sublayer(x))). Pre-LN:
  x = x + Dropout(sublayer(LN(x))); a stack of pre-LN blocks needs a final LayerNorm (see
  SliceTransformer). One difference from the released code: it applies dropout after the
  LayerNorm, to the whole residual stream; here dropout acts on the branch, as in Vaswani et
  al.'s transformer (in eval mode both are the identity).

  Attributes:
    attention: the attention layer, created unbound (parent=None) so that the block adopts it as
      its `attention` child.
    ffn_hidden: hidden width of the feed-forward network (720 in the released code).
    dropout: rate on both branches' outputs and after the feed-forward network's GELU.
    pre_ln: pre-LN instead of post-LN.
    dtype: compute dtype of the feed-forward network.
  """
  attention: DeformableAttention1D
  ffn_hidden: int = 720
  dropout: float = 0.1
  pre_ln: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x [B, T, C] -> float32 [B, T, C]; train enables dropout (rngs={'dropout': key})."""
    channels = x.shape[-1]

    def feed_forward(h):
      h = nn.gelu(nn.Dense(self.ffn_hidden, dtype=self.dtype, name='ffn_in')(h),
                  approximate=False)
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
      return nn.Dense(channels, dtype=self.dtype, name='ffn_out')(h)

    x = self.residual(x.astype(jnp.float32), self.attention, 'attention_norm', train)
    return self.residual(x, feed_forward, 'ffn_norm', train)

  def residual(self, x, sublayer, norm_name: str, train: bool) -> jax.Array:
    norm = nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=jnp.float32, name=norm_name)
    branch = lambda h: nn.Dropout(self.dropout, deterministic=not train)(sublayer(h))
    if self.pre_ln:
      return x + branch(norm(x))
    return norm(x + branch(x))
