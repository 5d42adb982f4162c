"""The one place where the encoders' convolutions, max-pools and BatchNorms are chosen and computed.

A model is built with one `Layers` (compute dtype, CPU fast path), resolved once from the config's
model section by `Layers.for_model`, and every block takes its convs, BatchNorms and max-pools from
it, so that backend-specific rewrites of these ops (for XLA:CPU, see docs/performance.md) are
switched on in one spot without touching the network definitions.
"""

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dsset.ops import cpu_batch_norm, cpu_conv, cpu_conv3d, cpu_pool

# torchvision initialises ResNet convs with kaiming_normal_(mode='fan_out', nonlinearity='relu').
kaiming_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

Padding = Sequence[tuple[int, int]]


class Conv(nn.Module):
  """Convolution over channels-last inputs, with nn.Conv's parameter names and layout.

  The spatial rank is the kernel's: a (height, width) kernel convolves NHWC inputs, a (depth,
  height, width) one NDHWC inputs.

  Attributes:
    features: number of output channels.
    kernel_size: extent of the kernel along each spatial axis.
    strides: stride along each spatial axis; None is 1 everywhere.
    padding: explicit (low, high) zero padding per spatial axis (torchvision pads symmetrically,
      unlike 'SAME' with stride 2); None pads nothing.
    use_bias: add a learned bias (ResNets do not: a BatchNorm follows every conv).
    dtype: compute dtype; inputs and kernel are cast to it.
    param_dtype: storage dtype of the parameters.
    fast: compute 2D convs whose output map is smaller than the kernel as one matmul
      (dsset.ops.cpu_conv), and every 3D conv through dsset.ops.cpu_conv3d (XLA:CPU's own 3D
      convolution is several times slower than its 2D one).
  """
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] | None = None
  padding: Padding | None = None
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  fast: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    rank = len(self.kernel_size)
    strides = tuple(self.strides or (1,) * rank)
    padding = tuple(self.padding or ((0, 0),) * rank)
    kernel = self.param('kernel', kaiming_fan_out,
                        (*self.kernel_size, x.shape[-1], self.features), self.param_dtype)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if self.fast and rank == 2 and cpu_conv.output_smaller_than_kernel(
        x.shape[1:3], self.kernel_size, strides, padding):
      y = cpu_conv.conv_as_matmul(x, kernel, strides, padding)
    elif self.fast and rank == 3:
      y = cpu_conv3d.conv3d(x, kernel, strides, padding)
    else:
      spatial = 'DHW'[-rank:]
      y = jax.lax.conv_general_dilated(
          x, kernel, window_strides=strides, padding=padding,
          dimension_numbers=(f'N{spatial}C', f'{spatial}IO', f'N{spatial}C'))
    if self.use_bias:
      bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class ConvTranspose(nn.Module):
  """Transposed convolution with window == strides (U-Net upsampling), channels last.

  Same parameters as flax.linen.ConvTranspose(features, kernel_size, strides=kernel_size): a
  'kernel' [*window, in, out] (lecun_normal) and a 'bias' [out] (zeros), and the same class name, so
  Flax names it ConvTranspose_<i> as it would nn.ConvTranspose and the variables move between the
  two. `fast` computes it as one matmul plus a reshuffle (dsset.ops.cpu_conv3d), which is exact
  because the windows do not overlap.
  """
  features: int
  kernel_size: Sequence[int]
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  fast: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    window = tuple(self.kernel_size)
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (*window, x.shape[-1], self.features), self.param_dtype)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if self.fast:
      y = cpu_conv3d.conv_transpose_as_matmul(x, kernel)
    else:
      spatial = 'DHW'[-len(window):]
      # flax.linen.ConvTranspose's computation (padding 'SAME' is exact for window == stride).
      y = jax.lax.conv_transpose(x, kernel, window, 'SAME',
                                 dimension_numbers=(f'N{spatial}C', f'{spatial}IO', f'N{spatial}C'))
    if self.use_bias:
      bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


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


# Every BatchNorm class a model may hold (the fast path's and Flax's), for code that finds them.
BATCH_NORMS = (nn.BatchNorm, BatchNorm)

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def resolve_dtype(name: str) -> Any:
  """model.dtype -> a jnp dtype; 'auto' is float32 on CPU (no native bf16 there), else bfloat16."""
  if name == 'auto':
    return jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16
  if name not in _DTYPES:
    raise ValueError(f"model.dtype must be 'auto', 'float32' or 'bfloat16', got {name!r}")
  return _DTYPES[name]


def resolve_cpu_fast_path(setting: str) -> bool:
  """model.cpu_fast_path -> bool; 'auto' is on exactly when JAX runs on the CPU."""
  if setting == 'auto':
    return jax.default_backend() == 'cpu'
  if setting not in ('on', 'off'):
    raise ValueError(f"model.cpu_fast_path must be 'auto', 'on' or 'off', got {setting!r}")
  return setting == 'on'


@dataclasses.dataclass(frozen=True)
class Layers:
  """Conv, BatchNorm and max-pool factories shared by every block of one model.

  Frozen (hashable), so that it can be a Flax module attribute. The choice of ops never changes the
  variables: both paths create the same names, shapes and dtypes.

  Attributes:
    dtype: compute dtype; parameters stay float32.
    cpu_fast_path: compute through the XLA:CPU rewrites of dsset.ops.
  """
  dtype: Any = jnp.float32
  cpu_fast_path: bool = False

  @classmethod
  def for_model(cls, model_config: ml_collections.ConfigDict) -> 'Layers':
    """The layers that model.dtype and model.cpu_fast_path ask for on the current backend."""
    return cls(resolve_dtype(model_config.dtype),
               resolve_cpu_fast_path(model_config.cpu_fast_path))

  def conv(self, features: int, kernel_size: Sequence[int], strides: Sequence[int] | None = None,
           padding: Padding | None = None, use_bias: bool = False) -> Conv:
    return Conv(features, kernel_size, strides, padding, use_bias, dtype=self.dtype,
                fast=self.cpu_fast_path)

  def conv_transpose(self, features: int, window: Sequence[int]) -> ConvTranspose:
    """Transposed conv with stride == window and a bias (the 3D U-Net decoder's 2^3 upsampling)."""
    return ConvTranspose(features, tuple(window), dtype=self.dtype, fast=self.cpu_fast_path)

  def norm(self, train: bool) -> nn.Module:
    """BatchNorm with torchvision's settings; the fast path computes its statistics with dots."""
    norm = BatchNorm if self.cpu_fast_path else nn.BatchNorm
    # Flax momentum 0.9 == torch momentum 0.1; epsilon as torch. Scale starts at 1 (torchvision).
    return norm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                param_dtype=jnp.float32)

  def max_pool(self, x: jax.Array, window: Sequence[int], strides: Sequence[int],
               padding: Padding) -> jax.Array:
    """Max-pool over the spatial axes of channels-last `x` (NHWC or NDHWC); padded positions never
    win (-inf).

    The fast path keeps this forward but computes the gradient with masks (dsset.ops.cpu_pool).
    """
    if self.cpu_fast_path:
      return cpu_pool.max_pool(x, window, strides, padding)
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, *window, 1), (1, *strides, 1),
        ((0, 0), *padding, (0, 0)))
