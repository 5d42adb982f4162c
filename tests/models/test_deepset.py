"""SetEncoder: pooling over valid slices, permutation invariance, masks, rho, jit."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsset import models
from dsset.models import resnet

B, K, SIZE = 3, 4, 16


def phi():
  return models.ResNet(stage_sizes=(1, 1), block=resnet.BasicBlock, small_stem=True,
                       width_multiplier=0.125)


@pytest.fixture(scope='module')
def sets():
  # Sets of clearly different brightness: rho's BatchNorm over only B sets would otherwise divide
  # by a tiny variance and magnify rounding differences beyond any sensible tolerance.
  brightness = jnp.array([0.2, 0.6, 1.0])[:, None, None, None, None]
  x = jax.random.uniform(jax.random.key(1), (B, K, SIZE, SIZE, 1)) * brightness
  mask = jnp.array([[True, True, True, True], [True, False, True, False],
                    [False, False, True, False]])
  return x, mask


def make(pooling='sum', rho=False):
  return models.SetEncoder(encoder=phi(), pooling=pooling, rho=rho)


def run_fn(model, train):
  """Jitted apply; in train mode it also returns the updated batch statistics."""
  if train:
    return jax.jit(lambda v, x, m: model.apply(v, x, m, train=True, mutable=['batch_stats']))
  return jax.jit(lambda v, x, m: (model.apply(v, x, m), None))


@pytest.fixture(scope='module')
def encoders(sets):
  """(model, variables, eval fn, train fn) for each pooling / rho combination, built once."""
  x, mask = sets
  with_rho = make('mean', rho=True)
  variables = jax.jit(with_rho.init)(jax.random.key(0), x, mask)
  # One init (compiling it is slow); without rho the model needs only the encoder's variables.
  encoder_only = {collection: {'encoder': tree['encoder']} for collection, tree in variables.items()}
  built = {}
  for model, model_variables in [(make('sum'), encoder_only), (with_rho, variables)]:
    built[model.pooling, model.rho] = (model, model_variables, run_fn(model, False),
                                       run_fn(model, True))
  return built


def close(a, b):
  # Features are O(1); reordered float sums differ by ~1e-6, which BatchNorm can magnify tenfold.
  chex.assert_trees_all_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('config', [('sum', False), ('mean', True)])
@pytest.mark.parametrize('train', [False, True])
def test_permutation_invariant(sets, encoders, config, train):
  x, mask = sets
  _, variables, evaluate, train_step = encoders[config]
  run = train_step if train else evaluate
  reference = run(variables, x, mask)
  chex.assert_shape(reference[0], (B, 16))
  for seed in range(3):
    order = jax.random.permutation(jax.random.key(seed), K)
    close(run(variables, x[:, order], mask[:, order]), reference)


@pytest.mark.parametrize('config', [('sum', False), ('mean', True)])
@pytest.mark.parametrize('train', [False, True])
def test_masked_slices_do_not_matter(sets, encoders, config, train):
  x, mask = sets
  _, variables, evaluate, train_step = encoders[config]
  run = train_step if train else evaluate
  noise = jax.random.uniform(jax.random.key(7), x.shape) * 10.0
  close(run(variables, jnp.where(mask[..., None, None, None], x, noise), mask),
        run(variables, x, mask))


def test_random_masks_and_permutations(encoders):
  _, variables, evaluate, _ = encoders['sum', False]
  rng = np.random.default_rng(0)
  for _ in range(3):
    x = jnp.asarray(rng.uniform(size=(B, K, SIZE, SIZE, 1)), jnp.float32)
    mask = jnp.asarray(rng.uniform(size=(B, K)) < 0.6)
    order = rng.permutation(K)
    noise = jnp.asarray(rng.uniform(size=x.shape), jnp.float32)
    close(evaluate(variables, jnp.where(mask[..., None, None, None], x, noise)[:, order],
                   mask[:, order]),
          evaluate(variables, x, mask))


def test_pools_over_valid_slices_only(sets, encoders):
  x, mask = sets
  _, variables, evaluate, _ = encoders['sum', False]
  features = jax.jit(phi().apply)({'params': variables['params']['encoder'],
                                   'batch_stats': variables['batch_stats']['encoder']},
                                  x.reshape(B * K, SIZE, SIZE, 1)).reshape(B, K, -1)
  expected = jnp.sum(features * mask[..., None], axis=1)
  close(evaluate(variables, x, mask)[0], expected)
  mean_model = make('mean')
  mean = jax.jit(mean_model.apply)(variables, x, mask)
  close(mean, expected / jnp.sum(mask, axis=1, keepdims=True))


def test_single_slice_sum_equals_plain_encoder(sets, encoders):
  x, _ = sets
  _, variables, evaluate, train_step = encoders['sum', False]
  encoder_variables = {'params': variables['params']['encoder'],
                       'batch_stats': variables['batch_stats']['encoder']}
  single = x[:, :1]
  encoder = phi()
  close(evaluate(variables, single, None)[0],
        jax.jit(encoder.apply)(encoder_variables, single[:, 0]))
  set_features, set_stats = train_step(variables, single, None)
  plain_features, plain_stats = jax.jit(
      lambda v, images: encoder.apply(v, images, train=True, mutable=['batch_stats']))(
          encoder_variables, single[:, 0])
  close(set_features, plain_features)
  close(set_stats['batch_stats']['encoder'], plain_stats['batch_stats'])


def test_rho_shapes(encoders):
  _, variables, _, _ = encoders['mean', True]
  rho = {name: jax.tree.map(jnp.shape, variables['params'][name])
         for name in ('rho_hidden', 'rho_out')}
  assert rho == {'rho_hidden': {'kernel': (16, 512), 'bias': (512,)},
                 'rho_out': {'kernel': (512, 16), 'bias': (16,)}}
  assert set(variables['batch_stats']) == {'encoder', 'rho_norm'}


@pytest.mark.parametrize('config', [('sum', False), ('mean', True)])
def test_jit_matches_eager(sets, encoders, config):
  x, mask = sets
  model, variables, _, train_step = encoders[config]
  eager = model.apply(variables, x, mask, train=True, mutable=['batch_stats'])
  close(train_step(variables, x, mask), eager)


def test_unknown_pooling_raises(sets):
  x, mask = sets
  with pytest.raises(ValueError, match='model.pooling'):
    jax.eval_shape(lambda: make('max').init(jax.random.key(0), x, mask))


@pytest.mark.parametrize('config', [('sum', False), ('mean', True)])
def test_without_encoder_pools_precomputed_features_the_same_way(sets, encoders, config):
  # Scan-level evaluation encodes slices once, then applies the set encoder's pooling and rho
  # (encoder=None) with the pretrained set encoder's own variables.
  x, _ = sets
  model, variables, eval_step, _ = encoders[config]
  slice_features = phi().apply({c: v['encoder'] for c, v in variables.items()},
                               x.reshape(B * K, SIZE, SIZE, 1)).reshape(B, K, -1)
  own = {c: {k: v for k, v in tree.items() if k != 'encoder'} for c, tree in variables.items()}
  pooled = models.SetEncoder(encoder=None, pooling=model.pooling, rho=model.rho).apply(
      own, slice_features)
  close(pooled, eval_step(variables, x, None)[0])
