"""The phantom is deterministic, cheap, balanced, and its classes differ the way docs/data.md says."""

import time

import numpy as np
import pytest

from configs import base
from data_pipelines import sources
from data_pipelines.errors import DataError
from data_pipelines.sources import phantom

OBJECT = phantom.MASK_IDS['object']


def data_config(**phantom_keys):
  config = base.get_config().data
  config.phantom.update(phantom_keys)
  return config


def test_same_seed_same_scans_other_seed_other_scans():
  first = phantom.make_source(data_config(), 'train')[3]
  again = sources.make_source(data_config(), 'train')[3]
  np.testing.assert_array_equal(first.volume, again.volume)
  np.testing.assert_array_equal(first.mask, again.mask)
  other = phantom.make_source(data_config(seed=1), 'train')[3]
  assert not np.array_equal(first.volume, other.volume)


def test_scan_contract_and_configurable_shape():
  scan = phantom.make_source(data_config(depth=12, height=40, width=24), 'val')[0]
  assert scan.volume.shape == scan.mask.shape == (12, 40, 24)
  assert scan.volume.dtype == np.float32
  assert 0.0 <= scan.volume.min() and scan.volume.max() <= 1.0
  assert set(np.unique(scan.mask)) <= {0, *phantom.MASK_IDS.values()}
  assert scan.spacing == (160.0 / 12, 320.0 / 40, 320.0 / 24)


def test_generating_a_default_scan_takes_milliseconds():
  source = phantom.make_source(data_config(), 'train')
  source[0]
  start = time.perf_counter()
  for i in range(10):
    source[i]
  assert (time.perf_counter() - start) / 10 < 0.05


def test_splits_are_disjoint_complete_and_balanced():
  config = data_config()
  names = {}
  for split in ('train', 'val', 'test'):
    source = phantom.make_source(config, split)
    labels = [source[i].label for i in range(len(source))]
    assert np.bincount(labels, minlength=4).tolist() == [len(source) // 4] * 4
    names[split] = {source[i].scan_id for i in range(len(source))}
  assert sum(map(len, names.values())) == len(set().union(*names.values())) == 48
  assert (len(names['train']), len(names['val']), len(names['test'])) == (32, 8, 8)


def _scan_ids(config, split):
  source = phantom.make_source(config, split)
  return [source[i].scan_id for i in range(len(source))], [source[i].label for i in range(len(source))]


def test_extra_eval_scans_grow_val_and_test_but_leave_train_alone():
  before = {split: _scan_ids(data_config(num_scans=16), split) for split in ('train', 'val', 'test')}
  after = {split: _scan_ids(data_config(num_scans=16, extra_eval_scans=16), split)
           for split in ('train', 'val', 'test')}
  assert after['train'] == before['train']
  for split in ('val', 'test'):
    ids, labels = after[split]
    assert ids[:len(before[split][0])] == before[split][0]  # the regular scans come first
    added = ids[len(before[split][0]):]
    assert len(added) == 8 and all(int(name.split('_')[1]) >= 16 for name in added)
    assert np.bincount(labels, minlength=4).tolist() == [len(labels) // 4] * 4
  assert not set(after['val'][0]) & set(after['test'][0])


@pytest.mark.parametrize('extra', [-8, 4, 12])
def test_extra_eval_scans_must_be_whole_balanced_blocks(extra):
  with pytest.raises(DataError, match='data.phantom.extra_eval_scans'):
    phantom.make_source(data_config(extra_eval_scans=extra), 'test')


def test_extra_train_scans_grow_train_only_with_scans_no_other_split_has():
  before = {split: _scan_ids(data_config(num_scans=16, extra_eval_scans=16), split)
            for split in ('train', 'val', 'test')}
  after = {split: _scan_ids(data_config(num_scans=16, extra_eval_scans=16, extra_train_scans=12),
                            split) for split in ('train', 'val', 'test')}
  assert after['val'] == before['val'] and after['test'] == before['test']
  ids, labels = after['train']
  assert ids[:len(before['train'][0])] == before['train'][0]
  added = ids[len(before['train'][0]):]
  # Numbered after the regular scans and the held-out ones, so neither moves.
  assert sorted(int(name.split('_')[1]) for name in added) == list(range(32, 44))
  assert np.bincount(labels, minlength=4).tolist() == [len(labels) // 4] * 4


@pytest.mark.parametrize('extra', [-4, 2, 6])
def test_extra_train_scans_must_be_whole_balanced_blocks(extra):
  with pytest.raises(DataError, match='data.phantom.extra_train_scans'):
    phantom.make_source(data_config(extra_train_scans=extra), 'train')


def test_too_few_scans_for_the_fractions_is_a_config_error():
  with pytest.raises(DataError, match='data.phantom.num_scans'):
    phantom.make_source(data_config(num_scans=8), 'train')


def test_depth_below_min_slices_is_an_error_rather_than_no_scans():
  config = data_config(depth=8)
  config.min_slices = 9
  with pytest.raises(DataError, match=r'data\.phantom\.depth=8 is below data\.min_slices=9'):
    phantom.make_source(config, 'train')
  config.min_slices = 8
  assert len(phantom.make_source(config, 'train'))


def test_tissues_keep_distinct_greys_in_the_default_window():
  scan = phantom.make_source(data_config(), 'train')[0]
  means = [scan.volume[scan.mask == i].mean() for i in phantom.MASK_IDS.values()]
  assert min(np.diff(sorted(means))) > 0.02


def object_areas(scan):
  return (scan.mask == OBJECT).sum(axis=(1, 2))


def test_classes_differ_across_slices_the_way_their_shapes_say():
  source = phantom.make_source(data_config(), 'train')
  for index in range(len(source)):
    scan = source[index]
    areas = object_areas(scan)
    present = np.flatnonzero(areas)
    name = phantom.CLASS_NAMES[scan.label]
    if name == 'disc':
      assert 1 <= len(present) <= 2
    elif name == 'tube':
      assert len(present) >= 0.6 * scan.num_slices - 1
      assert areas[present].max() == areas[present].min()
    elif name == 'sphere':
      assert len(present) >= 4
      assert areas[present[0]] < areas[present].max() > areas[present[-1]]
    else:  # box: same area on every slice it cuts, over several slices
      assert len(present) >= 4 and areas[present].max() == areas[present].min()


def test_one_slice_of_sphere_tube_and_disc_looks_alike_but_a_box_slice_is_square():
  source = phantom.make_source(data_config(), 'train')
  fill = {name: [] for name in phantom.CLASS_NAMES}
  for index in range(len(source)):
    scan = source[index]
    areas = object_areas(scan)
    middle = scan.mask[int(np.argmax(areas))] == OBJECT
    rows, cols = np.flatnonzero(middle.any(axis=1)), np.flatnonzero(middle.any(axis=0))
    box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
    fill[phantom.CLASS_NAMES[scan.label]].append(middle.sum() / box)
  # A disc fills about pi/4 of its bounding box, a square all of it.
  for name in ('sphere', 'tube', 'disc'):
    assert 0.6 < np.mean(fill[name]) < 0.9
  assert min(fill['box']) > 0.95
