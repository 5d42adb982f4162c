"""Max-pooling whose gradient is computed with masks instead of select_and_scatter.

The forward is XLA's reduce_window. Its autodiff backward is a select_and_scatter, which XLA:CPU
runs slowly (about 160 ms forward+backward at (128, 32, 32, 64) on two cores). Here the backward
compares each window offset's strided slice of the input with the pooled output and routes the
gradient to the FIRST maximum of each window in row-major window order, which is autodiff's tie
rule; ties are common because the pool follows a ReLU and many windows hold several zeros.
"""

from collections.abc import Sequence
import functools
import itertools

import jax
from jax import lax
import jax.numpy as jnp

Padding = str | Sequence[tuple[int, int]]


def _spatial_padding(
    x_shape: Sequence[int], window: Sequence[int], strides: Sequence[int], padding: Padding
) -> tuple[tuple[int, int], ...]:
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(x_shape[1:-1], window, strides, padding))
  return tuple(tuple(p) for p in padding)


def _reduce_max(x, window, strides, pads):
  return lax.reduce_window(
      x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1), ((0, 0), *pads, (0, 0))
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, pads):
  return _reduce_max(x, window, strides, pads)


def _max_pool_fwd(x, window, strides, pads):
  y = _reduce_max(x, window, strides, pads)
  return y, (x, y)


def _max_pool_bwd(window, strides, pads, residuals, g):
  x, y = residuals
  padded = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)
  out_spatial = y.shape[1:-1]
  claimed = jnp.zeros(y.shape, bool)
  grad = jnp.zeros(padded.shape, g.dtype)
  for offset in itertools.product(*(range(k) for k in window)):
    start = (0, *offset, 0)
    limit = (y.shape[0], *(o + (n - 1) * s + 1 for o, n, s in zip(offset, out_spatial, strides)),
             y.shape[-1])
    candidate = lax.slice(padded, start, limit, (1, *strides, 1))
    first = (candidate == y) & ~claimed
    claimed = claimed | first
    # Interior padding of stride-1 zeros is the transpose of the strided slice above.
    spread = [(0, 0, 0)] + [
        (o, size - o - (n - 1) * s - 1, s - 1)
        for o, n, s, size in zip(offset, out_spatial, strides, padded.shape[1:-1])
    ] + [(0, 0, 0)]
    grad = grad + lax.pad(jnp.where(first, g, 0), jnp.zeros((), g.dtype), spread)
  crop = tuple(slice(lo, size - hi) for (lo, hi), size in zip(pads, padded.shape[1:-1]))
  return (grad[(slice(None), *crop, slice(None))],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(
    x: jax.Array, window: Sequence[int], strides: Sequence[int], padding: Padding = 'VALID'
) -> jax.Array:
  """Max-pool NHWC `x` (padding counts as -inf), same values and gradients as flax's nn.max_pool."""
  window, strides = tuple(window), tuple(strides)
  return _max_pool(x, window, strides, _spatial_padding(x.shape, window, strides, padding))
