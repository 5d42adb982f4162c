"""MedMNIST-layout .npz: 3D and 2D layouts, splits, labels, bad files."""

import numpy as np
import pytest

from configs.base import get_config
from data_pipelines.errors import DataError
from data_pipelines.sources import make_source
import format_fixtures as ff


def _config(path, **overrides):
  config = get_config().data
  config.source, config.path = 'npz', str(path)
  config.update(overrides)
  return config


def _write(path, images_shape=(5, 6, 8, 8), dtype=np.uint8, **extra):
  rng = np.random.default_rng(0)
  arrays = {}
  for split, count in (('train', images_shape[0]), ('val', 2), ('test', 3)):
    arrays[f'{split}_images'] = rng.integers(0, 200, size=(count, *images_shape[1:])).astype(dtype)
    arrays[f'{split}_labels'] = rng.integers(0, 4, size=(count, 1))
  arrays.update(extra)
  np.savez_compressed(path, **arrays)
  return arrays


def test_3d_volumes_are_exact_and_labelled(tmp_path):
  arrays = _write(tmp_path / 'organ.npz')
  for split in ('train', 'val', 'test'):
    source = make_source(_config(tmp_path / 'organ.npz'), split)
    assert len(source) == len(arrays[f'{split}_images'])
    assert source.num_classes == 1 + max(int(arrays[f'{s}_labels'].max())
                                         for s in ('train', 'val', 'test'))
    for i in range(len(source)):
      scan = source[i]
      np.testing.assert_array_equal(
          scan.volume, arrays[f'{split}_images'][i].astype(np.float32) / np.float32(255))
      assert scan.label == arrays[f'{split}_labels'][i, 0]
      assert scan.scan_id == f'organ-{split}-{i}'


def test_2d_images_are_one_slice_scans(tmp_path):
  arrays = _write(tmp_path / 'pneumonia.npz', images_shape=(4, 8, 8))
  scan = make_source(_config(tmp_path / 'pneumonia.npz'), 'train')[1]
  assert scan.volume.shape == (1, 8, 8)
  np.testing.assert_array_equal(scan.volume[0], arrays['train_images'][1] / np.float32(255))


def test_2d_colour_images_become_grey(tmp_path):
  _write(tmp_path / 'path.npz', images_shape=(4, 8, 8, 3))
  scan = make_source(_config(tmp_path / 'path.npz'), 'train')[0]
  assert scan.volume.shape == (1, 8, 8) and 0 <= scan.volume.min() <= scan.volume.max() <= 1


def test_float_volumes_use_the_intensity_policy(tmp_path):
  _write(tmp_path / 'f.npz', dtype=np.float32)
  scan = make_source(_config(tmp_path / 'f.npz', intensity='minmax'), 'train')[0]
  assert scan.volume.min() == 0.0 and scan.volume.max() == 1.0


def test_missing_split_wrong_shape_and_bad_labels_are_named(tmp_path):
  np.savez(tmp_path / 'only_train.npz',
           train_images=np.arange(512).astype(np.uint8).reshape(2, 4, 8, 8))
  with pytest.raises(DataError, match=r"only_train.npz.*'val_images'"):
    make_source(_config(tmp_path / 'only_train.npz'), 'val')
  assert make_source(_config(tmp_path / 'only_train.npz'), 'train')[0].label == -1
  np.savez(tmp_path / 'flat.npz', train_images=np.zeros((2, 8), np.uint8))
  with pytest.raises(DataError, match='flat.npz.*train_images'):
    make_source(_config(tmp_path / 'flat.npz'), 'train')
  np.savez(tmp_path / 'multi.npz', train_images=np.zeros((2, 4, 8, 8), np.uint8),
           train_labels=np.zeros((2, 14), np.int64))
  with pytest.raises(DataError, match='multi.npz.*train_labels'):
    make_source(_config(tmp_path / 'multi.npz'), 'train')


def test_truncated_and_corrupted_files_are_named(tmp_path):
  _write(tmp_path / 'cut.npz')
  ff.truncate(str(tmp_path / 'cut.npz'), 0.6)
  with pytest.raises(DataError, match='cut.npz'):
    make_source(_config(tmp_path / 'cut.npz'), 'train')
  (tmp_path / 'junk.npz').write_bytes(b'PK\x03\x04 garbage')
  with pytest.raises(DataError, match='junk.npz'):
    make_source(_config(tmp_path / 'junk.npz'), 'train')
  with pytest.raises(DataError, match='missing.npz'):
    make_source(_config(tmp_path / 'missing.npz'), 'train')


def test_volumes_shorter_than_min_slices_are_refused(tmp_path):
  _write(tmp_path / 'thin.npz', images_shape=(3, 2, 8, 8))
  with pytest.raises(DataError, match='fewer than data.min_slices=3'):
    make_source(_config(tmp_path / 'thin.npz', min_slices=3), 'train')
  assert len(make_source(_config(tmp_path / 'thin.npz'), 'train')) == 3
