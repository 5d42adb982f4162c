"""prepare: source -> TFDS ArrayRecord -> tfds source, resumable, bad scans skipped."""

import os

import numpy as np
import pytest

from configs.base import get_config
from data_pipelines import prepare
from data_pipelines.errors import DataError
from data_pipelines.resample import resample
from data_pipelines.sources import make_source
import format_fixtures as ff


def _config(source, path, **overrides):
  config = get_config()
  config.data.source, config.data.path = source, str(path)
  config.data.update(overrides)
  return config


def _assert_prepared_equals_source(config, out):
  prepared = _config('tfds', out).data
  for split in ('train', 'val', 'test'):
    try:
      original = make_source(config.data, split)
    except DataError:
      with pytest.raises(DataError):
        make_source(prepared, split)
      continue
    copy = make_source(prepared, split)
    assert len(copy) == len(original) and copy.num_classes == original.num_classes
    for i in range(len(original)):
      want, got = original[i], copy[i]
      volume, spacing = resample(want.volume, want.spacing, tuple(config.data.target_spacing))
      np.testing.assert_array_equal(got.volume, volume)
      assert (got.scan_id, got.label) == (want.scan_id, want.label)
      np.testing.assert_allclose(got.spacing, spacing)
    np.testing.assert_array_equal(copy.slice_counts, [copy[i].num_slices for i in range(len(copy))])


def test_dicom_prepared_with_resampling_is_voxel_exact(tmp_path):
  for p in range(5):
    ff.write_dicom_series(tmp_path / 'in' / f'p{p}', ff.stored_values(seed=p), seed=p)
  config = _config('dicom', tmp_path / 'in', val_fraction=0.3, test_fraction=0.2,
                   target_spacing=(2.0, 1.0, 1.0))
  summary = prepare.prepare(config, str(tmp_path / 'out'))
  assert sum(summary.written.values()) == 5 and not summary.bad
  assert not os.path.exists(tmp_path / 'out' / '.partial')
  _assert_prepared_equals_source(config, tmp_path / 'out')
  assert make_source(_config('tfds', tmp_path / 'out').data, 'train')[0].spacing == (2.0, 1.0, 1.0)


def test_npz_and_png_prepared_without_resampling_are_voxel_exact(tmp_path):
  rng = np.random.default_rng(0)
  np.savez(tmp_path / 'm.npz', **{f'{s}_images': rng.integers(0, 255, (3, 4, 8, 8), np.uint8)
                                  for s in ('train', 'val', 'test')},
           **{f'{s}_labels': rng.integers(0, 3, (3, 1)) for s in ('train', 'val', 'test')})
  config = _config('npz', tmp_path / 'm.npz')
  prepare.prepare(config, str(tmp_path / 'out_npz'))
  _assert_prepared_equals_source(config, tmp_path / 'out_npz')
  for name in ('a', 'b', 'c'):
    ff.write_png_folder(tmp_path / 'png' / 'train' / name,
                        rng.integers(0, 255, (5, 8, 8), np.uint8))
  config = _config('png', tmp_path / 'png')
  summary = prepare.prepare(config, str(tmp_path / 'out_png'))
  assert set(summary.missing_splits) == {'val', 'test'}
  _assert_prepared_equals_source(config, tmp_path / 'out_png')


