"""The preview: augmented views by default, raw slices with --raw, scans of any split."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import deepset
from data_pipelines import preview
from data_pipelines.errors import DataError
from dsset.config_validation import ConfigError
from dsset.methods import make_method
import format_fixtures as ff
from tests import xla_env

ROOT = pathlib.Path(__file__).resolve().parents[2]

TINY_DATA = [
    '--config.data.image_size=32', '--config.data.phantom.num_scans=16',
    '--config.data.phantom.depth=12', '--config.data.phantom.height=32',
    '--config.data.phantom.width=32', '--config.data.set_size=2', '--config.train.batch_size=4',
]


def _config(**data):
  config = deepset.get_config()
  config.data.update(image_size=16, set_size=2)
  config.data.phantom.update(num_scans=16, depth=10, height=24, width=24)
  config.train.batch_size = 4
  config.data.update(data)
  return config


def test_preview_command_shows_one_augmented_row_per_example(tmp_path):
  out = tmp_path / 'views.png'
  env = dict(os.environ)
  env['XLA_FLAGS'] = xla_env.ONE_DEVICE  # one CPU device, as a user's laptop has
  result = subprocess.run(
      [sys.executable, '-m', 'data_pipelines.preview', '--config=configs/deepset.py',
       f'--out={out}', '--scans=2', *TINY_DATA],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
  )
  assert result.returncode == 0, result.stderr
  assert '2 examples of the train split, augmented' in result.stdout
  with Image.open(out) as image:
    assert image.format == 'PNG'
    # write_grid gives each row 1.7 inches at 100 dpi: one row per example.
    assert image.height == 2 * 170


def test_raw_rows_are_the_first_training_examples_and_augmented_rows_differ():
  config = _config(image_size=12)  # augmentation crops back to data.image_size
  batch = next(make_method(config).make_train_iterator(0, 1))
  split, raw = preview.preview_rows(config, count=3, raw=True)
  assert split == 'train' and len(raw) == 3
  for i, (title, views, mask) in enumerate(raw):
    np.testing.assert_array_equal(views, batch['views'][i] / 255.0)
    np.testing.assert_array_equal(mask, batch['mask'][i])
    assert title.startswith('train phantom')
  _, augmented = preview.preview_rows(config, count=3)
  for (_, plain, _), (_, views, _) in zip(raw, augmented):
    assert views.shape == plain.shape[:2] + (12, 12, plain.shape[-1])
    assert views.dtype == np.float32 and 0.0 <= views.min() and views.max() <= 1.0
  assert not np.allclose(augmented[0][1], raw[0][1][:, :, :12, :12])


def test_a_folder_with_scans_only_in_val_previews_from_val(tmp_path):
  for name, seed in (('a', 0), ('b', 1)):
    ff.write_png_folder(tmp_path / 'val' / name,
                        np.random.default_rng(seed).integers(0, 256, (6, 16, 16), np.uint8))
  config = _config(source='png', path=str(tmp_path))
  split, rows = preview.preview_rows(config, count=2, raw=True)
  assert split == 'val'
  assert {title.split('\n')[0] for title, _, _ in rows} <= {'val a', 'val b'}
  with pytest.raises(DataError, match='no train/ folder'):
    preview.preview_rows(config, split='train')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(DataError, match='no split has scans'):
    preview.preview_rows(_config(source='png', path=str(tmp_path / 'empty')))


def test_a_single_scan_folder_previews_from_train(tmp_path):
  ff.write_png_folder(tmp_path / 'only', np.random.default_rng(0).integers(0, 256, (6, 16, 16),
                                                                          np.uint8))
  split, rows = preview.preview_rows(_config(source='png', path=str(tmp_path)), count=2, raw=True)
  assert split == 'train' and [title.split('\n')[0] for title, _, _ in rows] == ['train only'] * 2


def test_downstream_configs_are_refused():
  config = _config()
  config.method = 'linear'
  with pytest.raises(ConfigError, match='pretraining method'):
    preview.preview_rows(config)
