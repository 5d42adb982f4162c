"""The 3D convolution rewrites equal XLA's convolution (values and gradients)."""

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from dsset.ops import cpu_conv3d

# Relative to the largest magnitude of the reference: the rewrites sum the same products in
# another order (measured differences stay below 1e-6 here).
RELATIVE_TOLERANCE = 1e-5
PAD_1 = ((1, 1),) * 3
DIMENSIONS = ('NDHWC', 'DHWIO', 'NDHWC')


def _xla_conv(x, kernel, strides, padding):
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=DIMENSIONS)


def _assert_close(actual, expected):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape
  scale = np.abs(expected).max()
  assert scale > 0
  np.testing.assert_array_less(np.abs(actual - expected).max(), RELATIVE_TOLERANCE * scale)


def _values_and_grads(conv, x, kernel, strides, padding, weights):
  def loss(x, kernel):
    y = conv(x, kernel, strides, padding)
    return jnp.sum(y * weights), y
  (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, kernel)
  return y, grads


# (input side per axis, in, out, kernel, strides, padding): the U-Net's 3^3 convs on maps from 8^3
# down to the 2^3 and 1^3 bottlenecks of 32^3 and 16^3 inputs, a single-channel first layer, the
# 1^3 output conv, and uneven sides, strides and paddings to pin the index arithmetic.
SHAPES = [
    ((8, 8, 8), 1, 4, (3, 3, 3), (1, 1, 1), PAD_1),
    ((4, 4, 4), 6, 5, (3, 3, 3), (1, 1, 1), PAD_1),
    ((2, 2, 2), 8, 6, (3, 3, 3), (1, 1, 1), PAD_1),
    ((1, 1, 1), 8, 6, (3, 3, 3), (1, 1, 1), PAD_1),
    ((4, 4, 4), 6, 3, (1, 1, 1), (1, 1, 1), ((0, 0),) * 3),
    ((5, 6, 7), 3, 4, (3, 2, 3), (2, 1, 2), ((1, 0), (0, 1), (1, 1))),
]


@pytest.mark.parametrize('rewrite', [cpu_conv3d.conv3d_depth_stacked, cpu_conv3d.conv3d_as_matmul])
@pytest.mark.parametrize('side,cin,cout,window,strides,padding', SHAPES)
def test_rewrite_matches_xla(rewrite, side, cin, cout, window, strides, padding):
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (2, *side, cin))
  kernel = jax.random.normal(keys[1], (*window, cin, cout))
  expected_y = _xla_conv(x, kernel, strides, padding)
  weights = jax.random.normal(keys[2], expected_y.shape)
  y, grads = _values_and_grads(rewrite, x, kernel, strides, padding, weights)
  ref_y, ref_grads = _values_and_grads(_xla_conv, x, kernel, strides, padding, weights)
  _assert_close(y, ref_y)
  for grad, ref in zip(grads, ref_grads):
    _assert_close(grad, ref)


def test_the_choice_avoids_the_small_map_form():
  # Maps smaller than the kernel would hit XLA:CPU's slow small-map 2D convolution.
  assert cpu_conv3d.output_smaller_than_kernel((2, 2, 2), (3, 3, 3), (1, 1, 1), PAD_1)
  assert not cpu_conv3d.output_smaller_than_kernel((4, 4, 4), (3, 3, 3), (1, 1, 1), PAD_1)
  x, kernel = jnp.ones((1, 2, 2, 2, 2)), jnp.ones((3, 3, 3, 2, 3))
  text = jax.jit(lambda: cpu_conv3d.conv3d(x, kernel, (1, 1, 1), PAD_1)).lower().as_text()
  assert 'stablehlo.convolution' not in text and 'dot_general' in text


@pytest.mark.parametrize('shape', [(2, 3, 2, 4, 5), (1, 2, 2, 3)])
def test_conv_transpose_matches_flax(shape):
  rank = len(shape) - 2
  x = jax.random.normal(jax.random.key(0), shape)
  module = nn.ConvTranspose(3, (2,) * rank, (2,) * rank, use_bias=False)
  variables = module.init(jax.random.key(1), x)
  weights = jax.random.normal(jax.random.key(2), module.apply(variables, x).shape)

  def run(fn):
    loss = lambda x, kernel: jnp.sum(fn(x, kernel) * weights)
    return fn(x, variables['params']['kernel']), jax.grad(loss, (0, 1))(
        x, variables['params']['kernel'])

  y, grads = run(cpu_conv3d.conv_transpose_as_matmul)
  ref_y, ref_grads = run(lambda x, kernel: module.apply({'params': {'kernel': kernel}}, x))
  _assert_close(y, ref_y)
  for grad, ref in zip(grads, ref_grads):
    _assert_close(grad, ref)
