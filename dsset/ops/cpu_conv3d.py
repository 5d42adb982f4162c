"""3D convolutions rewritten in forms that XLA:CPU compiles well (the 3D U-Net, issue 22).

XLA:CPU's own 3D convolution (NDHWC, DHWIO) runs far below its 2D convolution: forward+backward of
a 3^3 conv at 32^3 x 16 -> 16, batch 8, took about 1.5 s on two cores, against 0.16 s for PyTorch's
oneDNN Conv3d (docs/performance.md, "3D U-Net on XLA:CPU"). Two rewrites, both exact up to the
order of float summation:

- `conv3d_depth_stacked`: the kernel's depth taps become input channels. For each depth offset t
  the input is shifted by t along depth; the shifted copies are concatenated on the channel axis,
  depth is folded into the batch, and one 2D convolution with the (kh, kw, kd * Cin, Cout) kernel
  does the rest. It costs kd copies of the input but gives XLA a single 2D convolution with kd
  times the channels (its 2D convolutions are close to oneDNN's speed), which beat both the 3D
  convolution and a sum of kd separate 2D convolutions at every U-Net level above the bottleneck.
- `conv3d_as_matmul`: for outputs smaller than the kernel (the 2^3 bottleneck of a 32^3 input),
  the 2D form would hit XLA:CPU's small-map cliff (dsset.ops.cpu_conv), so the taps are gathered
  with strided slices and contracted in one matmul, as cpu_conv.conv_as_matmul does in 2D.
"""

from collections.abc import Sequence

import jax
from jax import lax
import jax.numpy as jnp

from dsset.ops import cpu_conv

Pads = Sequence[tuple[int, int]]


def _output_size(size: int, pad: tuple[int, int], k: int, stride: int) -> int:
  return (size + pad[0] + pad[1] - k) // stride + 1


def output_smaller_than_kernel(spatial: Sequence[int], kernel: Sequence[int],
                               strides: Sequence[int], padding: Pads) -> bool:
  """True where conv3d_as_matmul is the form to use (some output side shorter than the kernel)."""
  return cpu_conv.output_smaller_than_kernel(spatial, kernel, strides, padding)


def conv3d_depth_stacked(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1, 1),
                         padding: Pads = ((0, 0),) * 3) -> jax.Array:
  """NDHWC `x` * DHWIO `kernel` as one 2D convolution over depth-shifted copies of x.

  Equal to lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=('NDHWC',
  'DHWIO', 'NDHWC')) up to float summation order; no dilation, no feature groups.
  """
  n, d, h, w, c = x.shape
  kd, kh, kw, kc, features = kernel.shape
  if kc != c:
    raise ValueError(f'kernel expects {kc} input channels, got an input with {c}')
  (pd_lo, pd_hi), pad_h, pad_w = (tuple(p) for p in padding)
  sd, sh, sw = strides
  out_d = _output_size(d, (pd_lo, pd_hi), kd, sd)
  if kd == 1 and pd_lo == pd_hi == 0 and sd == 1:
    stacked = x
  else:
    padded = jnp.pad(x, ((0, 0), (pd_lo, pd_hi), (0, 0), (0, 0), (0, 0)))
    # Channel order (depth tap, input channel) matches the kernel reshape below.
    stacked = jnp.concatenate(
        [lax.slice(padded, (0, t, 0, 0, 0), (n, t + (out_d - 1) * sd + 1, h, w, c),
                   (1, sd, 1, 1, 1)) for t in range(kd)], axis=-1)
  kernel_2d = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(kh, kw, kd * c, features)
  y = lax.conv_general_dilated(
      stacked.reshape(n * out_d, h, w, kd * c), kernel_2d, (sh, sw), (pad_h, pad_w),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return y.reshape(n, out_d, *y.shape[1:])


def conv3d_as_matmul(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1, 1),
                     padding: Pads = ((0, 0),) * 3) -> jax.Array:
  """NDHWC `x` * DHWIO `kernel` as (gathered taps) @ kernel, for maps smaller than the kernel.

  Same result as conv3d_depth_stacked; kernel offsets that only ever read padding are dropped
  (exact: they multiply zeros), so a 3^3 conv on a 1^3 map is a 1^3 conv.
  """
  n, d, h, w, c = x.shape
  kd, kh, kw, kc, features = kernel.shape
  if kc != c:
    raise ValueError(f'kernel expects {kc} input channels, got an input with {c}')
  padding = [tuple(p) for p in padding]
  outs = [_output_size(size, p, k, s)
          for size, p, k, s in zip((d, h, w), padding, (kd, kh, kw), strides)]
  used = [cpu_conv._taps_touching_data(size, p, k, s, o)  # pylint: disable=protected-access
          for size, p, k, s, o in zip((d, h, w), padding, (kd, kh, kw), strides, outs)]
  padded = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  patches = jnp.concatenate(
      [lax.slice(padded, (0, a, b, e, 0),
                 (n, *(t + (o - 1) * s + 1 for t, o, s in zip((a, b, e), outs, strides)), c),
                 (1, *strides, 1))
       for a in used[0] for b in used[1] for e in used[2]], axis=-1)
  taps = kernel[used[0].start:used[0].stop, used[1].start:used[1].stop,
                used[2].start:used[2].stop].reshape(-1, features)
  return jnp.dot(patches, taps, preferred_element_type=x.dtype)


def conv3d(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1, 1),
           padding: Pads = ((0, 0),) * 3) -> jax.Array:
  """The faster of the two rewrites for this shape (the choice made by dsset's Conv layer)."""
  if output_smaller_than_kernel(x.shape[1:4], kernel.shape[:3], strides, padding):
    return conv3d_as_matmul(x, kernel, strides, padding)
  return conv3d_depth_stacked(x, kernel, strides, padding)


def conv_transpose_as_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """flax.linen.ConvTranspose with kernel == strides (non-overlapping windows) and no padding
  effect, as one matmul followed by a depth-to-space reshuffle.

  Each input voxel writes its own window of the output: y[s*i + a] = x[i] @ K[s - 1 - a] along
  every spatial axis (lax.conv_transpose without transpose_kernel flips the kernel).
  """
  n, *spatial, c = x.shape
  *window, kc, features = kernel.shape
  if kc != c:
    raise ValueError(f'kernel expects {kc} input channels, got an input with {c}')
  rank = len(window)
  flipped = kernel[(slice(None, None, -1),) * rank]
  # [Cin, window..., Cout]: one matmul gives every output offset of a window at once.
  taps = jnp.moveaxis(flipped, rank, 0).reshape(c, -1)
  y = jnp.dot(x.reshape(-1, c), taps, preferred_element_type=x.dtype)
  y = y.reshape(n, *spatial, *window, features)
  # Interleave (i, a) pairs of each axis: [n, i1, a1, i2, a2, ..., C].
  order = [0] + [axis for r in range(rank) for axis in (1 + r, 1 + rank + r)] + [1 + 2 * rank]
  y = jnp.transpose(y, order)
  return y.reshape(n, *(size * k for size, k in zip(spatial, window)), features)
