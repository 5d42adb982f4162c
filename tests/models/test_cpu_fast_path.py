"""Whole ResNets with the CPU fast path on compute what they compute with it off."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsset import models

# Relative L2 distance (gradients: per parameter leaf), computed in float64. In float32 the
# comparison says little for deep nets: BatchNorm over a batch of 4 at 1x1-2x2 maps divides by tiny
# variances, and ResNet-50 at 64 px then differs from its own float64 result by 9e-2 on the worst
# gradient leaf, plain path alone. In float64 the rewrite and the plain ops agree to ~1e-14
# (measured), so any real error in the rewrite stands out.
# The features themselves are returned in float32 by design (ResNet casts its output), hence 1e-6.
OUTPUT_TOLERANCE = 1e-6
GRADIENT_TOLERANCE = 1e-9


def _relative_l2(a, b):
  return float(jnp.linalg.norm((a - b).ravel()) / jnp.maximum(jnp.linalg.norm(b.ravel()), 1e-30))


def _forward_and_grads(backbone, variables, images, weights):
  def loss(params):
    features, _ = backbone.apply({**variables, 'params': params}, images, train=True,
                                 mutable=['batch_stats'])
    return jnp.sum(features * weights), features
  (_, features), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])
  return features, grads


def _check(name, image_size):
  with jax.enable_x64(True):
    images = jax.random.uniform(jax.random.key(0), (4, image_size, image_size, 1), jnp.float64)
    plain, fast = (models.BACKBONES[name](layers=models.Layers(jnp.float64, cpu_fast_path=flag))
                   for flag in (False, True))
    variables = jax.tree.map(lambda v: v.astype(jnp.float64),
                             plain.init(jax.random.key(1), images))
    weights = jax.random.normal(jax.random.key(2), (4, plain.num_features), jnp.float64)
    features_plain, grads_plain = _forward_and_grads(plain, variables, images, weights)
    features_fast, grads_fast = _forward_and_grads(fast, variables, images, weights)
    assert _relative_l2(features_fast, features_plain) < OUTPUT_TOLERANCE
    errors = jax.tree.map(_relative_l2, grads_fast, grads_plain)
    worst = max(jax.tree.leaves(errors))
    assert worst < GRADIENT_TOLERANCE, errors


# -m slow (about 45 s): the default run checks the same replaced ops in ResNet-50 at 32-128 px and
# counts the replaced convolutions; BasicBlock composes those ops, checked here by hand.
@pytest.mark.slow
@pytest.mark.parametrize('image_size', [32, 64])
def test_resnet18_fast_path_matches_plain(image_size):
  _check('resnet18', image_size)


@pytest.mark.slow
@pytest.mark.parametrize('image_size', [32, 64, 128])
def test_resnet50_fast_path_matches_plain(image_size):
  _check('resnet50', image_size)


@pytest.mark.parametrize('fast,expected_convs', [(False, 20), (True, 16)])
def test_fast_path_replaces_the_small_map_convs(fast, expected_convs):
  # ResNet-18 at 64 px has 20 convs; the four 3x3 convs with 2x2 outputs (layer 4) are rewritten.
  backbone = models.ResNet18(layers=models.Layers(cpu_fast_path=fast))
  images = jnp.zeros((2, 64, 64, 1))
  variables = jax.eval_shape(backbone.init, jax.random.key(0), images)
  variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables)
  text = jax.jit(lambda: backbone.apply(variables, images)).lower().as_text()
  assert text.count('stablehlo.convolution') == expected_convs
  assert ('custom_vjp' in str(jax.make_jaxpr(lambda: backbone.apply(variables, images))())) == fast
