"""Hostile inputs: every damaged, absurd or unreadable scan becomes one DataError naming the file.

A parametrized test per listed fault, and a hypothesis fuzz test of NIfTI header fields and bytes.
"""

import gzip
import logging
import os
import struct

import hypothesis
from hypothesis import strategies as st
import nibabel as nib
import numpy as np
import pytest

from data_pipelines.errors import DataError
from data_pipelines.sources import dicom, nifti, png_folder
import format_fixtures as ff

GOOD = 'good.nii.gz'
# data.min_slices of the parametrized test: the 2-slice scan is too short, every other one is not.
MIN_SLICES = 3


def _volume(shape=(6, 7, 8), seed=0):
  return np.random.default_rng(seed).integers(-1000, 1000, size=shape).astype(np.int16)


def _save(path, array, affine=np.eye(4)):
  nib.save(nib.Nifti1Image(array, affine), str(path))


def _nifti_bytes(array=None) -> bytes:
  """An uncompressed single-file NIfTI-1 image (header 348 bytes, 4 extension bytes, voxels)."""
  image = nib.Nifti1Image(_volume() if array is None else array, np.eye(4))
  return image.to_bytes()


def _empty(path):
  path.write_bytes(b'')


def _truncated_gz(path):
  data = gzip.compress(_nifti_bytes(_volume((20, 20, 20))))  # the cut falls inside the voxels
  path.write_bytes(data[:len(data) * 2 // 3])


def _nan_voxels(path):
  array = _volume().astype(np.float32)
  array[1, 2, 3] = np.nan
  array[2, 2, 2] = np.inf
  _save(path, array)


def _constant(path):
  _save(path, np.full((6, 7, 8), 40, np.int16))


def _two_d(path):
  _save(path, _volume((6, 7)))


def _five_d(path):
  _save(path, _volume((4, 4, 4, 2, 2)))


def _header_field(offset, fmt, value):
  def write(path):
    data = bytearray(_nifti_bytes())
    struct.pack_into(fmt, data, offset, *value)
    path.write_bytes(gzip.compress(bytes(data)))
  return write


def _short(path):
  _save(path, _volume((9, 9, 2)))  # 2 axial slices < MIN_SLICES


def _unreadable(path):
  _save(path, _volume())
  os.chmod(path, 0)


def _ill_conditioned(path):
  # Finite and invertible (determinant 1), yet nibabel cannot tell which way the third axis points.
  affine = np.eye(4)
  affine[1, 2] = 1e30
  _save(path, _volume(), affine)


def _self_link(path):
  os.symlink(path.name, path)  # a link to itself: ELOOP on open


# (name, how to write bad.nii.gz, message; found when the source is built or only when decoded)
CASES = [
    ('empty file', _empty, 'the file is empty', 'build'),
    ('truncated .nii.gz', _truncated_gz, 'cannot decode voxels', 'decode'),
    ('NaN and Inf voxels', _nan_voxels, '2 voxels are NaN or infinite', 'decode'),
    ('constant scan', _constant, 'every voxel is 40; the scan is constant', 'decode'),
    ('2D array', _two_d, r'is 2D \(shape \(6, 7\)\)', 'build'),
    ('5D array', _five_d, 'has 5 dimensions', 'build'),
    ('zero spacing', _header_field(80, '<f', (0.0,)),
     r'voxel spacing \(pixdim\) \(0.0, 1.0, 1.0\) must be positive', 'build'),
    ('negative spacing', _header_field(84, '<f', (-2.0,)),
     r'voxel spacing \(pixdim\) \(1.0, -2.0, 1.0\) must be positive', 'build'),
    ('huge dimensions', _header_field(40, '<4h', (3, 30000, 30000, 30000)),
     r'declares 27000000000000 voxels .* more than data.max_voxels', 'build'),
    ('fewer slices than data.min_slices', _short,
     f'has 2 axial slices, fewer than data.min_slices={MIN_SLICES}', 'build'),
    ('unreadable permissions', _unreadable, 'permission denied', 'build'),
    ('symlink loop', _self_link, 'cannot be opened', 'build'),
    ('ill-conditioned affine', _ill_conditioned,
     'the voxel-to-world affine is too ill-conditioned to orient the scan', 'build'),
]


@pytest.mark.parametrize('name, write, message, found', CASES, ids=[c[0] for c in CASES])
def test_each_hostile_nifti_is_one_named_data_error(tmp_path, caplog, name, write, message, found):
  if name == 'unreadable permissions' and os.geteuid() == 0:
    pytest.skip('root reads every file whatever its permissions')
  root = tmp_path / 'scans'
  root.mkdir()
  _save(root / GOOD, _volume())
  write(root / 'bad.nii.gz')
  bad_file = f'{root / "bad.nii.gz"}: '
  caplog.set_level(logging.WARNING)
  source = nifti.make_source(ff.data_config(root, min_slices=MIN_SLICES), 'train')
  if found == 'build':
    # Skipped with a warning and a summary; the good scan remains.
    assert [e.scan_id for e in source.entries] == [GOOD]
    assert len(source.skipped) == 1
    assert source.skipped[0].startswith(bad_file)
    assert '1 of 2 NIfTI files' in caplog.text
    with pytest.raises(DataError, match=bad_file + message):
      nifti.make_source(ff.data_config(root, min_slices=MIN_SLICES, on_bad_scan='stop'), 'train')
    os.remove(root / GOOD)
    with pytest.raises(DataError, match='no usable NIfTI files'):  # nothing usable left
      nifti.make_source(ff.data_config(root, min_slices=MIN_SLICES), 'train')
  else:
    # Only decoding shows the fault: reading the scan raises, naming the file.
    bad = [e.scan_id for e in source.entries].index('bad.nii.gz')
    with pytest.raises(DataError, match=bad_file + message):
      source[bad]
    assert np.isfinite(np.asarray(source[1 - bad].volume, np.float32)).all()


def test_non_utf8_file_names_are_skipped_by_name(tmp_path):
  root = tmp_path / 'scans'
  root.mkdir()
  _save(root / GOOD, _volume())
  bad_name = os.path.join(os.fsencode(root), b'caf\xe9.nii.gz')
  with open(bad_name, 'wb') as f:
    f.write(gzip.compress(_nifti_bytes()))
  source = nifti.make_source(ff.data_config(root), 'train')
  assert [e.scan_id for e in source.entries] == [GOOD]
  assert r'caf\udce9.nii.gz' in source.skipped[0] and 'not valid UTF-8' in source.skipped[0]
  source.skipped[0].encode('ascii')  # printable on any terminal


def test_folder_link_loops_neither_hang_nor_repeat_scans(tmp_path):
  root = tmp_path / 'scans'
  (root / 'p1').mkdir(parents=True)
  _save(root / 'p1' / GOOD, _volume())
  os.symlink('..', root / 'p1' / 'up')  # p1/up/p1/up/... loops
  os.symlink(str(root / 'p1'), root / 'p2')  # a second link to one folder is visited once
  source = nifti.make_source(ff.data_config(root), 'train')
  assert len(source) == 1


def test_constant_and_empty_inputs_of_other_formats_are_named(tmp_path):
  flat = np.full((4, 8, 8), 7, np.uint8)
  ff.write_png_folder(tmp_path / 'png' / 'flat', flat)
  ff.write_png_folder(tmp_path / 'png' / 'ok', np.arange(256, dtype=np.uint8).reshape(4, 8, 8))
  source = png_folder.make_source(ff.data_config(tmp_path / 'png', 'png'), 'train')
  with pytest.raises(DataError, match='slice folder flat: every voxel is 7; the scan is constant'):
    source[[s.scan_id for s in source.entries].index('flat')]
  (tmp_path / 'png' / 'ok' / 'slice-9.png').write_bytes(b'')
  source = png_folder.make_source(ff.data_config(tmp_path / 'png', 'png'), 'train')
  assert any('slice-9.png: the file is empty' in m for m in source.skipped)
  ff.write_dicom_series(tmp_path / 'dcm' / 'good', ff.stored_values())
  (tmp_path / 'dcm' / 'good' / 'empty.dcm').write_bytes(b'')
  source = dicom.make_source(ff.data_config(tmp_path / 'dcm', 'dicom'), 'train')
  assert len(source) == 1 and any('empty.dcm: the file is empty' in m for m in source.skipped)


# NIfTI-1 header fields the fuzz test rewrites: (offset, struct format, values to choose from).
_FIELDS = {
    'dim': (40, '<8h', st.tuples(*[st.integers(-2, 40)] * 8)),
    'datatype': (70, '<h', st.tuples(st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 511,
                                                      512, 768, 1536, 2304, -1]))),
    'pixdim': (76, '<8f', st.tuples(*[st.sampled_from([0.0, -1.0, 1.0, 1e-30, 1e30,
                                                       float('nan'), float('inf')])] * 8)),
    'vox_offset': (108, '<f', st.tuples(st.sampled_from([0.0, 1.0, 352.0, 353.0, 1e9, -5.0,
                                                         float('nan')]))),
    'scl_slope': (112, '<f', st.tuples(st.sampled_from([0.0, -1.0, 1e38, float('nan'),
                                                        float('inf')]))),
}


