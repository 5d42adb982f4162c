"""Train-mode BatchNorm whose reductions are matrix-vector products, for XLA:CPU.

XLA:CPU splits every large reduction (BatchNorm's sums over batch and space, forward and backward)
into a tree of reduce-windows, and its reduce-window kernel is slow: in the simclr benchmark step
(ResNet-18, 64 px, 128 images) reduce-windows took about as long as all convolutions together,
and one BatchNorm at 128x32x32x64 took 352 ms forward + backward against 117 ms for this version
(2-core Xeon, jaxlib 0.10.2). Here each per-channel sum is a product with a vector of weights (a
dot, which XLA:CPU runs fast), and the backward pass is written out (custom VJP) so that autodiff
does not turn broadcasts back into reductions.

The statistics and outputs are those of flax.linen.BatchNorm with use_fast_variance (the default):
mean = E[x], var = max(E[x^2] - E[x]^2, 0) over the rows that the mask keeps, all rows normalised.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp


def _column_sums(weights: jax.Array, rows: jax.Array) -> jax.Array:
  """weights [M] @ rows [M, C] -> [C], a dot rather than a reduction."""
  return jnp.dot(weights, rows, precision=lax.Precision.HIGHEST)


def _stats_dtype(x: jax.Array):
  # float32 at least (bfloat16 activations are reduced in float32), float64 when x is.
  return jnp.promote_types(x.dtype, jnp.float32)


def _ones(count: int, dtype) -> jax.Array:
  # The barrier keeps XLA from folding a dot with constant ones back into a reduction.
  return lax.optimization_barrier(jnp.ones((count,), dtype))


def _row_weights(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  """One weight per row of x reshaped to [M, C]: the mask broadcast over space, or ones."""
  if mask is None:
    return _ones(x.size // x.shape[-1], _stats_dtype(x))
  return jnp.broadcast_to(mask, (*x.shape[:-1], 1)).reshape(-1).astype(_stats_dtype(x))


def _forward(x, scale, bias, weights, epsilon):
  dtype = _stats_dtype(x)
  rows = x.reshape(-1, x.shape[-1]).astype(dtype)
  count = jnp.sum(weights)
  mean = _column_sums(weights, rows) / count
  mean_sq = _column_sums(weights, rows * rows) / count
  var = jnp.maximum(mean_sq - mean * mean, 0.0)
  inv = lax.rsqrt(var + epsilon)
  y = (x.astype(dtype) - mean) * (inv * scale) + bias
  return (y, mean, var), (x, weights, count, mean, inv, scale)


def _backward(epsilon, residuals, cotangents):
  del epsilon  # only inv, saved by the forward, depends on it
  x, weights, count, mean, inv, scale = residuals
  g, g_mean, g_var = cotangents
  channels, dtype = x.shape[-1], _stats_dtype(x)
  rows = x.reshape(-1, channels).astype(dtype)
  g_rows = g.reshape(-1, channels).astype(dtype)
  ones = _ones(rows.shape[0], dtype)
  sum_g = _column_sums(ones, g_rows)
  sum_g_centred = _column_sums(ones, g_rows * rows) - mean * sum_g  # sum g (x - mean)
  d_bias = sum_g
  d_scale = sum_g_centred * inv
  # y = (x - mean) * inv * scale + bias, with mean and var = E[x^2] - mean^2 weighted statistics.
  d_var = -0.5 * inv**3 * scale * sum_g_centred + g_var
  d_mean = -inv * scale * sum_g - 2.0 * mean * d_var + g_mean
  share = (weights / count).reshape(*x.shape[:-1], 1)
  d_x = g.astype(dtype) * (inv * scale) + share * (d_mean + 2.0 * x.astype(dtype) * d_var)
  # Weights are data (the mask), not parameters: no gradient.
  return d_x.astype(x.dtype), d_scale, d_bias, jnp.zeros_like(weights)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _batch_norm(x, scale, bias, weights, epsilon):
  return _forward(x, scale, bias, weights, epsilon)[0]


_batch_norm.defvjp(_forward, _backward)


def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                     mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Normalises x [..., C] with its batch statistics over every axis but the last.

  Args:
    x: activations, channels last.
    scale, bias: [C], float32 (float64 with float64 x).
    epsilon: added to the variance.
    mask: optional boolean broadcastable to x.shape[:-1] + (1,); only the True rows enter the
      statistics (every row is normalised), as flax.linen.BatchNorm's mask.

  Returns:
    (y like x, mean [C], var [C]) in float32 (float64 for float64 x); gradients flow to x, scale
    and bias.
  """
  return _batch_norm(x, scale, bias, _row_weights(x, mask), float(epsilon))
