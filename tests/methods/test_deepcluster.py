"""DeepCluster-v2: spherical k-means against a numpy reference (empty clusters included), the
cluster loss, and the method trained by the loop (8 devices = 1; exact resume across k-means)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs.deepcluster_v2
from dsset import config_validation, losses, parallel, train
from dsset.methods import METHODS
from dsset.methods.clustering import cluster_usage, kmeans_iteration, spherical_kmeans
from dsset.methods.deepcluster import DeepClusterMethod


def unit_rows(rng, n, d):
  x = rng.normal(size=(n, d))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def numpy_kmeans_iteration(x, centroids, reseed):
  assignment = np.argmax(x @ centroids.T, axis=1)
  new = np.empty_like(centroids)
  for k in range(len(centroids)):
    members = x[assignment == k]
    new[k] = members.mean(axis=0) if len(members) else reseed[k]
    new[k] /= np.linalg.norm(new[k])
  return new, assignment


def test_kmeans_iteration_matches_numpy_and_reseeds_empty_clusters():
  rng = np.random.default_rng(0)
  x = np.abs(unit_rows(rng, 40, 6))
  # Rows in the positive orthant; centroid 3 points away from all of them, so it ends up empty.
  centroids = np.concatenate([x[:3], -np.ones((1, 6), np.float32) / np.sqrt(6)])
  reseed = unit_rows(rng, 4, 6)
  new, assignment = kmeans_iteration(jnp.asarray(x), jnp.asarray(centroids), jnp.asarray(reseed))
  ref_new, ref_assignment = numpy_kmeans_iteration(x, centroids, reseed)
  assert 3 not in ref_assignment
  np.testing.assert_array_equal(np.asarray(assignment), ref_assignment)
  np.testing.assert_allclose(np.asarray(new), ref_new, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(new)[3], reseed[3], rtol=1e-5)


def test_spherical_kmeans_matches_numpy_with_the_same_draws():
  rng = np.random.default_rng(1)
  x = unit_rows(rng, 60, 5)
  key, k, iterations = jax.random.PRNGKey(3), 7, 4
  centroids, assignment = spherical_kmeans(jnp.asarray(x), k, iterations, key)
  init_key, reseed_key = jax.random.split(key)
  ref = x[np.asarray(jax.random.permutation(init_key, 60))[:k]]
  for i in range(iterations):
    rows = np.asarray(jax.random.randint(jax.random.fold_in(reseed_key, i), (k,), 0, 60))
    ref, _ = numpy_kmeans_iteration(x, ref, x[rows])
  np.testing.assert_allclose(np.asarray(centroids), ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(assignment), np.argmax(x @ ref.T, axis=1))


def test_cluster_loss_and_usage():
  rng = np.random.default_rng(2)
  scores = rng.uniform(-1, 1, (6, 4)).astype(np.float32)
  targets = np.array([0, 3, 1, 1, 2, 0])
  logits = scores.astype(np.float64) / 0.1
  ref = np.mean([np.log(np.exp(row).sum()) - row[t] for row, t in zip(logits, targets)])
  got = losses.cluster_cross_entropy(jnp.asarray(scores), jnp.asarray(targets), 0.1)
  np.testing.assert_allclose(float(got), ref, rtol=1e-5)
  usage = cluster_usage(jnp.array([0, 0, 2, 2]), 5)
  assert float(usage['clusters_used']) == 2
  np.testing.assert_allclose(float(usage['cluster_entropy']), np.log(2), rtol=1e-6)


def tiny(**overrides):
  c = configs.deepcluster_v2.get_config('tiny')
  c.update_from_flattened_dict(overrides)
  return c


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_configs_are_checked_and_too_many_clusters_is_one_clear_error(tmp_path):
  assert METHODS['deepcluster_v2'] is DeepClusterMethod
  for variant in (None, 'paper', 'compare', 'tiny'):
    config_validation.validate(configs.deepcluster_v2.get_config(variant))
  with pytest.raises(config_validation.ConfigError, match=r'deepcluster\.num_prototypes'):
    config_validation.validate(tiny(**{'deepcluster.num_prototypes': ()}))
  with pytest.raises(config_validation.ConfigError, match=r'deepcluster\.num_prototypes.*48'):
    train.train_and_evaluate(tiny(**{'deepcluster.num_prototypes': (8, 100)}), str(tmp_path))


@pytest.mark.slow  # 38 s; the default 8-device check is tests/test_train.py's simclr case
def test_eight_devices_match_one_across_kmeans(tmp_path):
  """The bank, k-means and the loss are global: sharding the batch over 8 devices changes
  nothing (6 bank-filling steps, k-means, 2 trained steps)."""
  assert len(jax.devices()) == 8
  config = tiny(**{'train.num_steps': 8})
  train.train_and_evaluate(config, str(tmp_path / 'one'), devices=jax.devices()[:1])
  train.train_and_evaluate(config, str(tmp_path / 'eight'))
  one, eight = read_metrics(tmp_path / 'one'), read_metrics(tmp_path / 'eight')
  assert [m['kmeans_rounds'] for m in one] == [0] * 6 + [1, 1]
  assert [m['loss'] for m in one][:6] == [0.0] * 6 and one[-1]['loss'] > 0
  for key in ('loss', 'clusters_used', 'cluster_entropy'):
    np.testing.assert_allclose([m[key] for m in eight], [m[key] for m in one], rtol=1e-4,
                               atol=1e-5)


def _final_params(workdir):
  import flax.serialization
  with open(os.path.join(workdir, 'backbone.msgpack'), 'rb') as f:
    return flax.serialization.msgpack_restore(f.read())


def test_resume_across_an_epoch_equals_uninterrupted(tmp_path):
  """Stopped mid-epoch after the first k-means, resumed past the second: bank, assignments and
  prototypes come back from the checkpoint, so the runs agree step for step."""
  config = tiny(**{'train.num_steps': 9, 'train.schedule': 'constant',
                   'train.warmup_steps': 0})
  split, whole = tmp_path / 'split', tmp_path / 'whole'
  train.train_and_evaluate(config, str(split), devices=jax.devices()[:1])
  config.train.num_steps = 14
  train.train_and_evaluate(config, str(split), devices=jax.devices()[:1])
  train.train_and_evaluate(config, str(whole), devices=jax.devices()[:1])
  a, b = read_metrics(split), read_metrics(whole)
  assert [m['step'] for m in a] == list(range(1, 15))
  assert a[-1]['kmeans_rounds'] == 2
  for key in ('loss', 'clusters_used', 'cluster_entropy', 'kmeans_rounds'):
    np.testing.assert_allclose([m[key] for m in a], [m[key] for m in b], rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
               _final_params(split), _final_params(whole))


def test_bank_is_split_by_rows_over_devices_and_kmeans_on_it_matches_one_device():
  """Bank and assignments lie in row blocks over the 8 devices (rows: the train records rounded
  up to the batch), the rest of the state is replicated, and k-means over the split bank gives
  one device's centroids and assignments (rows past the records stay unclustered)."""
  config = tiny()
  method = DeepClusterMethod(config)
  method.make_train_iterator()
  n, batch = method._num_records, int(config.train.batch_size)
  abstract = jax.eval_shape(train.Trainer(config, method).init_state, jax.random.PRNGKey(0))
  shardings = train.state_shardings(method, abstract, parallel.make_mesh())
  bank = abstract['method_state']['bank']
  rows = bank.shape[1]
  assert rows % batch == 0 and n <= rows < n + batch and rows % 8 == 0
  assert shardings['method_state']['bank'].shard_shape(bank.shape) == (2, rows // 8, bank.shape[2])
  assignments = abstract['method_state']['assignments']
  assert shardings['method_state']['assignments'].shard_shape(assignments.shape)[2] == rows // 8
  repl = parallel.replicated(parallel.make_mesh())
  assert shardings['step'] == shardings['method_state']['rounds'] == repl
  assert all(s == repl for s in jax.tree.leaves(shardings['params']))

  rng = np.random.default_rng(3)
  filled = np.zeros(bank.shape, np.float32)
  filled[:, :n] = unit_rows(rng, 2 * n, bank.shape[2]).reshape(2, n, -1)
  state = {'bank': filled, 'assignments': np.full(assignments.shape, -1, np.int32),
           'rounds': np.int32(0)}
  params = {f'prototypes_{h}': {'kernel': np.zeros((bank.shape[2], k), np.float32)}
            for h, k in enumerate(method.model.prototypes)}
  key = jax.random.PRNGKey(5)
  split = jax.jit(method.cluster)(params, jax.device_put(state, shardings['method_state']), key)
  one = jax.jit(method.cluster)(*jax.device_put((params, state, key), jax.devices()[0]))
  (params_split, state_split), (params_one, state_one) = split, one
  assert state_split['bank'].sharding == shardings['method_state']['bank']
  np.testing.assert_array_equal(state_split['assignments'], state_one['assignments'])
  assert (np.asarray(state_one['assignments'])[:, :, :n] >= 0).all()
  assert (np.asarray(state_one['assignments'])[:, :, n:] == -1).all()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               params_split, params_one)
