"""Convolution as shifted slices plus one matmul, for feature maps smaller than the kernel.

XLA:CPU compiles a convolution whose output map is smaller than its window (the 3x3 convs producing
the 2x2 and 1x1 maps of a ResNet's last stages at 32-64 px) into a swapped-operand form that is
code-generated as a naive loop, 10-100x slower than its other convolutions (measured on two cores:
4.6 s instead of 36 ms for forward+backward at 128x2x2x512, 268 ms instead of 16 ms for the stride-2
conv from 4x4 to 2x2); this holds with either convolution library. Gathering the kernel taps with
strided slices and contracting them in one matmul avoids that code path, and XLA differentiates
slices, concatenation and dot well.
"""

from collections.abc import Sequence

import jax
from jax import lax
import jax.numpy as jnp

Padding = str | Sequence[tuple[int, int]]


def _explicit_padding(
    input_hw: Sequence[int], kernel_hw: Sequence[int], strides: Sequence[int], padding: Padding
) -> list[tuple[int, int]]:
  if isinstance(padding, str):
    return lax.padtype_to_pads(input_hw, kernel_hw, strides, padding)
  return [tuple(p) for p in padding]


def output_smaller_than_kernel(
    input_hw: Sequence[int], kernel_hw: Sequence[int], strides: Sequence[int], padding: Padding
) -> bool:
  """True for the convolutions XLA:CPU runs slowly: an output side shorter than the kernel's.

  On larger maps XLA's own convolution is faster than the matmul form (97 vs 153 ms at 128x4x4x512).
  """
  pads = _explicit_padding(input_hw, kernel_hw, strides, padding)
  return any(
      (size + lo + hi - k) // s + 1 < k
      for size, (lo, hi), k, s in zip(input_hw, pads, kernel_hw, strides)
  )


def _taps_touching_data(size: int, pad: tuple[int, int], k: int, stride: int, out: int) -> range:
  """The span of kernel offsets along one axis that read at least one real (non-padding) element.

  Offsets outside it only ever multiply zeros, so dropping them is exact and, on a 1x1 map, turns a
  3x3 conv into a 1x1 one.
  """
  lo, hi = pad[0], pad[0] + size
  used = [t for t in range(k) if any(lo <= t + o * stride < hi for o in range(out))]
  return range(used[0], used[-1] + 1)


def conv_as_matmul(
    x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1), padding: Padding = 'SAME'
) -> jax.Array:
  """2D convolution of NHWC `x` with an HWIO `kernel`, computed as patches @ kernel.

  Equal to lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=('NHWC', 'HWIO',
  'NHWC')) up to float summation order; no dilation, no feature groups.
  """
  n, h, w, c = x.shape
  kh, kw, kc, features = kernel.shape
  if kc != c:
    raise ValueError(f'kernel expects {kc} input channels, got an input with {c}')
  (pt, pb), (pl, pr) = _explicit_padding((h, w), (kh, kw), strides, padding)
  sh, sw = strides
  out_h = (h + pt + pb - kh) // sh + 1
  out_w = (w + pl + pr - kw) // sw + 1
  rows = _taps_touching_data(h, (pt, pb), kh, sh, out_h)
  cols = _taps_touching_data(w, (pl, pr), kw, sw, out_w)
  padded = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  patches = jnp.concatenate(
      [
          lax.slice(
              padded,
              (0, i, j, 0),
              (n, i + (out_h - 1) * sh + 1, j + (out_w - 1) * sw + 1, c),
              (1, sh, sw, 1),
          )
          for i in rows
          for j in cols
      ],
      axis=-1,
  )
  # Row-major (tap_row, tap_col, channel) order matches the concatenation above.
  taps = kernel[rows.start:rows.stop, cols.start:cols.stop].reshape(-1, features)
  return jnp.dot(patches, taps, preferred_element_type=x.dtype)
