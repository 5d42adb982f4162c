"""The 3D methods end to end through the one loop: rotation3d pretraining (phantom and a NIfTI
folder, resume), segment3d and the 3D linear probe from its export, and their pieces."""

import json
import os

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import linear_eval3d, rotation3d, segment3d
from data_pipelines import volumes
from data_pipelines.sources import make_source
from dsset import parallel, train
from dsset.config_validation import ConfigError, validate
from dsset.evaluate import segment
from dsset.methods import make_method
from dsset.methods import segment3d as segment3d_method
from tests.data_pipelines import format_fixtures


def tiny(module, **keys):
  config = module.get_config('tiny')
  config.train.num_steps = 2
  for key, value in keys.items():
    node = config
    *parents, leaf = key.split('.')
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def run(config, workdir):
  """One device: the 8-device sharding of the loop is tested with the 2D methods."""
  return train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])


def metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def exported(workdir):
  with open(os.path.join(workdir, 'backbone.msgpack'), 'rb') as f:
    return flax.serialization.msgpack_restore(f.read())


# A constant learning rate keeps the schedule independent of num_steps, so a resumed run can only
# differ from an uninterrupted one through the resume itself.
CONSTANT = {'train.schedule': 'constant', 'train.warmup_steps': 0}


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """A 4-step rotation3d run on the tiny phantom (its export feeds the downstream tests)."""
  workdir = tmp_path_factory.mktemp('rotation3d')
  run(tiny(rotation3d, **CONSTANT, **{'train.num_steps': 4}), str(workdir))
  return workdir


def test_rotation3d_logs_its_metrics_and_exports_the_3d_encoder(pretrained):
  log = metrics(pretrained)
  assert [m['step'] for m in log] == [1, 2, 3, 4]
  for m in log:
    assert np.isfinite(m['rotation_loss']) and 0 <= m['rotation_accuracy'] <= 1
  with open(pretrained / 'backbone.json') as f:
    assert json.load(f)['model']['backbone'] == 'unet3d'
  assert exported(pretrained)['params']  # the encoder's variables, for init_from


def check_resume_equals_uninterrupted(config_module, uninterrupted, workdir):
  """Two steps of the module's tiny config (CONSTANT), then a resume to four in workdir: the
  losses and the export equal those of the uninterrupted 4-step run in `uninterrupted`."""
  config = tiny(config_module, **CONSTANT)
  run(config, str(workdir))
  config.train.num_steps = 4
  run(config, str(workdir))
  assert [m['step'] for m in metrics(workdir)] == [1, 2, 3, 4]
  np.testing.assert_allclose([m['loss'] for m in metrics(workdir)],
                             [m['loss'] for m in metrics(uninterrupted)], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               exported(workdir), exported(uninterrupted))


def test_rotation3d_resume_equals_uninterrupted(pretrained, tmp_path):
  check_resume_equals_uninterrupted(rotation3d, pretrained, tmp_path)


def write_nifti_folder(folder):
  folder.mkdir()
  rng = np.random.default_rng(0)
  for name in ('a', 'b', 'c'):
    format_fixtures.write_nifti(str(folder / f'{name}.nii.gz'),
                                rng.normal(0, 300, (20, 14, 9)).astype(np.float32))
  return folder


def test_volume_sampler_reads_a_nifti_folder_at_isotropic_voxels(tmp_path):
  folder = write_nifti_folder(tmp_path / 'scans')
  source = make_source(format_fixtures.data_config(folder), 'train')
  sampler = volumes.VolumeSampler(source, 16, voxel_mm=1.5)
  example = sampler.random_map(1, np.random.default_rng(0))
  assert example['volume'].shape == (16, 16, 16, 1) and example['volume'].dtype == np.uint8
  scan = source[1]
  steps = volumes.axis_steps(scan.spacing, 1.5)
  np.testing.assert_allclose(steps * np.asarray(scan.spacing), 1.5)


@pytest.mark.slow
def test_rotation3d_trains_on_a_nifti_folder(tmp_path):
  config = tiny(rotation3d)
  # data_config is base's whole data section: the cube size and voxel size go through it, or
  # the update would put back base's 32^3 at the scans' own voxels.
  config.data.update(format_fixtures.data_config(write_nifti_folder(tmp_path / 'scans'),
                                                 volume_size=16, voxel_mm=1.5))
  config.monitor.enabled = False
  config.train.batch_size = 2
  run(config, str(tmp_path / 'run'))
  assert [m['step'] for m in metrics(tmp_path / 'run')] == [1, 2]


