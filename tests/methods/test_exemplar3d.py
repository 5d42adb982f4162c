"""exemplar3d: the triplet loss and the derangement against plain loops, the model's shapes, the
config checks, and the method end to end through the one loop (phantom with a resume, a NIfTI
folder)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import exemplar3d
from data_pipelines.sources import make_source
from dsset.config_validation import ConfigError, validate
from dsset.methods import exemplar3d as exemplar
from dsset.methods import make_method
from tests.data_pipelines import format_fixtures
from tests.test_methods_3d import (CONSTANT, check_resume_equals_uninterrupted, exported, metrics,
                                   run, tiny, write_nifti_folder)


def triplet_loop(anchor, positive, negative, margin, mean_over_code):
  """Loss, share of triplets meeting the margin, mean distances: a plain loop over the batch."""
  losses, met, to_positive, to_negative = [], [], [], []
  for a, p, n in zip(anchor, positive, negative):
    d_p = sum((a[k] - p[k]) ** 2 for k in range(len(a)))
    d_n = sum((a[k] - n[k]) ** 2 for k in range(len(a)))
    if mean_over_code:
      d_p, d_n = d_p / len(a), d_n / len(a)
    losses.append(max(0.0, d_p - d_n + margin))
    met.append(d_n >= d_p + margin)
    to_positive.append(d_p)
    to_negative.append(d_n)
  return np.mean(losses), np.mean(met), np.mean(to_positive), np.mean(to_negative)


@pytest.mark.parametrize('batch, code, margin', [(6, 8, 1.0), (5, 3, 0.3), (2, 16, 2.0)])
@pytest.mark.parametrize('distance', exemplar.DISTANCES)
def test_triplet_loss_matches_a_loop(batch, code, margin, distance):
  rng = np.random.default_rng(batch)
  anchor, positive = rng.random((2, batch, code))
  positive = 0.9 * anchor + 0.1 * positive  # near the anchor
  negative = rng.random((batch, code))
  negative[::2] = 1 - anchor[::2]  # far: these triplets may meet the margin, the others not
  mean_over_code = distance == 'mean_squared'
  loss, logged = exemplar.triplet_loss(*(jnp.asarray(x, jnp.float32)
                                         for x in (anchor, positive, negative)), margin, distance)
  expected = triplet_loop(anchor, positive, negative, margin, mean_over_code)
  got = (loss, logged['triplet_accuracy'], logged['positive_distance'],
         logged['negative_distance'])
  np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=1e-5, atol=1e-6)


def test_a_satisfied_triplet_costs_nothing_and_a_tie_costs_the_margin():
  a = jnp.array([[0.0, 0.0], [0.0, 0.0]])
  p = jnp.array([[0.1, 0.0], [0.0, 1.0]])
  n = jnp.array([[2.0, 0.0], [1.0, 0.0]])  # d(a, n) = 4 >= 0.01 + 1; then a tie: 1 vs 1
  loss, logged = exemplar.triplet_loss(a, p, n, 1.0)
  assert float(loss) == pytest.approx(0.5)
  assert float(logged['triplet_accuracy']) == 0.5


@pytest.mark.parametrize('n', [2, 3, 5, 8])
def test_derangements_are_permutations_without_fixed_points(n):
  keys = jax.random.split(jax.random.key(n), 500)
  draw = jax.jit(jax.vmap(lambda key: exemplar.derangement(key, n)))
  drawn = np.asarray(draw(keys))
  np.testing.assert_array_equal(drawn, np.asarray(draw(keys)))  # one per key
  np.testing.assert_array_equal(np.sort(drawn, axis=1), np.tile(np.arange(n), (500, 1)))
  assert not np.any(drawn == np.arange(n))
  if n == 2:
    return
  # A single cycle through the batch, every one of the (n - 1)! drawn about equally often.
  cycles = set()
  for permutation in drawn:
    cycle, at = [0], int(permutation[0])
    while at != 0:
      cycle.append(at)
      at = int(permutation[at])
    assert len(cycle) == n
    cycles.add(tuple(cycle))
  if n <= 5:
    assert len(cycles) == len(list(itertools.permutations(range(1, n))))


def test_the_model_gives_sigmoid_codes_of_code_size_and_the_optional_pretext_head():
  for pretext_head in (False, True):
    config = tiny(exemplar3d, **{'exemplar3d.pretext_head': pretext_head})
    method = make_method(config)
    variables = jax.eval_shape(method.init, jax.random.key(0))
    assert ('pretext_head' in variables['params']) == pretext_head
    assert variables['params']['embedding']['kernel'].shape[1] == config.exemplar3d.code_size
  volumes = jnp.zeros((3, 16, 16, 16, 1))
  h, codes = jax.eval_shape(lambda v: method.model.apply(v, volumes, train=False), variables)
  assert h.shape == (3, config.model.unet3d.bottleneck) and codes.shape == (3, 16)


def test_config_checks_name_their_keys():
  for variant in (None, 'paper', 'tiny'):
    validate(exemplar3d.get_config(variant))
  with pytest.raises(ConfigError, match='train.batch_size'):
    validate(tiny(exemplar3d, **{'train.batch_size': 1}))
  with pytest.raises(ConfigError, match='model.backbone'):
    validate(tiny(exemplar3d, **{'model.backbone': 'resnet10'}))
  with pytest.raises(ConfigError, match=r'exemplar3d\.augment\.zoom_range'):
    validate(tiny(exemplar3d, **{'exemplar3d.augment.zoom_range': (0.0, 1.2)}))
  with pytest.raises(ConfigError, match=r'exemplar3d\.distance'):
    validate(tiny(exemplar3d, **{'exemplar3d.distance': 'cosine'}))


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """A 4-step exemplar3d run on the tiny phantom."""
  workdir = tmp_path_factory.mktemp('exemplar3d')
  run(tiny(exemplar3d, **CONSTANT, **{'train.num_steps': 4}), str(workdir))
  return workdir


def test_exemplar3d_logs_triplet_metrics_feeds_the_probe_and_exports_the_encoder(pretrained):
  log = metrics(pretrained)
  assert [m['step'] for m in log] == [1, 2, 3, 4]
  for m in log:
    assert m['triplet_loss'] == pytest.approx(m['loss'])
    assert 0 <= m['triplet_accuracy'] <= 1
    assert m['positive_distance'] >= 0 and m['negative_distance'] >= 0
    assert 0 <= m['probe_accuracy'] <= 1  # the unaugmented cubes' features reach the probe
  assert exported(pretrained)['params']


@pytest.mark.slow  # stateless: the loop's resume is checked by rotation3d and jigsaw3d
def test_exemplar3d_resume_equals_uninterrupted(pretrained, tmp_path):
  check_resume_equals_uninterrupted(exemplar3d, pretrained, tmp_path)


def test_exemplar3d_trains_on_a_labelled_nifti_folder(pretrained, tmp_path):
  # The phantom run's cube size, schedule and number of classes (the probe's): the same compiled
  # step (the compilation cache), so this run costs its data and steps only.
  (tmp_path / 'labels.csv').write_text('a,0\nb,1\nc,3\n')
  config = tiny(exemplar3d, **CONSTANT)
  config.data.update(format_fixtures.data_config(
      write_nifti_folder(tmp_path / 'scans'), labels_csv=str(tmp_path / 'labels.csv'),
      volume_size=config.data.volume_size, voxel_mm=1.5))
  assert make_source(config.data, 'train').num_classes == 4
  run(config, str(tmp_path / 'run'))
  log = metrics(tmp_path / 'run')
  assert [m['step'] for m in log] == [1, 2]
  assert all(np.isfinite(m['triplet_loss']) for m in log)
