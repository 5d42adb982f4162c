"""PNG slice folders: integer order, 8-bit scaling, labels, splits, bad files, short scans."""

import importlib

import numpy as np
import pytest
from PIL import Image

from configs.base import get_config
from data_pipelines.errors import DataError
from data_pipelines.sources import make_source
from dsset.methods import make_method
import format_fixtures as ff


def _config(path, **overrides):
  config = get_config().data
  config.source, config.path = 'png', str(path)
  config.val_fraction = config.test_fraction = 0.0
  config.update(overrides)
  return config


def _volume(depth=12, seed=0):
  return np.random.default_rng(seed).integers(0, 256, size=(depth, 16, 16)).astype(np.uint8)


def test_slices_ordered_by_integer_not_name_and_scaled_by_255(tmp_path):
  volume = _volume(depth=12)  # slice-10 sorts before slice-2 by name
  ff.write_png_folder(tmp_path / 'scan_a', volume)
  scan = make_source(_config(tmp_path), 'train')[0]
  np.testing.assert_array_equal(scan.volume, volume.astype(np.float32) / np.float32(255))
  assert scan.volume.dtype == np.float32 and scan.spacing == (1.0, 1.0, 1.0)
  assert scan.scan_id == 'scan_a'


def test_sixteen_bit_slices_use_the_intensity_policy(tmp_path):
  volume = np.random.default_rng(1).integers(0, 4000, size=(4, 8, 8)).astype(np.uint16)
  ff.write_png_folder(tmp_path / 's', volume)
  scan = make_source(_config(tmp_path, intensity='minmax', default_spacing=(3.0, 0.5, 0.5)),
                     'train')[0]
  expected = (volume - volume.min()) / float(volume.max() - volume.min())
  np.testing.assert_allclose(scan.volume, expected, atol=1e-6)
  assert scan.spacing == (3.0, 0.5, 0.5)


def test_colour_slices_become_grey(tmp_path):
  (tmp_path / 's').mkdir()
  for k in range(3):
    Image.fromarray(np.full((8, 8, 3), 40 * k, np.uint8)).save(tmp_path / 's' / f'x-{k}.png')
  volume = make_source(_config(tmp_path), 'train')[0].volume
  np.testing.assert_allclose(volume[:, 0, 0], [0.0, 40 / 255, 80 / 255], atol=1e-6)


def test_labels_splits_and_split_folders(tmp_path):
  for name in ('a', 'b'):
    ff.write_png_folder(tmp_path / 'train' / name, _volume(4))
  ff.write_png_folder(tmp_path / 'val' / 'c', _volume(4))
  (tmp_path / 'labels.csv').write_text('a,1\nc,2\n')
  config = _config(tmp_path, labels_csv=str(tmp_path / 'labels.csv'))
  train, val = make_source(config, 'train'), make_source(config, 'val')
  assert [train[i].label for i in range(2)] == [1, -1] and val[0].label == 2
  assert train.num_classes == 3
  np.testing.assert_array_equal(train.slice_counts, [4, 4])
  with pytest.raises(DataError, match='test/'):
    make_source(config, 'test')


def test_unnumbered_and_duplicate_names_are_bad(tmp_path):
  ff.write_png_folder(tmp_path / 'good', _volume(4))
  ff.write_png_folder(tmp_path / 'bad', _volume(4))
  Image.fromarray(_volume(1)[0]).save(tmp_path / 'bad' / 'cover.png')
  source = make_source(_config(tmp_path), 'train')
  assert len(source) == 1 and 'cover.png' in source.skipped[0]
  with pytest.raises(DataError, match='cover.png'):
    make_source(_config(tmp_path, on_bad_scan='stop'), 'train')


def test_truncated_and_corrupted_files_are_named(tmp_path):
  ff.write_png_folder(tmp_path / 's', _volume(4))
  ff.truncate(str(tmp_path / 's' / 'slice-2.png'), 0.5)
  with pytest.raises(DataError, match='slice-2.png'):
    make_source(_config(tmp_path), 'train')[0]
  (tmp_path / 's' / 'slice-2.png').write_bytes(b'not a png at all')
  with pytest.raises(DataError, match='slice-2.png'):
    make_source(_config(tmp_path), 'train')[0]


@pytest.mark.parametrize('min_slices, kept', [(1, ['long', 'one', 'short']), (3, ['long'])])
def test_every_method_trains_on_the_same_scans(tmp_path, min_slices, kept):
  """data.min_slices leaves out the same scans whatever the method's set size (by default none);
  DS-SimCLR's sets of the scans shorter than K are K real slices."""
  for name, depth in (('long', 4), ('short', 2), ('one', 1)):
    ff.write_png_folder(tmp_path / name, _volume(depth))
  for method in ('simclr', 'perscan', 'deepset'):
    config = importlib.import_module(f'configs.{method}').get_config()
    config.data = _config(tmp_path, image_size=16, set_size=config.data.set_size,
                          window=config.data.window, min_slices=min_slices)
    source = make_source(config.data, 'train')
    sampler = make_method(config).make_sampler(source)
    examples = [sampler.map(r) if method == 'simclr' else
                sampler.random_map(r, np.random.default_rng(r)) for r in range(sampler.num_records)]
    assert sorted({source[int(e['scan_id'])].scan_id for e in examples}) == kept, method
    assert all(e['mask'].all() for e in examples)
