"""The hash split of folders without train/ val/ test/ subfolders never leaves train empty."""

import itertools

import pytest

from configs.base import get_config
from data_pipelines.errors import DataError
from data_pipelines.sources import make_source, splits
import format_fixtures as ff


def _config(path='', source='dicom'):
  config = get_config().data  # the default fractions: val 0.15, test 0.15
  config.source, config.path = source, str(path)
  return config


def _names_hashing_to(split, count, config, prefix='patient'):
  """The first `count` names 'patient<i>' whose hash alone puts them in `split`."""
  names = (f'{prefix}{i}' for i in itertools.count())
  return list(itertools.islice((n for n in names if splits.hash_split(n, config) == split), count))


def test_one_series_that_hashes_to_val_is_trained_on(tmp_path):
  config = _config(tmp_path)
  (name,) = _names_hashing_to('val', 1, config)
  ff.write_dicom_series(tmp_path / name / 'ct', ff.stored_values())
  source = make_source(config, 'train')
  assert [source[i].scan_id for i in range(len(source))] == [f'{name}/ct']
  for split in ('val', 'test'):
    with pytest.raises(DataError, match='fewer than 3 scan groups are all train'):
      make_source(config, split)


def test_two_scans_that_hash_away_from_train_are_both_trained_on(tmp_path):
  config = _config(tmp_path)
  names = _names_hashing_to('val', 1, config) + _names_hashing_to('test', 1, config)
  for seed, name in enumerate(names):
    ff.write_dicom_series(tmp_path / name, ff.stored_values(seed=seed), seed=seed)
  source = make_source(config, 'train')
  assert sorted(source[i].scan_id for i in range(len(source))) == sorted(names)


def test_small_folders_are_all_train_whatever_the_hash():
  config = _config()
  for split in splits.SPLIT_FOLDERS:
    for count in (1, 2):
      names = _names_hashing_to(split, count, config)
      assert splits.assign_splits(names, config) == {n: 'train' for n in names}
  # Several scans of one group (a patient folder) count as one group.
  assert splits.assign_splits(['p', 'p', 'p', 'q'], config) == {'p': 'train', 'q': 'train'}


def test_without_a_train_group_only_the_group_nearest_train_moves():
  config = _config()
  names = _names_hashing_to('val', 2, config) + _names_hashing_to('test', 2, config)
  assigned = splits.assign_splits(names, config)
  moved = max(names, key=splits._position)  # pylint: disable=protected-access
  assert splits.hash_split(moved, config) == 'val'  # val lies between test and train
  assert assigned == {n: 'train' if n == moved else splits.hash_split(n, config) for n in names}


def test_folders_with_a_train_group_keep_the_plain_hash_split():
  config = _config()
  config.val_fraction, config.test_fraction = 0.3, 0.3
  names = [f'case{i:03d}' for i in range(200)]
  for size in (3, 4, 7, 40, 200):
    for start in range(0, 200 - size + 1, 13):
      folder = names[start:start + size]
      hashed = {n: splits.hash_split(n, config) for n in folder}
      if 'train' in hashed.values():
        assert splits.assign_splits(folder, config) == hashed
  # Adding scans to such a folder moves none of the others.
  small = _names_hashing_to('train', 1, config) + _names_hashing_to('val', 2, config)
  grown = small + [f'new{i}' for i in range(30)]
  before, after = splits.assign_splits(small, config), splits.assign_splits(grown, config)
  assert all(after[n] == s for n, s in before.items())


def test_bad_fractions_are_named_even_for_small_folders():
  config = _config()
  config.val_fraction = 0.9
  with pytest.raises(DataError, match='data.val_fraction=0.9'):
    splits.assign_splits(['a'], config)
