"""DICOM source: series grouping, slice order by position, rescale, geometry, bad files."""

import os

import nibabel as nib
import numpy as np
import pytest

from configs.base import get_config
from data_pipelines.errors import DataError
from data_pipelines.intensity import normalise
from data_pipelines.orientation import canonical_slices
from data_pipelines.sources import make_source
import format_fixtures as ff


def _config(path, **overrides):
  config = get_config().data
  config.source, config.path = 'dicom', str(path)
  config.val_fraction = config.test_fraction = 0.0
  config.update(overrides)
  return config


def _nifti_reference(path, config):
  image = nib.load(path)
  volume, spacing = canonical_slices(np.asarray(image.dataobj, np.float32), image.affine,
                                     config.slice_axis)
  return normalise(volume, config, str(path)), spacing


@pytest.mark.parametrize('slice_axis', ['axial', 'coronal', 'sagittal'])
def test_series_matches_the_same_scan_stored_as_nifti(tmp_path, slice_axis):
  data = ff.stored_values()
  ff.write_dicom_series(tmp_path / 'in' / 'patient', data, slope=2.0, intercept=-1024.0)
  ff.write_nifti(tmp_path / 'scan.nii.gz', data, slope=2.0, intercept=-1024.0)
  config = _config(tmp_path / 'in', slice_axis=slice_axis)
  scan = make_source(config, 'train')[0]
  expected, spacing = _nifti_reference(tmp_path / 'scan.nii.gz', config)
  np.testing.assert_array_equal(scan.volume, expected)
  np.testing.assert_allclose(scan.spacing, spacing, rtol=1e-6)
  assert scan.scan_id == 'patient' and scan.label == -1


def test_rescale_gives_hounsfield_units(tmp_path):
  data = ff.stored_values()
  ff.write_dicom_series(tmp_path / 'p', data, slope=0.5, intercept=-300.0)
  config = _config(tmp_path, intensity='ct', ct_window=(-300.0, 700.0))
  volume = make_source(config, 'train')[0].volume
  # Every stored value v becomes HU 0.5 v - 300, which the window maps to (0.5 v) / 1000.
  assert volume.min() >= 0
  assert np.isclose(volume.max(), min(1.0, data.max() * 0.5 / 1000), atol=1e-6)


def test_multiframe_file_matches_single_frame_series(tmp_path):
  data = ff.stored_values()
  ff.write_dicom_series(tmp_path / 'a' / 'single', data)
  ff.write_dicom_multiframe(str(tmp_path / 'a' / 'multi' / 'all.dcm'), data)
  source = make_source(_config(tmp_path / 'a'), 'train')
  scans = {source[i].scan_id: source[i] for i in range(len(source))}
  assert set(scans) == {'single', 'multi'}
  np.testing.assert_array_equal(scans['single'].volume, scans['multi'].volume)
  assert scans['single'].spacing == scans['multi'].spacing


def test_series_sharing_a_folder_are_told_apart_by_uid(tmp_path):
  ff.write_dicom_series(tmp_path / 'p', ff.stored_values(seed=1), series_uid='1.2.3.1')
  ff.write_dicom_series(tmp_path / 'p', ff.stored_values(seed=2), series_uid='1.2.3.2', seed=5)
  source = make_source(_config(tmp_path), 'train')
  assert sorted(source[i].scan_id for i in range(2)) == ['p#1.2.3.1', 'p#1.2.3.2']
  np.testing.assert_array_equal(source.slice_counts, [6, 6])


def test_labels_csv_and_hash_split_keep_patients_together(tmp_path):
  for p in range(8):
    ff.write_dicom_series(tmp_path / 'in' / f'pt{p}' / 'ct', ff.stored_values(seed=p), seed=p)
  (tmp_path / 'labels.csv').write_text('name,label\n' + ''.join(f'pt{p}/ct,{p % 2}\n'
                                                                 for p in range(8)))
  config = _config(tmp_path / 'in', val_fraction=0.3, test_fraction=0.3,
                   labels_csv=str(tmp_path / 'labels.csv'))
  ids = {}
  for split in ('train', 'val', 'test'):
    try:
      source = make_source(config, split)
    except DataError:
      continue
    assert source.num_classes == 2
    ids[split] = [source[i].scan_id for i in range(len(source))]
    assert all(source[i].label == int(ids[split][i][2]) % 2 for i in range(len(source)))
  assert sorted(sum(ids.values(), [])) == [f'pt{p}/ct' for p in range(8)]


def test_truncated_file_makes_its_series_bad_and_is_named(tmp_path):
  ff.write_dicom_series(tmp_path / 'good', ff.stored_values())
  paths = ff.write_dicom_series(tmp_path / 'bad', ff.stored_values(seed=3))
  ff.truncate(paths[2], 0.9)
  source = make_source(_config(tmp_path), 'train')
  assert len(source) == 1 and source[0].scan_id == 'good'
  assert any(paths[2] in message and 'truncated' in message for message in source.skipped)
  with pytest.raises(DataError, match=paths[2].replace('.', r'\.')):
    make_source(_config(tmp_path, on_bad_scan='stop'), 'train')


def test_damaged_header_is_named(tmp_path):
  ff.write_dicom_series(tmp_path / 'good', ff.stored_values())
  junk = tmp_path / 'good' / 'junk.dcm'
  junk.write_bytes(bytes(128) + b'DICM' + np.random.default_rng(0).bytes(300))
  with pytest.raises(DataError, match='junk.dcm'):
    make_source(_config(tmp_path, on_bad_scan='stop'), 'train')


def test_compressed_without_decoder_names_file_and_package(tmp_path):
  import pydicom.pixels
  from pydicom.uid import JPEGLSLossless
  if pydicom.pixels.get_decoder(JPEGLSLossless).is_available:
    pytest.skip('a JPEG-LS decoder is installed here')
  path = str(tmp_path / 'p' / 'a.dcm')
  ff.write_dicom_jpeg_ls(path, ff.stored_values(shape=(16, 12, 1)))
  with pytest.raises(DataError, match=r'a\.dcm.*JPEG-LS.*pylibjpeg'):
    make_source(_config(tmp_path, on_bad_scan='stop'), 'train')


def test_nothing_usable_names_data_path(tmp_path):
  (tmp_path / 'notes.txt').write_text('no scans here')
  with pytest.raises(DataError, match=str(tmp_path)):
    make_source(_config(tmp_path), 'train')


def test_decoded_scans_are_cached_and_not_pickled(tmp_path):
  import pickle
  ff.write_dicom_series(tmp_path / 'p', ff.stored_values())
  source = make_source(_config(tmp_path, decoded_cache_scans=1), 'train')
  assert source[0] is source[0]
  clone = pickle.loads(pickle.dumps(source))
  np.testing.assert_array_equal(clone[0].volume, source[0].volume)


def test_ill_conditioned_geometry_is_named(tmp_path):
  # Slices 2.5 mm apart along the normal but 1e20 mm apart in plane: a finite, invertible affine
  # whose slice axis nibabel cannot name (io_orientation gives NaN), so the series cannot be oriented.
  ff.write_dicom_series(tmp_path / 'good', ff.stored_values())
  sheared = ff.AFFINE.copy()
  sheared[1, 2] = 1e20
  ff.write_dicom_series(tmp_path / 'sheared', ff.stored_values(seed=1), affine=sheared, seed=1)
  source = make_source(_config(tmp_path), 'train')
  assert [scan.scan_id for scan in (source[i] for i in range(len(source)))] == ['good']
  assert any('sheared' in message and 'too ill-conditioned to orient' in message
             for message in source.skipped)
