"""3D CPC: the patch grid, the context and target sequences, both losses against plain loops, the
per-patch augmentation, the context's blindness to the rows it predicts (through the real model),
and the method trained by the loop (phantom with resume, a NIfTI folder)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cpc3d
from dsset.config_validation import ConfigError, validate
from dsset.methods import cpc3d as cpc
from dsset.methods import make_method
from tests.data_pipelines import format_fixtures
from tests.test_methods_3d import CONSTANT, exported, metrics, run, tiny, write_nifti_folder


@pytest.mark.parametrize('side, grid', [(8, 4), (12, 3)])
def test_the_patch_grid_assembles_back_into_the_volume(side, grid):
  volume = np.random.default_rng(side).integers(0, 256, (2, side, side, side, 1), np.uint8)
  patches = np.asarray(cpc.grid_patches(jnp.asarray(volume), grid))
  p = side // grid
  assert patches.shape == (2, grid ** 3, p, p, p, 1)
  assembled = np.zeros_like(volume)
  for i in range(grid):
    for j in range(grid):
      for k in range(grid):
        assembled[:, i * p:(i + 1) * p, j * p:(j + 1) * p, k * p:(k + 1) * p] = (
            patches[:, i * grid * grid + j * grid + k])
  np.testing.assert_array_equal(assembled, volume)


def flat(i, j, k, grid=4):
  return i * grid * grid + j * grid + k


def test_the_pyramid_context_and_targets_of_the_paper_grid():
  context = cpc.context_indices(4, 2, 'pyramid')
  targets = cpc.target_indices(4, 2, 2)
  assert context.shape == (16, 10) and targets.shape == (16, 2)
  # Interior column (1, 2): the 3 x 3 patches of row 0 around it, then its own patch of row 1.
  column = 1 * 4 + 2
  expected = [flat(0, j, k) for j in (0, 1, 2) for k in (1, 2, 3)] + [flat(1, 1, 2)]
  assert context[column].tolist() == expected
  # Corner column (0, 3): -1 mirrors to 1 and 4 to 2.
  column = 0 * 4 + 3
  expected = [flat(0, j, k) for j in (1, 0, 1) for k in (2, 3, 2)] + [flat(1, 0, 3)]
  assert context[column].tolist() == expected
  assert targets[column].tolist() == [flat(2, 0, 3), flat(3, 0, 3)]
  # Every context patch lies in rows 0..1, every target in rows 2..3 of its own column.
  assert (context // 16).max() == 1 and set((targets // 16).ravel()) == {2, 3}
  np.testing.assert_array_equal(targets % 16, np.repeat(np.arange(16)[:, None], 2, axis=1))


def test_wider_pyramids_and_the_column_context():
  context = cpc.context_indices(5, 3, 'pyramid')
  assert context.shape == (25, 25 + 9 + 1)
  # Column (0, 0): row 0 spans offsets -2..2, mirrored: 2 1 0 1 2.
  assert context[0, :5].tolist() == [flat(0, 2, k, 5) for k in (2, 1, 0, 1, 2)]
  assert context[0, -1] == flat(2, 0, 0, 5)
  column = cpc.context_indices(4, 3, 'column')
  assert column[6].tolist() == [flat(r, 1, 2) for r in range(3)]


def numpy_infonce(predictions, codes, positives):
  total, hits = 0.0, 0
  n, k, _ = predictions.shape
  for i in range(n):
    for s in range(k):
      scores = [float(np.dot(predictions[i, s].astype(np.float64), c)) for c in codes]
      top = max(scores)
      log_sum = top + np.log(sum(np.exp(x - top) for x in scores))
      total += log_sum - scores[positives[i, s]]
      hits += int(np.argmax(scores) == positives[i, s])
  return total / (n * k), hits / (n * k)


@pytest.mark.parametrize('n, k, m, d', [(3, 1, 7, 4), (6, 2, 20, 5)])
def test_infonce_matches_a_loop(n, k, m, d):
  rng = np.random.default_rng(n * k)
  predictions = rng.normal(size=(n, k, d)).astype(np.float32)
  codes = rng.normal(size=(m, d)).astype(np.float32)
  positives = rng.integers(0, m, (n, k))
  codes[positives[0, 0]] = 3 * predictions[0, 0]  # at least one clear hit
  loss, accuracy = jax.jit(cpc.infonce_loss)(predictions, codes, positives)
  expected_loss, expected_accuracy = numpy_infonce(predictions, codes, positives)
  assert float(loss) == pytest.approx(expected_loss, rel=1e-5)
  assert float(accuracy) == pytest.approx(expected_accuracy)


@pytest.mark.parametrize('n, k, d', [(2, 1, 3), (7, 2, 4)])
def test_binary_scoring_matches_a_loop(n, k, d):
  rng = np.random.default_rng(n)
  predictions = rng.normal(size=(n, k, d)).astype(np.float32)
  targets = rng.normal(size=(n, k, d)).astype(np.float32)
  negatives = np.asarray(jax.jit(cpc.draw_negative_columns, static_argnums=1)(jax.random.key(n), n))
  total, right = 0.0, 0
  for i in range(n):
    for other, label in ((i, 1), (negatives[i], 0)):
      score = sum(float(predictions[i, s, c]) * float(targets[other, s, c])
                  for s in range(k) for c in range(d)) / (k * d)
      probability = 1 / (1 + np.exp(-score))
      total -= np.log(probability) if label else np.log(1 - probability)
      right += int((score > 0) == bool(label))
  loss, accuracy = jax.jit(cpc.binary_loss)(predictions, targets, negatives)
  assert float(loss) == pytest.approx(total / (2 * n), rel=1e-5)
  assert float(accuracy) == pytest.approx(right / (2 * n))


def test_negative_columns_are_others_uniformly_and_keyed():
  draw = jax.jit(jax.vmap(lambda key: cpc.draw_negative_columns(key, 5)))
  draws = np.asarray(draw(jax.random.split(jax.random.key(0), 400)))
  assert np.all(draws != np.arange(5))
  for column in range(5):
    counts = np.bincount(draws[:, column], minlength=5)
    assert counts[column] == 0 and counts.min(initial=400, where=np.arange(5) != column) > 60
  np.testing.assert_array_equal(draw(jax.random.split(jax.random.key(0), 400)), draws)
  assert not np.array_equal(draw(jax.random.split(jax.random.key(1), 400)), draws)


@pytest.mark.parametrize('side, crop, starts', [(8, 7, (0, 1, 0)), (8, 5, (3, 0, 2)),
                                                (4, 4, (0, 0, 0))])
def test_crop_and_pad_matches_numpy(side, crop, starts):
  patch = np.random.default_rng(side).uniform(size=(side, side, side, 2)).astype(np.float32)
  box = patch[starts[0]:starts[0] + crop, starts[1]:starts[1] + crop, starts[2]:starts[2] + crop]
  low = (side - crop) // 2
  expected = np.pad(box, [(low, side - crop - low)] * 3 + [(0, 0)])
  got = jax.jit(cpc.crop_and_pad, static_argnums=2)(patch, np.asarray(starts), crop)
  np.testing.assert_array_equal(np.asarray(got), expected)


@pytest.mark.parametrize('flip_prob, crop_fraction', [(0.5, 1.0), (0.0, 7 / 8), (0.5, 7 / 8)])
def test_patch_augmentation_is_keyed_per_patch(flip_prob, crop_fraction):
  # Eight copies of one patch: any difference between them comes from their keys alone.
  patch = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 1), np.uint8)
  patches = jnp.asarray(np.broadcast_to(patch, (2, 4, 8, 8, 8, 1)))
  augment = jax.jit(lambda key: cpc.augment_patches(key, patches, flip_prob, crop_fraction))
  first, again, other = (np.asarray(augment(jax.random.key(seed))) for seed in (0, 0, 1))
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
  flat = first.reshape(8, -1)
  assert len({row.tobytes() for row in flat}) > 1  # the patches got different draws
  if crop_fraction == 1.0:  # flips only: each output is the patch or its mirror along axis 0
    source = patch.astype(np.float32) / 255
    for out in first.reshape(8, 8, 8, 8, 1):
      assert np.allclose(out, source) or np.allclose(out, source[::-1])


def test_the_context_never_sees_the_rows_it_predicts():
  # The tiny config has the paper's geometry: 4 x 4 x 4 patches, 2 context rows, 2 predicted.
  # The CPU fast path only rewrites convs; off, this one compile is cheaper.
  method = make_method(tiny(cpc3d, **{'model.cpu_fast_path': 'off'}))
  column = 1 * 4 + 2
  perturbations = [
      # Rows 2 and 3 are predicted: nothing the prediction is made from may move.
      [(2, 1, 2), (3, 1, 2), (2, 0, 0), (3, 3, 3)],
      # Row 1 outside the column is not in its pyramid either...
      [(1, 0, 2), (1, 1, 3)],
      # ... while row 0 beside it and its own row-1 patch are.
      [(0, 2, 3)],
      [(1, 1, 2)],
  ]
  volume = np.random.default_rng(0).uniform(size=(1, 16, 16, 16, 1)).astype(np.float32)
  patches = np.repeat(np.asarray(cpc.grid_patches(jnp.asarray(volume), 4)),
                      1 + len(perturbations), axis=0)
  for example, cells in enumerate(perturbations, start=1):
    for cell in cells:
      patches[example, flat(*cell)] += 1.0
  # Any non-zero weights show the wiring; drawn here, they cost no compile of the initialisers.
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map_with_path(
      lambda path, leaf: (np.ones if path[-1].key == 'var' else np.zeros)(leaf.shape, np.float32)
      if path[0].key == 'batch_stats' else rng.normal(0, 0.5, leaf.shape).astype(np.float32),
      jax.eval_shape(method.init, jax.random.key(0)))
  # Running averages (train=False): examples of a batch do not mix, so one call tries them all.
  out = jax.jit(lambda p: method.model.apply(variables, p, train=False))(jnp.asarray(patches))
  moved = {name: [not np.allclose(out[name][e, column], out[name][0, column], atol=1e-6)
                  for e in range(1, 1 + len(perturbations))]
           for name in ('context', 'predictions')}
  assert moved == {'context': [False, False, True, True],
                   'predictions': [False, False, True, True]}
  for example, cells in enumerate(perturbations, start=1):  # every perturbation reached a code
    for cell in cells:
      assert not np.allclose(out['codes'][example, flat(*cell)], out['codes'][0, flat(*cell)])


def test_geometry_errors_name_their_keys():
  with pytest.raises(ConfigError, match='cpc3d.grid'):
    validate(tiny(cpc3d, **{'data.volume_size': 20}))  # 5^3 patches: not a multiple of 4
  with pytest.raises(ConfigError, match='cpc3d.prediction_steps'):
    validate(tiny(cpc3d, **{'cpc3d.prediction_steps': 3}))
  with pytest.raises(ConfigError, match='cpc3d.loss'):
    validate(tiny(cpc3d, **{'cpc3d.loss': 'nce'}))
  with pytest.raises(ConfigError, match='model.backbone'):
    validate(tiny(cpc3d, **{'model.backbone': 'resnet10'}))


# The loop runs: a constant learning rate (tests.test_methods_3d) and the CPU fast path off, which
# only rewrites the encoder's convs (tests/models) and would double the step's compile time.
LOOP = {**CONSTANT, 'model.cpu_fast_path': 'off'}


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """A 4-step cpc3d run on the tiny phantom."""
  workdir = tmp_path_factory.mktemp('cpc3d')
  run(tiny(cpc3d, **LOOP, **{'train.num_steps': 4}), str(workdir))
  return workdir


def test_cpc3d_logs_its_metrics_and_exports_the_3d_encoder(pretrained):
  log = metrics(pretrained)
  assert [m['step'] for m in log] == [1, 2, 3, 4]
  for m in log:
    assert np.isfinite(m['cpc_loss']) and 0 <= m['cpc_accuracy'] <= 1
  assert set(exported(pretrained)['params']) == {f'ConvBlock3D_{i}' for i in range(3)}


@pytest.mark.slow  # stateless: the loop's resume is checked by rotation3d and jigsaw3d
def test_cpc3d_resume_equals_uninterrupted(pretrained, tmp_path):
  config = tiny(cpc3d, **LOOP)
  run(config, str(tmp_path))
  config.train.num_steps = 4
  run(config, str(tmp_path))
  assert [m['step'] for m in metrics(tmp_path)] == [1, 2, 3, 4]
  np.testing.assert_allclose([m['loss'] for m in metrics(tmp_path)],
                             [m['loss'] for m in metrics(pretrained)], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               exported(tmp_path), exported(pretrained))


@pytest.mark.slow
def test_cpc3d_binary_trains_on_a_nifti_folder(tmp_path):
  config = tiny(cpc3d, **{'data.voxel_mm': 1.5, 'cpc3d.loss': 'binary'})
  config.data.update(format_fixtures.data_config(write_nifti_folder(tmp_path / 'scans')))
  config.monitor.enabled = False
  config.train.batch_size = 2
  run(config, str(tmp_path / 'run'))
  log = metrics(tmp_path / 'run')
  assert [m['step'] for m in log] == [1, 2]
  assert all(np.isfinite(m['cpc_loss']) for m in log)
