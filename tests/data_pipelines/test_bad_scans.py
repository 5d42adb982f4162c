"""Scans found bad only when decoded during training follow data.on_bad_scan in the samplers.

'skip': the example is replaced by the next readable scan (deterministically, with the record's
generator), flagged replaced=1, and the file is named once per process; 'stop': the DataError naming
the file stops the run.
"""

import json
import logging
import os
import pickle

import nibabel as nib
import numpy as np
import pytest

import configs.simclr
from configs import base
from data_pipelines import pipeline, samplers
from data_pipelines.errors import DataError
from data_pipelines.sources import nifti
from data_pipelines.sources.base import Scan

LENGTHS = [6, 8, 5, 7]
K = 3


def bad_file(index):
  return f'/scans/train/scan{index}.nii.gz'


class BrokenVolume:
  """A volume whose voxels fail to decode when its slices are read (after the sampler drew them)."""

  def __init__(self, index, num_slices, size):
    self.index = index
    self.shape = (num_slices, size, size)

  def __getitem__(self, item):
    raise DataError(f'{bad_file(self.index)}: cannot decode voxels (EOFError: truncated)')


class FaultySource:
  """CountingSource of test_samplers (slice k of every scan holds (k + 1) / 255) whose scans in
  `bad` raise DataError naming their file when decoded (source[i]) and whose scans in
  `bad_volume` raise it when their slices are read; reads counts the decode attempts."""

  num_classes = 0

  def __init__(self, lengths=LENGTHS, bad=(), bad_volume=(), size=6):
    self.lengths = list(lengths)
    self.bad = set(bad)
    self.bad_volume = set(bad_volume)
    self.size = size
    self.reads = [0] * len(self.lengths)

  def __len__(self):
    return len(self.lengths)

  @property
  def slice_counts(self):
    return np.asarray(self.lengths)  # known from headers, as NIfTI's source knows them

  def __getitem__(self, index):
    self.reads[index] += 1
    if index in self.bad:
      raise DataError(f'{bad_file(index)}: 36 voxels are NaN or infinite')
    n = self.lengths[index]
    if index in self.bad_volume:
      volume = BrokenVolume(index, n, self.size)
    else:
      values = (np.arange(n, dtype=np.float32) + 1) / 255
      volume = np.broadcast_to(values[:, None, None], (n, self.size, self.size)).copy()
    return Scan(volume=volume, spacing=(1.0, 1.0, 1.0), scan_id=f'scan{index}.nii.gz',
                label=index)


def make_sampler(kind, source, on_bad_scan='skip'):
  if kind == 'simclr':
    return samplers.SimclrSampler(source, image_size=4, channels=1, on_bad_scan=on_bad_scan)
  if kind == 'perscan':
    return samplers.PerScanSampler(source, image_size=4, channels=1, omega=0.5,
                                   on_bad_scan=on_bad_scan)
  return samplers.DeepSetSampler(source, image_size=4, channels=1, omega=0.5, set_size=K,
                                 on_bad_scan=on_bad_scan)


def sample(sampler, record, seed=0):
  if isinstance(sampler, samplers.SimclrSampler):
    return sampler.map(record)
  return sampler.random_map(record, np.random.default_rng([seed, record]))


def records_of(sampler, scan):
  """The records whose own scan is `scan`."""
  if isinstance(sampler, samplers.SimclrSampler):
    return [r for r in range(sampler.num_records) if sampler.locate(r)[0] == scan]
  return [scan]


def chosen_slices(example):
  views, mask = example['views'], example['mask']
  return [[int(views[v, j, 0, 0, 0]) - 1 for j in range(views.shape[1]) if mask[v, j]]
          for v in range(2)]


