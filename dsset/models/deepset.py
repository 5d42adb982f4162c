"""Deep Set encoder: a shared 2D encoder (phi) over the slices of a set, pooled, then optional rho.

Padded slices (mask False) are replaced by zero images before encoding, are left out of the pooling,
and are left out of the encoder's BatchNorm batch statistics in train mode (the encoder receives the
flattened mask), so they influence neither the output nor the running averages.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

POOLINGS = ('sum', 'mean')


class SetEncoder(nn.Module):
  """Permutation-invariant encoder of slice sets.

  Attributes:
    encoder: 2D encoder called as encoder(images [N, H, W, C], train=..., mask=[N] or None) ->
      features [N, D] (the ResNets of dsset.models.resnet). Its parameters live under 'encoder'.
      None: the inputs are already slice features [B, K, D] (scan-level evaluation applies a
      pretrained set encoder's pooling and rho to features computed slice by slice).
    pooling: 'sum' (DeepSet SimCLR) or 'mean' over the valid slices.
    rho: apply rho = Dense(rho_hidden) - BN - ReLU - Dense(D) after pooling.
    rho_hidden: hidden width of rho.
    dtype: compute dtype of rho; its output is float32.
  """
  encoder: nn.Module | None
  pooling: str = 'sum'
  rho: bool = False
  rho_hidden: int = 512
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               train: bool = False) -> jax.Array:
    """Encodes sets.

    Args:
      x: slice sets [B, K, H, W, C], or slice features [B, K, D] when encoder is None.
      mask: boolean [B, K], True for valid slices; None means all valid.
      train: BatchNorm in train mode (batch statistics) for the encoder and rho.

    Returns:
      float32 set features [B, D].
    """
    if self.pooling not in POOLINGS:
      raise ValueError(f'model.pooling must be one of {POOLINGS}, got {self.pooling!r}')
    batch, set_size = x.shape[:2]
    if self.encoder is None:
      features = x.astype(jnp.float32)
    else:
      slices = x.reshape(batch * set_size, *x.shape[2:])
      flat_mask = None
      if mask is not None:
        flat_mask = mask.reshape(batch * set_size)
        slices = jnp.where(flat_mask[:, None, None, None], slices, jnp.zeros_like(slices))
      # One encoder call over all B*K slices: one big batch is what the hardware is fast at.
      features = self.encoder(slices, train=train, mask=flat_mask)
      features = features.reshape(batch, set_size, -1).astype(jnp.float32)
    valid = jnp.ones((batch, set_size), bool) if mask is None else mask
    pooled = jnp.sum(jnp.where(valid[..., None], features, 0.0), axis=1)
    if self.pooling == 'mean':
      # A set without any valid slice pools to zeros rather than NaN.
      pooled = pooled / jnp.maximum(jnp.sum(valid, axis=1, keepdims=True), 1)
    if self.rho:
      h = nn.Dense(self.rho_hidden, dtype=self.dtype, name='rho_hidden')(pooled)
      h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                               dtype=self.dtype, name='rho_norm')(h))
      pooled = nn.Dense(pooled.shape[-1], dtype=self.dtype, name='rho_out')(h).astype(jnp.float32)
    return pooled
