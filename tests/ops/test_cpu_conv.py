"""conv_as_matmul equals XLA's convolution (values, gradients) at the ResNet shapes it replaces."""

import jax
from jax import lax
import numpy as np
import pytest
import resnet_shapes

from dsset.ops import cpu_conv

# Relative to the largest magnitude of the reference: the two forms sum the same products in a
# different order (measured differences stay below 2e-6 here).
RELATIVE_TOLERANCE = 1e-5
PAD_1 = ((1, 1), (1, 1))


def _rewritten_shapes():
  shapes = set()
  for backbone in ('resnet18', 'resnet50'):
    for size in resnet_shapes.RESOLUTIONS:
      for side, cin, cout, stride in resnet_shapes.conv3x3_shapes(backbone, size):
        if cpu_conv.output_smaller_than_kernel((side, side), (3, 3), (stride, stride), PAD_1):
          shapes.add((side, cin, cout, stride))
  return sorted(shapes)


def _xla_conv(x, kernel, strides, padding):
  return lax.conv_general_dilated(
      x, kernel, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )


def _assert_close(actual, expected):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape
  scale = np.abs(expected).max()
  assert scale > 0
  np.testing.assert_array_less(np.abs(actual - expected).max(), RELATIVE_TOLERANCE * scale)


def _check_equivalent(x_shape, kernel_shape, strides, padding):
  kx, kk, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, x_shape)
  kernel = jax.random.normal(kk, kernel_shape) / np.sqrt(np.prod(kernel_shape[:3]))
  outs, grads = [], []
  for conv in (cpu_conv.conv_as_matmul, _xla_conv):
    y, vjp = jax.vjp(jax.jit(lambda x, k, conv=conv: conv(x, k, strides, padding)), x, kernel)
    outs.append(y)
    grads.append(vjp(jax.random.normal(kg, y.shape)))
  _assert_close(outs[0], outs[1])
  _assert_close(grads[0][0], grads[1][0])
  _assert_close(grads[0][1], grads[1][1])


def test_rewrite_covers_exactly_the_maps_below_kernel_size():
  # 32 px: 2x2 and 1x1 outputs in the last two stages; 64 px: 2x2 in the last; 128 px: none.
  assert _rewritten_shapes() == [
      (1, 512, 512, 1),
      (2, 256, 256, 1),
      (2, 256, 512, 2),
      (2, 512, 512, 1),
      (2, 512, 512, 2),
      (4, 128, 256, 2),
      (4, 256, 256, 2),
      (4, 256, 512, 2),
      (4, 512, 512, 2),
  ]
  assert not cpu_conv.output_smaller_than_kernel((4, 4), (3, 3), (1, 1), PAD_1)
  assert not cpu_conv.output_smaller_than_kernel((2, 2), (1, 1), (1, 1), 'VALID')


# One shape of each kind runs by default (a 1x1 map, a stride-2 conv onto 1x1, a stride-2 conv onto
# 2x2); the whole sweep with -m slow.
DEFAULT_SHAPES = {(1, 512, 512, 1), (2, 256, 512, 2), (4, 256, 512, 2)}


@pytest.mark.parametrize('side,cin,cout,stride', [
    shape if shape in DEFAULT_SHAPES else pytest.param(*shape, marks=pytest.mark.slow)
    for shape in _rewritten_shapes()
])
def test_matches_xla_conv_at_resnet_shapes(side, cin, cout, stride):
  _check_equivalent((2, side, side, cin), (3, 3, cin, cout), (stride, stride), PAD_1)


@pytest.mark.parametrize(
    'x_shape,kernel_shape,strides,padding',
    [
        ((3, 2, 3, 5), (3, 3, 5, 4), (1, 1), 'SAME'),
        ((2, 5, 4, 3), (3, 2, 3, 6), (2, 1), 'VALID'),
        ((2, 1, 2, 4), (5, 5, 4, 3), (1, 2), ((2, 2), (3, 1))),
    ],
)
def test_matches_xla_conv_for_other_kernels_and_paddings(x_shape, kernel_shape, strides, padding):
  _check_equivalent(x_shape, kernel_shape, strides, padding)


def test_rejects_channel_mismatch():
  with pytest.raises(ValueError, match='input channels'):
    cpu_conv.conv_as_matmul(np.zeros((1, 2, 2, 3)), np.zeros((3, 3, 4, 5)), (1, 1), PAD_1)