@st.composite
def _mutated_nifti(draw):
  data = bytearray(_nifti_bytes(_volume((5, 6, 7))))
  for field in draw(st.lists(st.sampled_from(sorted(_FIELDS)), max_size=3, unique=True)):
    offset, fmt, values = _FIELDS[field]
    struct.pack_into(fmt, data, offset, *draw(values))
  for _ in range(draw(st.integers(0, 4))):
    data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
  data = bytes(data[:draw(st.integers(0, len(data)))]) if draw(st.booleans()) else bytes(data)
  return draw(st.booleans()), data


@hypothesis.settings(max_examples=40, deadline=None, database=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(_mutated_nifti())
def test_fuzzed_nifti_gives_a_valid_volume_or_a_data_error(tmp_path_factory, example):
  compressed, data = example
  root = tmp_path_factory.mktemp('fuzz')
  name = 'scan.nii.gz' if compressed else 'scan.nii'
  (root / name).write_bytes(gzip.compress(data) if compressed else data)
  # A small cap keeps declared-but-absent voxels from costing memory in this test.
  config = ff.data_config(root, max_voxels=10**6, on_bad_scan='stop')
  try:
    source = nifti.make_source(config, 'train')
    for i in range(len(source)):
      volume = np.asarray(source[i].volume, np.float32)
      assert volume.ndim == 3 and volume.size > 0
      assert np.isfinite(volume).all() and volume.min() >= 0 and volume.max() <= 1
  except DataError as e:
    assert name in str(e) or 'data.path' in str(e)
