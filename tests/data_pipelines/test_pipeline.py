"""Training iterator: batch contract, determinism, host sharding, checkpoint/restore; eval datasets."""

import json

import numpy as np
import pytest

from configs import base
from data_pipelines import pipeline
from data_pipelines.errors import DataError
from dsset.methods import make_method


def small_config(method='deepset', **train):
  config = base.get_config()
  config.method = method
  config.data.set_size = 3 if method == 'deepset' else 1
  config.data.image_size = 16
  config.data.phantom.update(num_scans=16, depth=10, height=24, width=24)
  config.train.batch_size = 4
  config.train.update(train)
  return config


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def assert_same_batches(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize('method,k', [('simclr', 1), ('perscan', 1), ('deepset', 3)])
def test_batches_follow_the_contract(method, k):
  config = small_config(method)
  config.data.channels = 3
  batch = next(make_method(config).make_train_iterator(0, 1))
  # Shipped at the phantom's own 24 px (samplers.ship_size); the device crops them to 16.
  assert batch['views'].shape == (4, 2, k, 24, 24, 3) and batch['views'].dtype == np.uint8
  assert batch['mask'].shape == (4, 2, k) and batch['mask'].dtype == bool and batch['mask'].all()
  assert batch['scan_id'].shape == batch['label'].shape == (4,)
  assert batch['scan_id'].dtype == batch['label'].dtype == np.int32
  if method == 'simclr':
    np.testing.assert_array_equal(batch['views'][:, 0], batch['views'][:, 1])


def test_defaults_to_jax_process_index_and_count():
  batch = next(make_method(small_config()).make_train_iterator())
  assert batch['views'].shape[0] == 4


def test_same_seed_same_batches_other_seed_other_batches():
  config = small_config()
  first = take(make_method(config).make_train_iterator(0, 1), 3)
  again = take(make_method(config).make_train_iterator(0, 1), 3)
  assert_same_batches(first, again)
  config.seed = 1
  other = next(make_method(config).make_train_iterator(0, 1))
  assert not np.array_equal(first[0]['views'], other['views'])


def test_epochs_repeat_every_scan_in_a_new_order():
  config = small_config('perscan', batch_size=8)  # 8 training scans: one batch per epoch
  iterator = make_method(config).make_train_iterator(0, 1)
  epochs = [next(iterator)['scan_id'].tolist() for _ in range(3)]
  assert all(sorted(e) == list(range(8)) for e in epochs)
  assert len({tuple(e) for e in epochs}) > 1


def test_restored_iterator_gives_the_same_next_batches():
  config = small_config()
  iterator = make_method(config).make_train_iterator(0, 1)
  take(iterator, 2)
  state = json.loads(json.dumps(iterator.get_state()))  # what a checkpoint stores
  expected = take(iterator, 3)
  restored = make_method(config).make_train_iterator(0, 1)
  restored.set_state(state)
  assert_same_batches(take(restored, 3), expected)


def test_hosts_split_one_global_stream():
  config = small_config()
  whole = next(make_method(config).make_train_iterator(0, 1))
  halves = [next(make_method(config).make_train_iterator(p, 2))
            for p in range(2)]
  for key in whole:
    assert halves[0][key].shape[0] == 2
    np.testing.assert_array_equal(whole[key][:2], halves[0][key])
    np.testing.assert_array_equal(whole[key][2:], halves[1][key])


def test_batch_size_must_divide_by_processes():
  with pytest.raises(DataError, match='train.batch_size'):
    make_method(small_config(batch_size=5)).make_train_iterator(0, 2)


def test_eval_dataset_gives_whole_scans_and_labelled_slices():
  config = small_config()
  scans = list(pipeline.make_eval_dataset(config, 'val', 'scan'))
  assert len(scans) == 4
  assert scans[0]['slices'].shape == (10, 16, 16, 1) and scans[0]['slices'].dtype == np.uint8
  assert sorted(int(s['label']) for s in scans) == [0, 1, 2, 3]
  slices = pipeline.make_eval_dataset(config, 'val', 'slice')
  assert slices.num_classes == 4
  images = list(slices)
  assert len(images) == 4 * 10 and images[0]['image'].shape == (16, 16, 1)
  np.testing.assert_array_equal(images[3]['image'], scans[0]['slices'][3])
  with pytest.raises(ValueError, match='mode'):
    pipeline.make_eval_dataset(config, 'val', 'volume')


@pytest.mark.slow
def test_two_worker_processes_give_the_same_batches_and_restore():
  config = small_config()
  expected = take(make_method(config).make_train_iterator(0, 1), 4)
  config.data.num_workers = 2
  iterator = make_method(config).make_train_iterator(0, 1)
  assert_same_batches(take(iterator, 2), expected[:2])
  state = json.loads(json.dumps(iterator.get_state()))
  restored = make_method(config).make_train_iterator(0, 1)
  restored.set_state(state)
  assert_same_batches(take(restored, 2), expected[2:])


def test_preview_grid_is_written(tmp_path):
  from data_pipelines import preview
  batch = next(make_method(small_config()).make_train_iterator(0, 1))
  rows = [('scan', batch['views'][i] / 255.0, batch['mask'][i]) for i in range(2)]
  rows[1][2][1, 2] = False  # a padded slice is drawn hatched, not as an image
  preview.write_grid(rows, str(tmp_path / 'grid.png'))
  assert (tmp_path / 'grid.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