def assert_same(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


KINDS = ['simclr', 'perscan', 'deepset']


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('fault', ['decode', 'slices'])
def test_skip_replaces_bad_scans_by_the_next_readable_one(kind, fault):
  faults = {'bad': {1}} if fault == 'decode' else {'bad_volume': {1}}
  sampler = make_sampler(kind, FaultySource(**faults))
  clean = make_sampler(kind, FaultySource())
  k = K if kind == 'deepset' else 1
  for record in range(sampler.num_records):
    example = sample(sampler, record, seed=7)
    assert example['views'].shape == (2, k, 4, 4, 1) and example['mask'].all()  # full examples
    assert example['replaced'].dtype == np.int32 and example['replaced'].shape == ()
    scan = sampler.locate(record)[0] if kind == 'simclr' else record
    assert example['replaced'] == (scan == 1)
    if scan != 1:
      assert_same(example, {**sample(clean, record, seed=7)})
      continue
    # The substitute is scan 2, drawn with the record's generator in its original state: exactly
    # what scan 2 gives with the same generator (simclr: the same slice position, modulo 5).
    assert example['scan_id'] == 2 and example['label'] == 2
    if kind == 'simclr':
      position = sampler.locate(record)[1]
      assert chosen_slices(example) == [[position % LENGTHS[2]]] * 2
    else:
      substitute = clean.random_map(2, np.random.default_rng([7, record]))
      np.testing.assert_array_equal(example['views'], substitute['views'])
      assert substitute['replaced'] == 0


@pytest.mark.parametrize('kind', KINDS)
def test_same_record_and_rng_give_the_same_substitute(kind):
  source = FaultySource(bad_volume={1}, bad={2})
  first = make_sampler(kind, source)
  record = records_of(first, 1)[-1]
  once = sample(first, record, seed=3)
  twice = sample(first, record, seed=3)  # the bad scans are known now: not decoded again
  fresh = sample(make_sampler(kind, FaultySource(bad_volume={1}, bad={2})), record, seed=3)
  assert once['replaced'] == 1 and once['scan_id'] == 3  # 1 and 2 are bad: scan 3 replaces
  assert_same(once, twice)
  assert_same(once, fresh)
  reads = list(source.reads)
  for _ in range(5):
    sample(first, record, seed=3)
  assert source.reads[1:3] == reads[1:3], 'a scan found bad is not decoded again'


@pytest.mark.parametrize('kind', KINDS)
def test_replacement_wraps_around_to_the_first_scan(kind):
  sampler = make_sampler(kind, FaultySource(bad={3}))
  example = sample(sampler, records_of(sampler, 3)[0])
  assert example['scan_id'] == 0 and example['replaced'] == 1


@pytest.mark.parametrize('kind', KINDS)
def test_bad_file_is_named_once_however_often_it_is_drawn(kind, caplog):
  caplog.set_level(logging.WARNING)
  sampler = make_sampler(kind, FaultySource(bad={2}))
  records = records_of(sampler, 2)
  for seed in range(20):
    for record in records:
      assert sample(sampler, record, seed)['replaced'] == 1
  named = [r for r in caplog.records if bad_file(2) in r.getMessage()]
  assert len(named) == 1
  message = named[0].getMessage()
  assert 'NaN or infinite' in message and 'skipping' in message and '\n' not in message
  assert sampler.bad_scans == {2: f'{bad_file(2)}: 36 voxels are NaN or infinite'}


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('fault', ['decode', 'slices'])
def test_stop_raises_the_error_naming_the_file(kind, fault):
  faults = {'bad': {1}} if fault == 'decode' else {'bad_volume': {1}}
  sampler = make_sampler(kind, FaultySource(**faults), on_bad_scan='stop')
  assert sample(sampler, records_of(sampler, 0)[0])['replaced'] == 0
  with pytest.raises(DataError, match=bad_file(1)):
    sample(sampler, records_of(sampler, 1)[0])


@pytest.mark.parametrize('kind', KINDS)
def test_no_readable_scan_at_all_names_the_files(kind):
  sampler = make_sampler(kind, FaultySource(bad={0, 1, 2}, bad_volume={3}))
  with pytest.raises(DataError, match='no training scan can be read') as error:
    sample(sampler, 0)
  for index in range(3):
    assert bad_file(index) in str(error.value)
  assert '1 more' in str(error.value)


def test_unknown_policy_is_named():
  with pytest.raises(DataError, match='data.on_bad_scan'):
    make_sampler('perscan', FaultySource(), on_bad_scan='ignore')


def test_sampler_pickles_after_finding_a_bad_scan(caplog):
  """Grain worker processes get a pickled sampler: each finds and names bad scans itself."""
  caplog.set_level(logging.WARNING)
  sampler = make_sampler('deepset', FaultySource(bad={1}))
  expected = sample(sampler, 1)
  copy = pickle.loads(pickle.dumps(sampler))
  assert copy.bad_scans == {}
  assert_same(sample(copy, 1), expected)
  assert sum(bad_file(1) in r.getMessage() for r in caplog.records) == 2


@pytest.mark.parametrize('kind', KINDS)
def test_batches_carry_replaced_and_repeat_after_restore(kind):
  config = base.get_config()
  config.method = kind
  config.train.batch_size = 4
  source = FaultySource(bad={1})
  make = lambda: pipeline.make_train_iterator(config, make_sampler(kind, source),  # noqa: E731
                                              process_index=0, process_count=1)
  iterator = make()
  batches = [next(iterator) for _ in range(4)]
  replaced = np.concatenate([b['replaced'] for b in batches])
  assert batches[0]['replaced'].shape == (4,) and batches[0]['replaced'].dtype == np.int32
  scans = np.concatenate([b['scan_id'] for b in batches])
  assert replaced.any() and not (scans == 1).any()
  iterator = make()
  next(iterator)
  state = iterator.get_state()
  resumed = make()
  resumed.set_state(json.loads(json.dumps(state)))
  for batch in batches[1:]:
    assert_same(next(resumed), batch)


def _save(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))


