"""End-to-end tests of the training loop on tiny phantoms (8 fake CPU devices from conftest)."""

import json
import os

import jax
import numpy as np
import pytest

import configs.deepset
import configs.perscan
import configs.rotation3d
import configs.simclr
from data_pipelines import samplers
from data_pipelines.sources import make_source
from dsset import optim, train
from dsset.methods import make_method, pretraining
from data_pipelines.errors import DataError
from dsset.config_validation import ConfigError, validate

CONFIG_FILES = {'simclr': configs.simclr, 'perscan': configs.perscan, 'deepset': configs.deepset}


def tiny_config(method: str, **overrides):
  """The method's config file with its :tiny variant (seconds on 2 CPU cores), 2 steps."""
  c = CONFIG_FILES[method].get_config('tiny')
  c.train.num_steps = 2
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


# The loss, its sharding and the per-view BatchNorm are the same code for the three samplers:
# simclr (the cheapest compile, 8 devices x separate views) runs by default, the other two with
# -m slow (deepset's sets and masks took 44 s here).
@pytest.mark.parametrize('method', ['simclr', pytest.param('perscan', marks=pytest.mark.slow),
                                    pytest.param('deepset', marks=pytest.mark.slow)])
def test_eight_devices_match_one(method, tmp_path):
  """The loss is written over the global batch: sharding it over 8 devices changes nothing."""
  assert len(jax.devices()) == 8
  config = tiny_config(method)
  one = tmp_path / 'one'
  eight = tmp_path / 'eight'
  train.train_and_evaluate(config, str(one), devices=jax.devices()[:1])
  train.train_and_evaluate(config, str(eight))
  losses_one = [m['loss'] for m in read_metrics(one)]
  losses_eight = [m['loss'] for m in read_metrics(eight)]
  assert [m['step'] for m in read_metrics(one)] == [1, 2]
  # Same numbers up to float32 reduction order across devices (observed differences ~1e-6).
  np.testing.assert_allclose(losses_eight, losses_one, rtol=1e-4, atol=1e-5)


def _final_params(workdir):
  with open(os.path.join(workdir, 'backbone.msgpack'), 'rb') as f:
    import flax.serialization
    return flax.serialization.msgpack_restore(f.read())


# -m slow: the SIGTERM test (tests/reliability/test_training_faults.py) checks resume == uninterrupted
# by default; this is the same equality without a signal.
@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path):
  """4 steps, then a second run to 8, gives the parameters of 8 uninterrupted steps.

  A constant learning rate keeps the schedule independent of num_steps, so the only thing that can
  make the two runs differ is the resume itself (state, rng, data iterator position).
  """
  config = tiny_config('deepset', **{'train.num_steps': 4, 'train.schedule': 'constant',
                                      'train.warmup_steps': 0})
  split = tmp_path / 'split'
  whole = tmp_path / 'whole'
  train.train_and_evaluate(config, str(split))
  config.train.num_steps = 8
  train.train_and_evaluate(config, str(split))
  train.train_and_evaluate(config, str(whole))
  split_log, whole_log = read_metrics(split), read_metrics(whole)
  assert [m['step'] for m in split_log] == list(range(1, 9)), 'steps 5-8 logged once each'
  np.testing.assert_allclose([m['loss'] for m in split_log], [m['loss'] for m in whole_log],
                             rtol=1e-5)
  a, b = _final_params(split), _final_params(whole)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)


def test_steps_from_epochs_round_each_epoch_up_and_say_so():
  c = configs.deepset.get_config('paper').train  # batch 32, 100 epochs, 1 of warm-up
  said = optim.steps_from_epochs(c, 1234, 'slices')
  assert (c.num_steps, c.warmup_steps) == (100 * 39, 39)
  assert said == ('train.num_epochs=100 x 1234 slices / batch 32 = 3900 steps (39 per epoch); '
                  'train.warmup_epochs=1 = 39 steps')
  c.num_epochs, c.num_steps, c.warmup_epochs = 0, 7, 2
  optim.steps_from_epochs(c, 64, 'scans')
  assert (c.num_steps, c.warmup_steps) == (7, 4)


def test_an_epoch_is_every_train_slice_in_2d_and_every_scan_in_3d():
  for config in (tiny_config('perscan'), tiny_config('deepset'),
                 configs.rotation3d.get_config('tiny')):
    method = make_method(config)
    method.make_train_iterator()
    source = make_source(config.data, 'train')
    expected = ((len(source), 'scans') if config.method == 'rotation3d'
                else (samplers.slice_counts(source).sum(), 'slices'))
    assert method.epoch_records() == expected


def test_num_epochs_become_steps_before_training_and_again_on_resume(tmp_path, monkeypatch,
                                                                    capfd):
  # 12 scans of 8 slices: 4 train scans, 32 slices, 4 steps of 8 an epoch.
  config = tiny_config('deepset', **{'train.num_epochs': 2, 'train.warmup_epochs': 1,
                                     'data.phantom.num_scans': 12, 'data.phantom.depth': 8})

  class Stopped(Exception):
    pass

  def stop_before_training(config, method, workdir, mesh, train_iter):
    raise Stopped(config.train.num_steps, config.train.warmup_steps)

  monkeypatch.setattr(train, '_train', stop_before_training)
  for _ in range(2):  # a second run on the workdir (a resume) converts the same data alike
    config.train.num_steps, config.train.warmup_steps = 1, 0  # both replaced by the epochs
    with pytest.raises(Stopped) as stopped:
      train.train_and_evaluate(config, str(tmp_path))
    assert stopped.value.args == (8, 4)
    with open(tmp_path / 'config.json') as f:
      assert json.load(f)['train']['num_steps'] == 8
  assert ('train.num_epochs=2 x 32 slices / batch 8 = 8 steps (4 per epoch); '
          'train.warmup_epochs=1 = 4 steps') in capfd.readouterr().err


def test_bad_config_value_names_the_key():
  config = tiny_config('deepset', **{'data.window': 1.5})
  with pytest.raises(ConfigError, match=r'data\.window=1\.5'):
    validate(config)
  config = tiny_config('simclr', **{'data.set_size': 3})
  with pytest.raises(ConfigError, match=r'data\.set_size'):
    validate(config)


def test_unwritable_workdir_is_reported_before_training(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a folder')
  with pytest.raises(ConfigError, match='not a writable folder'):
    train.train_and_evaluate(tiny_config('simclr'), str(blocker / 'run'), devices=jax.devices()[:1])


def test_train_split_source_is_built_once(tmp_path, monkeypatch):
  # Building a NIfTI or DICOM folder's source reads every header: the loop and the pipeline share
  # one source.
  import data_pipelines.sources as sources
  calls = []
  real = sources.make_source

  def counting(data_config, split):
    calls.append(split)
    return real(data_config, split)

  monkeypatch.setattr(sources, 'make_source', counting)
  monkeypatch.setattr(pretraining, 'make_source', counting)
  train.train_and_evaluate(tiny_config('simclr', **{'train.num_steps': 1}), str(tmp_path),
                           devices=jax.devices()[:1])
  assert calls.count('train') == 1


def test_bad_data_path_leaves_no_workdir(tmp_path):
  config = tiny_config('simclr', **{'data.source': 'nifti', 'data.path': str(tmp_path / 'none')})
  with pytest.raises(DataError, match='none'):
    train.train_and_evaluate(config, str(tmp_path / 'run'), devices=jax.devices()[:1])
  assert not (tmp_path / 'run').exists(), 'nothing is written before the data is read'
