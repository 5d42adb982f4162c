"""MONAI-style JSON datalists of NIfTI files and DICOM folders."""

import json

import nibabel as nib
import numpy as np
import pytest

from configs.base import get_config
from data_pipelines.errors import DataError
from data_pipelines.sources import make_source
import format_fixtures as ff


def _config(path, **overrides):
  config = get_config().data
  config.source, config.path = 'datalist', str(path)
  config.update(overrides)
  return config


def _write(tmp_path, datalist):
  path = tmp_path / 'dataset.json'
  path.write_text(json.dumps(datalist))
  return path


def test_nifti_and_dicom_entries_give_the_same_scan(tmp_path):
  data = ff.stored_values()
  ff.write_nifti(str(tmp_path / 'a.nii.gz'), data)
  ff.write_dicom_series(tmp_path / 'a_dicom', data)
  mask = (data > 1000).astype(np.uint8)
  nib.save(nib.Nifti1Image(mask, ff.AFFINE), str(tmp_path / 'a_mask.nii.gz'))
  path = _write(tmp_path, {
      'training': [{'image': 'a.nii.gz', 'label': 'a_mask.nii.gz'},
                   {'image': 'a_dicom', 'label': 2}],
      'validation': [{'image': 'a.nii.gz'}]})
  train = make_source(_config(path), 'train')
  nifti_scan, dicom_scan = train[0], train[1]
  np.testing.assert_array_equal(nifti_scan.volume, dicom_scan.volume)
  np.testing.assert_allclose(nifti_scan.spacing, dicom_scan.spacing, rtol=1e-6)
  assert (nifti_scan.label, dicom_scan.label, train.num_classes) == (-1, 2, 3)
  assert nifti_scan.mask.shape == nifti_scan.volume.shape
  # Stored values > 1000 are HU >= -23, which the default window (-1000, 1000) maps above 0.488.
  np.testing.assert_array_equal(nifti_scan.mask > 0, nifti_scan.volume > 976.5 / 2000)
  np.testing.assert_array_equal(train.slice_counts, [6, 6])
  assert len(make_source(_config(path), 'val')) == 1
  assert make_source(_config(path), 'test')[0].scan_id == 'a.nii.gz'  # falls back to validation


def test_bad_entries_are_named_and_skipped(tmp_path):
  ff.write_nifti(str(tmp_path / 'good.nii.gz'), ff.stored_values())
  (tmp_path / 'broken.nii.gz').write_bytes(b'not gzip')
  path = _write(tmp_path, {'training': [{'image': 'good.nii.gz'}, {'image': 'broken.nii.gz'},
                                        {'image': 'absent.nii.gz'}, {'label': 1}]})
  source = make_source(_config(path), 'train')
  assert len(source) == 1
  assert any('broken.nii.gz' in m for m in source.skipped)
  assert any('absent.nii.gz' in m for m in source.skipped)
  with pytest.raises(DataError, match='broken.nii.gz'):
    make_source(_config(path, on_bad_scan='stop'), 'train')


def test_missing_lists_and_broken_json_are_named(tmp_path):
  path = _write(tmp_path, {'training': []})
  with pytest.raises(DataError, match='"validation"'):
    make_source(_config(path), 'val')
  (tmp_path / 'cut.json').write_text('{"training": [')
  with pytest.raises(DataError, match='cut.json'):
    make_source(_config(tmp_path / 'cut.json'), 'train')