@pytest.mark.slow  # 23 s; the sampler tests above check the skipping itself by default
def test_all_nan_nifti_in_train_is_skipped_by_a_training_run(tmp_path, caplog):
  """A NIfTI folder whose train/ holds an all-NaN scan trains to the end under 'skip'.

  The NIfTI source reads only headers when it is built, so the NaN scan is listed as usable and
  found bad only when the sampler first decodes it.
  """
  root = tmp_path / 'scans'
  rng = np.random.default_rng(0)
  for i in range(3):
    _save(root / 'train' / f'good{i}.nii.gz',
          rng.integers(-1000, 1000, size=(12, 12, 4)).astype(np.int16))
  _save(root / 'train' / 'allnan.nii.gz', np.full((12, 12, 4), np.nan, np.float32))
  config = configs.simclr.get_config('tiny')
  config.data.source = 'nifti'
  config.data.path = str(root)
  config.data.intensity = 'minmax'
  config.train.num_steps = 3
  source = nifti.make_source(config.data, 'train')
  assert len(source) == 4 and not source.skipped  # listing did not catch it
  caplog.set_level(logging.WARNING)

  import jax  # pylint: disable=import-outside-toplevel
  from dsset import train  # JAX only for this test
  workdir = tmp_path / 'run'
  # 3 steps of 8 > the 16 slices: all are drawn.
  train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
  assert (workdir / 'backbone.msgpack').exists()
  named = [r.getMessage() for r in caplog.records if 'allnan.nii.gz' in r.getMessage()]
  assert len(named) == 1 and 'voxels are NaN or infinite' in named[0]
  with open(workdir / 'metrics.jsonl') as f:
    metrics = [json.loads(line) for line in f]
  assert [m['step'] for m in metrics if 'loss' in m][-1] == 3
  # The loop's running count of substitutes: every drawn record of the NaN scan's 4 slices, among
  # the 24 stream positions of 3 batches of 8 (the pipeline's seeded epoch order).
  bad = [e.scan_id for e in source.entries].index('allnan.nii.gz')
  shuffle = pipeline.EpochShuffle(16, int(config.seed))
  drawn = [shuffle.map_with_index(position, position) for position in range(24)]
  expected = sum(bad * 4 <= record < bad * 4 + 4 for record in drawn)
  assert expected >= 4
  assert metrics[-1]['skipped_examples'] == expected

  config.data.on_bad_scan = 'stop'
  with pytest.raises(DataError, match='allnan.nii.gz: 576 voxels are NaN or infinite'):
    train.train_and_evaluate(config, str(tmp_path / 'stopped'), devices=jax.devices()[:1])
