"""cpu_pool.max_pool equals autodiff of reduce_window max (flax nn.max_pool), ties included."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import resnet_shapes

from dsset.ops import cpu_pool

# The forward is the same reduce_window, so values must be identical. A gradient element sums the
# cotangents of the overlapping windows that chose it, in a different order than select_and_scatter:
# allow a few float32 ulps of the cotangent scale.
GRADIENT_TOLERANCE = 1e-6
STEM_POOL = dict(window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _inputs(shape, kind):
  x = jax.random.normal(jax.random.key(1), shape)
  if kind == 'relu':  # what a ResNet pools: many windows hold several zeros.
    return jax.nn.relu(x)
  if kind == 'coarse':  # few distinct values: ties between non-zero maxima too.
    return jnp.round(x)
  return x


def _check_equivalent(x, window_shape, strides, padding):
  ours = lambda x: cpu_pool.max_pool(x, window_shape, strides, padding)
  reference = lambda x: nn.max_pool(x, window_shape, strides, padding)
  y, vjp = jax.vjp(jax.jit(ours), x)
  y_ref, vjp_ref = jax.vjp(jax.jit(reference), x)
  np.testing.assert_array_equal(y, y_ref)
  g = jax.random.normal(jax.random.key(2), y.shape)
  (dx,), (dx_ref,) = vjp(g), vjp_ref(g)
  np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=GRADIENT_TOLERANCE)
  # Each window passes its cotangent to exactly one input: the total is preserved.
  np.testing.assert_allclose(dx.sum(), g.sum(), rtol=1e-4)


@pytest.mark.parametrize('image_size', [
    size if size == 64 else pytest.param(size, marks=pytest.mark.slow)
    for size in resnet_shapes.RESOLUTIONS
])
@pytest.mark.parametrize('kind', ['relu', 'coarse'])
def test_matches_autodiff_at_resnet_stem_shapes(image_size, kind):
  side = resnet_shapes.stem_pool_input(image_size)
  _check_equivalent(_inputs((2, side, side, 64), kind), **STEM_POOL)


def test_all_equal_window_sends_gradient_to_its_first_element():
  x = jnp.zeros((1, 3, 3, 1))
  dx = jax.grad(lambda x: cpu_pool.max_pool(x, (3, 3), (1, 1), 'VALID').sum())(x)
  expected = np.zeros((1, 3, 3, 1))
  expected[0, 0, 0, 0] = 1
  np.testing.assert_array_equal(dx, expected)


@pytest.mark.parametrize(
    'shape,window_shape,strides,padding',
    [
        ((2, 7, 6, 3), (2, 2), (2, 2), 'VALID'),
        ((2, 7, 6, 3), (3, 2), (1, 2), 'SAME'),
        ((1, 5, 5, 2), (3, 3), (3, 3), ((1, 0), (2, 1))),
    ],
)
def test_matches_autodiff_for_other_windows(shape, window_shape, strides, padding):
  _check_equivalent(_inputs(shape, 'coarse'), window_shape, strides, padding)