def test_segment3d_from_the_pretrained_encoder_writes_dice_and_plots(pretrained, tmp_path):
  # No frozen phase: one compiled step (the frozen phase has its own test).
  config = tiny(segment3d, init_from=str(pretrained), **{'evaluate.label_fraction': 0.5,
                                                          'evaluate.segment_freeze_steps': 0})
  result = run(config, str(tmp_path))
  with open(tmp_path / 'eval.json') as f:
    written = json.load(f)
  assert written == result
  assert set(written['dice_per_class']) == {'1', '2', '3', '4', '5'}  # phantom mask ids
  assert 0 <= written['dice_mean'] <= 1
  assert (written['kind'], written['method'], written['label_fraction']) == (
      'segment3d', 'rotation3d', 0.5)
  assert written['num_examples'] == {'train': 4, 'test': 4}  # half of 8 train scans; 4 test
  for name in segment3d_method.PLOT_FILES.values():
    assert os.path.getsize(tmp_path / name) > 1000


def test_segment3d_starts_from_the_export_and_keeps_it_frozen(pretrained, tmp_path):
  # segment_freeze_steps = 1 of :tiny and one step: the encoder must come out as it went in.
  config = tiny(segment3d, init_from=str(pretrained), **{'train.num_steps': 1})
  method = make_method(config)
  tuned = train._train(config, method, str(tmp_path), parallel.make_mesh(jax.devices()[:1]),
                       method.make_train_iterator())
  encoder = exported(pretrained)
  jax.tree.map(np.testing.assert_array_equal, tuned['params']['backbone'], encoder['params'])
  jax.tree.map(np.testing.assert_array_equal, tuned['batch_stats']['backbone'],
               encoder['batch_stats'])


def test_linear_eval3d_random_init_reports_scan_level_results(tmp_path):
  result = run(tiny(linear_eval3d), str(tmp_path))
  assert result['level'] == 'scan' and result['method'] == 'random init'
  assert result['num_features'] == 16  # the tiny bottleneck
  assert result['num_examples']['test'] == 4
  assert 0 <= result['accuracy'] <= 1


def test_linear_eval3d_rejects_slice_level(tmp_path):
  with pytest.raises(ConfigError, match='evaluate.level'):
    run(tiny(linear_eval3d, **{'evaluate.level': 'slice'}), str(tmp_path))


def test_2d_and_3d_encoders_are_not_mixed(tmp_path):
  with pytest.raises(ConfigError, match='model.backbone'):
    validate(tiny(rotation3d, **{'model.backbone': 'resnet10'}))
  with pytest.raises(ConfigError, match='model.backbone'):
    validate(tiny(segment3d, **{'model.backbone': 'resnet10'}))


def test_label_fractions_are_reproducible_and_stratified():
  source = make_source(tiny(segment3d).data, 'train')
  labels = np.array([source[i].label for i in range(len(source))])
  first = segment3d_method.labelled_subset(source, 0.5, seed=0)
  np.testing.assert_array_equal(first, segment3d_method.labelled_subset(source, 0.5, seed=0))
  # Half of each class's scans (the tiny phantom's train split has two per class).
  np.testing.assert_array_equal(np.bincount(labels[first], minlength=4),
                                np.bincount(labels, minlength=4) // 2)
  others = [segment3d_method.labelled_subset(source, 0.5, seed=s) for s in range(1, 6)]
  assert any(not np.array_equal(first, o) for o in others)
  np.testing.assert_array_equal(segment3d_method.labelled_subset(source, 1.0, 0),
                                np.arange(len(source)))


def test_soft_dice_on_volumes_matches_a_numpy_loop():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 4, 5, 4)).astype(np.float32)
  target = rng.integers(0, 3, (2, 3, 4, 5))  # class 3 absent: left out of the mean
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  per_class = []
  for c in range(4):
    truth = (target == c).astype(np.float64)
    if truth.sum() == 0:
      continue
    per_class.append(2 * (probs[..., c] * truth).sum() / (probs[..., c].sum() + truth.sum()))
  expected = 1 - np.mean(per_class)
  got = float(segment.soft_dice_loss(jnp.asarray(logits), jnp.asarray(target), 4))
  assert got == pytest.approx(expected, rel=1e-5)
