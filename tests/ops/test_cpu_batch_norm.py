"""The CPU BatchNorm (dot-product statistics, written-out backward) equals flax.linen.BatchNorm."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import resnet_shapes

from dsset.models import layers

# In float64 the two agree to rounding (1e-12). In float32 they sum in different orders (a dot
# instead of a reduction tree) and E[x^2] - E[x]^2 cancels badly for channels whose mean is large
# against their spread, so neither is exact there: the fast version must be as close to the float64
# result as flax's own float32 result is (within a factor of 2, plus 1e-5 of each array's scale).


def _apply(module, variables, x, mask, g):
  """(outputs, new running statistics, gradients for x and the parameters) of one train step."""
  def loss(x, params):
    y, updates = module.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                              mask=mask, mutable=['batch_stats'])
    # A non-linear loss, so that the backward pass sees a non-trivial cotangent.
    return jnp.vdot(y, g) + 0.01 * jnp.sum(y ** 3), (y, updates['batch_stats'])
  grads, (y, stats) = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(x, variables['params'])
  return y, stats, grads


def _inputs(shape, dtype):
  kx, kg, ks = jax.random.split(jax.random.key(0), 3)
  # Channels with different means and spreads, as after a conv.
  spread = jnp.linspace(0.2, 3.0, shape[-1])
  x = jax.random.normal(kx, shape) * spread + jnp.linspace(-2, 2, shape[-1])
  g = jax.random.normal(kg, shape)
  params = {'scale': 1 + jax.random.uniform(ks, shape[-1:]),
            'bias': jnp.linspace(-1, 1, shape[-1])}
  return jax.tree.map(lambda a: jnp.asarray(a, dtype), (x, g, params))


def _run(module_type, shape, mask, dtype):
  x, g, params = _inputs(shape, dtype)
  module = module_type(use_running_average=False, momentum=0.9, epsilon=1e-5, dtype=dtype,
                       param_dtype=dtype)
  variables = module.init(jax.random.key(1), x)
  return _apply(module, {'params': params, 'batch_stats': variables['batch_stats']}, x, mask, g)


def _compare(shape, mask):
  """The fast float32 BatchNorm is as close to a float64 flax BatchNorm as flax's float32 one."""
  fast, flax32 = (_run(m, shape, mask, jnp.float32) for m in (layers.BatchNorm, nn.BatchNorm))
  with jax.enable_x64(True):
    exact = jax.device_get(_run(nn.BatchNorm, shape, mask, jnp.float64))
  assert jax.tree.structure(fast) == jax.tree.structure(exact)

  def check(ours, theirs, truth):
    scale = np.abs(truth).max()
    our_error = np.abs(np.asarray(ours, np.float64) - truth).max()
    their_error = np.abs(np.asarray(theirs, np.float64) - truth).max()
    assert our_error <= 2 * their_error + 1e-5 * scale, (shape, our_error, their_error, scale)
  jax.tree.map(check, fast, flax32, exact)


# All -m slow: tests/models/test_cpu_fast_path.py runs ResNet-18 at 32 px, BatchNorm included, against
# the plain path by default.
@pytest.mark.parametrize('backbone,image_size', [
    pytest.param(backbone, size, marks=pytest.mark.slow)
    for backbone in ('resnet18', 'resnet50') for size in resnet_shapes.RESOLUTIONS
])
def test_matches_flax_at_resnet_shapes(backbone, image_size):
  for side, channels in sorted(resnet_shapes.batch_norm_shapes(backbone, image_size)):
    _compare((2, side, side, channels), mask=None)


def test_mask_leaves_rows_out_of_the_statistics():
  mask = jnp.array([True, False, True, True]).reshape(-1, 1, 1, 1)
  _compare((4, 5, 5, 16), mask)


def test_flat_features_as_in_projection_heads():
  _compare((32, 64), mask=None)


@pytest.mark.parametrize('mask', [None, np.array([True, False, True]).reshape(-1, 1, 1, 1)])
def test_exact_in_float64(mask):
  with jax.enable_x64(True):
    got, want = (_run(m, (3, 4, 4, 6), mask, jnp.float64) for m in (layers.BatchNorm, nn.BatchNorm))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12), got, want)


def test_eval_mode_uses_the_running_statistics():
  x = jax.random.normal(jax.random.key(0), (4, 3, 3, 5))
  stats = {'mean': jnp.arange(5.0), 'var': jnp.arange(1.0, 6.0)}
  params = {'scale': jnp.full(5, 2.0), 'bias': jnp.ones(5)}
  variables = {'params': params, 'batch_stats': stats}
  settings = dict(use_running_average=True, momentum=0.9, epsilon=1e-5)
  np.testing.assert_allclose(layers.BatchNorm(**settings).apply(variables, x),
                             nn.BatchNorm(**settings).apply(variables, x), rtol=1e-6, atol=1e-6)