def test_resume_skips_done_scans_and_bad_scans_are_summarised(tmp_path, monkeypatch):
  for p in range(4):
    # Scan p: slice k is all 10 * (p + 1) + k (scans must not be constant).
    volume = 10 * (p + 1) + np.arange(4, dtype=np.uint8)[:, None, None] + np.zeros((4, 8, 8),
                                                                                   np.uint8)
    ff.write_png_folder(tmp_path / 'in' / 'train' / f's{p}', volume, order_seed=p)
  ff.truncate(str(tmp_path / 'in' / 'train' / 's2' / 'slice-1.png'), 0.5)
  config = _config('png', tmp_path / 'in')
  calls = []
  real_save = prepare._save_scan

  def interrupted_save(path, scan, target):
    calls.append(scan.scan_id)
    if len(calls) == 2:
      raise KeyboardInterrupt  # the user stops the run after one scan was written
    real_save(path, scan, target)

  monkeypatch.setattr(prepare, '_save_scan', interrupted_save)
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare(config, str(tmp_path / 'out'))
  monkeypatch.setattr(prepare, '_save_scan', lambda *a: (calls.append(a[1].scan_id), real_save(*a)))
  summary = prepare.prepare(config, str(tmp_path / 'out'))
  assert calls == ['s0', 's1', 's1', 's3']  # s0 was kept; s2 is bad before saving
  assert summary.written == {'train': 3}
  assert len(summary.bad) == 1 and 'slice-1.png' in summary.bad[0][1]
  assert any('1 bad scans skipped' in line for line in summary.lines())
  ids = [make_source(_config('tfds', tmp_path / 'out').data, 'train')[i].scan_id for i in range(3)]
  assert ids == ['s0', 's1', 's3']


def test_resume_with_other_settings_is_refused(tmp_path):
  ff.write_png_folder(tmp_path / 'in' / 'train' / 's', np.zeros((4, 8, 8), np.uint8))
  os.makedirs(tmp_path / 'out' / '.partial')
  (tmp_path / 'out' / '.partial' / 'settings.json').write_text('{"source": "nifti"}')
  with pytest.raises(DataError, match='other data settings'):
    prepare.prepare(_config('png', tmp_path / 'in'), str(tmp_path / 'out'))


def test_tfds_source_without_a_prepared_dataset_names_the_path(tmp_path):
  with pytest.raises(DataError, match=str(tmp_path)):
    make_source(_config('tfds', tmp_path).data, 'train')


def test_resample_linear_and_nearest():
  ramp = np.arange(5, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)
  same, spacing = resample(ramp, (2.0, 1.0, 1.0), (2.0, 1.0, 1.0))
  assert same is ramp and spacing == (2.0, 1.0, 1.0)
  finer, spacing = resample(ramp, (2.0, 1.0, 1.0), (1.0, 1.0, 1.0))
  np.testing.assert_allclose(finer[:, 0, 0], np.arange(9) / 2)
  assert spacing == (1.0, 1.0, 1.0)
  labels = np.array([0, 1, 2], np.int32)[:, None, None] * np.ones((1, 1, 1), np.int32)
  nearest, _ = resample(labels, (1.0, 1.0, 1.0), (0.5, 1.0, 1.0), 'nearest')
  assert nearest.dtype == np.int32 and set(nearest.ravel()) == {0, 1, 2}
  with pytest.raises(DataError, match='target_spacing'):
    resample(ramp, (1.0, 1.0, 1.0), (1.0, -1.0))


@pytest.mark.parametrize('method', ['simclr', 'perscan', 'deepset'])
def test_every_sampler_reads_dicom_and_prepared_sources(tmp_path, method):
  from dsset.methods import make_method
  for p in range(2):
    ff.write_dicom_series(tmp_path / 'in' / 'train' / f'p{p}', ff.stored_values(seed=p), seed=p)
  config = _config('dicom', tmp_path / 'in', image_size=8)
  config.method = method
  prepare.prepare(config, str(tmp_path / 'out'))
  for source in (make_source(config.data, 'train'),
                 make_source(_config('tfds', tmp_path / 'out').data, 'train')):
    sampler = make_method(config).make_sampler(source)
    if method == 'simclr':
      example = sampler.map(0)
    else:
      example = sampler.random_map(1, np.random.default_rng(0))
    k = 1 if method != 'deepset' else config.data.set_size
    # Neither source declares its slices' size: they ship at augment.crop_source_size (upsampled).
    size = config.augment.crop_source_size
    assert example['views'].shape == (2, k, size, size, 1) and example['views'].dtype == np.uint8
