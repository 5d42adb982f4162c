"""SwAV: Sinkhorn codes and the swapped-prediction loss against plain references, prototype
handling, and the method trained by the loop (8 devices = 1, the queue in the state, resume)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs.swav
from dsset import config_validation, losses, train
from dsset.methods import METHODS
from dsset.methods.swav import SwavMethod


def numpy_sinkhorn(scores, epsilon, iterations):
  """SwAV's distributed_sinkhorn on one device, in float64."""
  q = np.exp(np.asarray(scores, np.float64) / epsilon).T
  q /= q.sum()
  k, b = q.shape
  for _ in range(iterations):
    q /= q.sum(axis=1, keepdims=True)
    q /= k
    q /= q.sum(axis=0, keepdims=True)
    q /= b
  return (q * b).T


@pytest.mark.parametrize('batch, prototypes, iterations', [(8, 5, 3), (32, 16, 3), (6, 40, 10)])
def test_sinkhorn_matches_reference_and_marginals(batch, prototypes, iterations):
  rng = np.random.default_rng(batch)
  scores = rng.uniform(-1, 1, (batch, prototypes)).astype(np.float32)
  codes = np.asarray(losses.sinkhorn(jnp.asarray(scores), 0.05, iterations))
  ref = numpy_sinkhorn(scores, 0.05, iterations)
  np.testing.assert_allclose(codes, ref, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(codes.sum(axis=1), 1.0, rtol=1e-5)  # each sample: one assignment
  # Each prototype gets about B / K of the batch; more iterations, closer.
  np.testing.assert_allclose(codes.sum(axis=0), ref.sum(axis=0), rtol=1e-4)
  many = np.asarray(losses.sinkhorn(jnp.asarray(scores), 0.05, 200))
  np.testing.assert_allclose(many.sum(axis=0), batch / prototypes, rtol=2e-2)


def test_swapped_prediction_matches_a_loop():
  rng = np.random.default_rng(0)
  b, k, t = 5, 7, 0.1
  s_a, s_b = rng.uniform(-1, 1, (2, b, k)).astype(np.float32)
  q_a, q_b = rng.dirichlet(np.ones(k), (2, b)).astype(np.float32)
  total = 0.0
  for i in range(b):
    for scores, codes in ((s_a[i], q_b[i]), (s_b[i], q_a[i])):
      logits = scores.astype(np.float64) / t
      log_p = logits - np.log(np.sum(np.exp(logits)))
      total -= sum(codes[j] * log_p[j] for j in range(k))
  got = losses.swapped_prediction(*map(jnp.asarray, (s_a, s_b, q_a, q_b)), t)
  np.testing.assert_allclose(float(got), total / (2 * b), rtol=1e-5)


def tiny(**overrides):
  c = configs.swav.get_config('tiny')
  c.update_from_flattened_dict(overrides)
  return c


def test_prototypes_are_unit_and_frozen_as_configured():
  method = SwavMethod(tiny(**{'swav.freeze_prototypes_steps': 2}))
  params = method.init(jax.random.PRNGKey(0))['params']
  normed, _ = method.before_step(params, {}, jnp.zeros((), jnp.int32), jax.random.PRNGKey(1), None)
  np.testing.assert_allclose(np.linalg.norm(normed['prototypes_0']['kernel'], axis=0), 1.0,
                             rtol=1e-5)
  assert [method.frozen_paths(method.phase(s)) for s in (1, 2, 3)] == [
      (('prototypes_0',),), (('prototypes_0',),), ()]


def leaf_keys(config, prefix=''):
  keys = []
  for name, value in config.items():
    keys += leaf_keys(value, f'{prefix}{name}.') if hasattr(value, 'items') else [prefix + name]
  return keys


def test_config_files_have_a_rule_for_every_key():
  assert METHODS['swav'] is SwavMethod
  for variant in (None, 'paper', 'compare', 'tiny'):
    config = configs.swav.get_config(variant)
    config_validation.validate(config)
    assert set(leaf_keys(config)) == set(config_validation.rules(config)) | {'method'}
  with pytest.raises(config_validation.ConfigError, match=r'swav\.epsilon'):
    config_validation.validate(tiny(**{'swav.epsilon': 0}))


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


# Slow: the step has no explicit collectives (jit over the sharded global batch computes Sinkhorn on
# all of it), and method state under 8 devices is checked by DeepCluster-v2's default test.
@pytest.mark.slow
def test_eight_devices_match_one_with_the_queue(tmp_path):
  """Codes are computed over the global batch (and the global queue): sharding changes nothing."""
  assert len(jax.devices()) == 8
  # No frozen phase: one compile per device count (freezing has its own test above).
  config = tiny(**{'train.num_steps': 4})
  train.train_and_evaluate(config, str(tmp_path / 'one'), devices=jax.devices()[:1])
  train.train_and_evaluate(config, str(tmp_path / 'eight'))
  one, eight = read_metrics(tmp_path / 'one'), read_metrics(tmp_path / 'eight')
  assert [m['queue_in_use'] for m in one] == [0, 0, 1, 1]
  for key in ('loss', 'clusters_used', 'cluster_entropy'):
    np.testing.assert_allclose([m[key] for m in eight], [m[key] for m in one], rtol=1e-4,
                               atol=1e-5)


def test_trains_logs_cluster_usage_and_resumes(tmp_path):
  config = tiny(**{'train.num_steps': 2, 'train.schedule': 'constant', 'train.warmup_steps': 0})
  train.train_and_evaluate(config, str(tmp_path / 'split'), devices=jax.devices()[:1])
  config.train.num_steps = 4
  train.train_and_evaluate(config, str(tmp_path / 'split'), devices=jax.devices()[:1])
  train.train_and_evaluate(config, str(tmp_path / 'whole'), devices=jax.devices()[:1])
  split, whole = read_metrics(tmp_path / 'split'), read_metrics(tmp_path / 'whole')
  assert [m['step'] for m in split] == [1, 2, 3, 4]
  # Steps 3 and 4 use the queue filled before the interruption: it was restored.
  for key in ('loss', 'clusters_used', 'cluster_entropy', 'queue_in_use'):
    np.testing.assert_allclose([m[key] for m in split], [m[key] for m in whole], rtol=1e-5)
  assert all(1 <= m['clusters_used'] <= 16 for m in split)
  assert (tmp_path / 'whole' / 'backbone.msgpack').exists()
