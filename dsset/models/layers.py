"""The one place where the encoders' convolutions, max-pools and BatchNorms are computed.

Every convolution of the ResNets goes through `Conv`, every max-pool through `max_pool` and every
BatchNorm through `batch_norm`, so that backend-specific rewrites of these ops (for XLA:CPU, see
notes/cpu-performance.md and docs/performance.md) can be switched on in one spot with the `fast`
flag without touching the network definitions.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsset.ops import cpu_batch_norm, cpu_conv, cpu_pool

# torchvision initialises ResNet convs with kaiming_normal_(mode='fan_out', nonlinearity='relu').
kaiming_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

Padding = Sequence[tuple[int, int]]


class Conv(nn.Module):
  """2D convolution over NHWC inputs, with nn.Conv's parameter names and layout.

  Attributes:
    features: number of output channels.
    kernel_size: (height, width) of the kernel.
    strides: (height, width) strides.
    padding: explicit ((top, bottom), (left, right)) zero padding (torchvision pads symmetrically,
      unlike 'SAME' with stride 2).
    use_bias: add a learned bias (ResNets do not: a BatchNorm follows every conv).
    dtype: compute dtype; inputs and kernel are cast to it.
    param_dtype: storage dtype of the parameters.
    fast: compute convs whose output map is smaller than the kernel as one matmul
      (dsset.ops.cpu_conv).
  """
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: Padding = ((0, 0), (0, 0))
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  fast: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', kaiming_fan_out,
                        (*self.kernel_size, x.shape[-1], self.features), self.param_dtype)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if self.fast and cpu_conv.output_smaller_than_kernel(
        x.shape[1:3], self.kernel_size, self.strides, self.padding):
      y = cpu_conv.conv_as_matmul(x, kernel, self.strides, self.padding)
    else:
      y = jax.lax.conv_general_dilated(
          x, kernel, window_strides=self.strides, padding=tuple(self.padding),
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if self.use_bias:
      bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def max_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int], padding: Padding,
             fast: bool = False) -> jax.Array:
  """Max-pool over the spatial axes of NHWC `x`; padded positions never win (-inf).

  `fast` keeps this forward but computes the gradient with masks (dsset.ops.cpu_pool).
  """
  if fast:
    return cpu_pool.max_pool(x, window, strides, padding)
  return jax.lax.reduce_window(
      x, -jnp.inf, jax.lax.max, (1, *window, 1), (1, *strides, 1),
      ((0, 0), *padding, (0, 0)))


class BatchNorm(nn.Module):
  """flax.linen.BatchNorm (channels last, fast variance) with its train-mode statistics computed by
  dsset.ops.cpu_batch_norm. Same variables and names ('scale', 'bias'; 'mean', 'var'), and the class
  name makes Flax auto-name it like nn.BatchNorm, so parameters move freely between the two paths.
  """
  use_running_average: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    features = (x.shape[-1],)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, features, jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, features, jnp.float32)
    scale = self.param('scale', nn.initializers.ones, features, self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, features, self.param_dtype)
    dtype = self.dtype or jnp.result_type(x, scale)
    if self.use_running_average:
      inv = jax.lax.rsqrt(ra_var.value + self.epsilon) * scale
      return ((x - ra_mean.value) * inv + bias).astype(dtype)
    stats_dtype = jnp.promote_types(x.dtype, jnp.float32)
    y, mean, var = cpu_batch_norm.batch_norm_train(
        x, scale.astype(stats_dtype), bias.astype(stats_dtype), self.epsilon, mask)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y.astype(dtype)


def batch_norm(train: bool, dtype: Any, fast: bool = False) -> nn.Module:
  """BatchNorm with torchvision's settings; `fast` computes its statistics with dots (CPU)."""
  # Flax momentum 0.9 == torch momentum 0.1; epsilon as torch. Scale starts at 1 (torchvision).
  norm = BatchNorm if fast else nn.BatchNorm
  return norm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
              param_dtype=jnp.float32)
