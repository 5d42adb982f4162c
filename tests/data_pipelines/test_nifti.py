"""NIfTI source: round trips with files written here, orientation, cache, bad files, labels,
masks."""

import logging
import os

import nibabel as nib
import numpy as np
import pytest

from configs import base
from data_pipelines import intensity, orientation
from data_pipelines.errors import DataError
from data_pipelines.sources import nifti, splits

# A non-canonical affine: array axes are (A->P, S->I, L->R) with 1 x 2 x 3 mm voxels.
SHUFFLED_AFFINE = np.array([[0., 0., 3., 0.], [-1., 0., 0., 0.], [0., -2., 0., 0.], [0, 0, 0, 1]])


def hu_volume(shape, seed=0):
  return np.random.default_rng(seed).integers(-1000, 1000, size=shape).astype(np.int16)


def save(path, array, affine=SHUFFLED_AFFINE):
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(array, affine), str(path))


def data_config(root, **keys):
  config = base.get_config().data
  config.path = str(root)
  config.cache_dir = str(root / 'cache')
  config.val_fraction = 0.0
  config.test_fraction = 0.0
  config.update(keys)
  return config


def expected_slices(array, affine, config):
  volume, _ = orientation.canonical_slices(array.astype(np.float32), affine, config.slice_axis)
  return intensity.normalise(volume, config, 'expected')


@pytest.mark.parametrize('name', ['scan.nii', 'scan.nii.gz'])
@pytest.mark.parametrize('slice_axis', ['axial', 'coronal', 'sagittal'])
def test_round_trip_gives_canonical_normalised_slices(tmp_path, name, slice_axis):
  array = hu_volume((6, 7, 8))
  save(tmp_path / name, array)
  config = data_config(tmp_path, slice_axis=slice_axis)
  scan = nifti.make_source(config, 'train')[0]
  expected = expected_slices(array, SHUFFLED_AFFINE, config)
  assert scan.volume.shape == expected.shape and scan.volume.dtype == np.float16
  np.testing.assert_allclose(scan.volume, expected, atol=1e-3)
  assert scan.scan_id == name and scan.label == -1 and scan.mask is None
  assert scan.spacing == orientation.canonical_geometry(array.shape, SHUFFLED_AFFINE,
                                                        slice_axis)[1]


def test_same_anatomy_stored_two_ways_gives_the_same_slices(tmp_path):
  ras = hu_volume((8, 9, 10))  # already RAS+, 1 mm
  save(tmp_path / 'ras.nii.gz', ras, np.eye(4))
  # The same voxels stored with array axes (I, P, R): flipped[a, b, c] = ras[c, 8 - b, 9 - a].
  flipped = np.ascontiguousarray(ras.transpose(2, 1, 0)[::-1, ::-1, :])
  affine = np.array([[0., 0., 1., 0.], [0., -1., 0., 8.], [-1., 0., 0., 9.], [0, 0, 0, 1]])
  save(tmp_path / 'ipr.nii', flipped, affine)
  source = nifti.make_source(data_config(tmp_path), 'train')
  assert source.slice_counts.tolist() == [10, 10]
  np.testing.assert_array_equal(source[0].volume, source[1].volume)


def test_second_source_reads_the_cache_not_the_file(tmp_path, monkeypatch):
  save(tmp_path / 'a.nii.gz', hu_volume((5, 6, 7)))
  config = data_config(tmp_path)
  first = np.array(nifti.make_source(config, 'train')[0].volume)
  entries = os.listdir(tmp_path / 'cache')
  assert len(entries) == 1 and entries[0].endswith('.npy')  # no temporary left behind

  def no_decoding(path, data_config):
    raise AssertionError(f'decoded {path} again')

  monkeypatch.setattr(nifti, 'read_volume', no_decoding)
  again = nifti.make_source(config, 'train')[0].volume
  assert isinstance(again, np.memmap)
  np.testing.assert_array_equal(first, again)
  # A different intensity policy is a different cache entry.
  with pytest.raises(AssertionError, match='decoded'):
    nifti.make_source(data_config(tmp_path, intensity='mri'), 'train')[0]


def test_cache_evicts_least_recently_opened_beyond_its_cap(tmp_path):
  for i in range(3):
    save(tmp_path / f's{i}.nii', hu_volume((10, 10, 10), seed=i))
  one_volume_gb = 1000 * 2 / 1e9  # float16
  config = data_config(tmp_path, cache_max_gb=2.5 * one_volume_gb)
  cache = tmp_path / 'cache'

  def open_scan(index, clock):
    """Opens scan `index` in a fresh source (no per-process map) and dates its entry `clock`."""
    before = set(cache.glob('*.npy')) if cache.exists() else set()
    nifti.make_source(config, 'train')[index]
    entry = (set(cache.glob('*.npy')) - before) or {max(cache.glob('*.npy'),
                                                       key=os.path.getmtime)}
    os.utime(entry.pop(), (clock, clock))

  open_scan(0, 1000)
  open_scan(1, 2000)
  open_scan(0, 3000)  # a hit: scan 0 is now the most recently opened
  assert len(list(cache.glob('*.npy'))) == 2
  source = nifti.make_source(config, 'train')
  source[2]  # over the cap: scan 1, opened least recently, goes
  left = {p.name for p in cache.glob('*.npy')}
  assert len(left) == 2
  source[0]
  assert {p.name for p in cache.glob('*.npy')} == left  # scan 0 was still cached


def test_4d_uses_the_first_volume_with_a_warning(tmp_path, caplog):
  array = hu_volume((5, 6, 7, 3))
  save(tmp_path / 'four.nii.gz', array)
  source = nifti.make_source(data_config(tmp_path), 'train')
  assert 'four.nii.gz: 4D with 3 volumes' in caplog.text
  config = data_config(tmp_path)
  np.testing.assert_allclose(source[0].volume,
                             expected_slices(array[..., 0], SHUFFLED_AFFINE, config), atol=1e-3)


def test_bad_files_are_named_and_skipped_or_stop(tmp_path, caplog):
  save(tmp_path / 'good.nii.gz', hu_volume((5, 6, 7)))
  save(tmp_path / 'flat.nii', hu_volume((6, 7)))
  (tmp_path / 'broken.nii.gz').write_bytes(b'not a nifti file')
  save(tmp_path / 'thin.nii', hu_volume((9, 9, 2)), np.eye(4))  # 2 axial slices < min_slices 3
  caplog.set_level(logging.WARNING)
  source = nifti.make_source(data_config(tmp_path, on_bad_scan='skip', min_slices=3), 'train')
  messages = ' '.join(source.skipped)
  assert 'flat.nii: is 2D' in messages and 'broken.nii.gz: cannot be read' in messages
  assert 'thin.nii: has 2 axial slices, fewer than data.min_slices=3' in messages
  assert '3 of 4 NIfTI files' in caplog.text  # the summary line
  assert [os.path.basename(e.path) for e in source.entries] == ['good.nii.gz']
  with pytest.raises(DataError, match='broken.nii.gz: cannot be read'):  # the first bad file
    nifti.make_source(data_config(tmp_path, on_bad_scan='stop'), 'train')
  # By default (data.min_slices=1) a 2-slice scan is kept.
  assert len(nifti.make_source(data_config(tmp_path), 'train')) == 2


def test_nothing_usable_names_data_path(tmp_path):
  save(tmp_path / 'flat.nii', hu_volume((6, 7)))
  with pytest.raises(DataError, match=str(tmp_path)):
    nifti.make_source(data_config(tmp_path), 'train')
  with pytest.raises(DataError, match='data.path'):
    nifti.make_source(data_config(tmp_path / 'missing'), 'train')


def test_labels_csv_and_parallel_masks(tmp_path):
  images, masks = tmp_path / 'images', tmp_path / 'masks'
  for name in ('p1/a.nii.gz', 'p2/b.nii.gz'):
    save(images / name, hu_volume((5, 6, 7)))
  mask = np.zeros((5, 6, 7), dtype=np.uint8)
  mask[1:3, 2:4, 3:6] = 2
  save(masks / 'p1/a.nii.gz', mask)
  (tmp_path / 'labels.csv').write_text('file,label\np1/a.nii.gz,healthy\nb.nii.gz,tumour\n')
  config = data_config(images, labels_csv=str(tmp_path / 'labels.csv'), masks_path=str(masks))
  source = nifti.make_source(config, 'train')
  assert source.num_classes == 2
  assert [source[i].label for i in range(2)] == [0, 1]  # names numbered in sorted order
  expected, _ = orientation.canonical_slices(mask, SHUFFLED_AFFINE, 'axial')
  np.testing.assert_array_equal(source[0].mask, expected)
  assert source[1].mask is None


def test_splits_by_subfolder_or_by_hash(tmp_path):
  for split in ('train', 'val'):
    save(tmp_path / 'by_folder' / split / f'{split}.nii', hu_volume((4, 4, 4)))
  config = data_config(tmp_path / 'by_folder')
  assert [e.scan_id for e in nifti.make_source(config, 'val').entries] == ['val.nii']
  with pytest.raises(DataError, match='test/'):
    nifti.make_source(config, 'test')
  names = [f'case{i:03d}.nii' for i in range(40)]
  for name in names:
    save(tmp_path / 'flat' / name, hu_volume((4, 4, 4)))
  config = data_config(tmp_path / 'flat', val_fraction=0.25, test_fraction=0.25)
  found = {s: [e.scan_id for e in nifti.make_source(config, s).entries]
           for s in splits.SPLIT_FOLDERS}
  assert sorted(sum(found.values(), [])) == names
  assert all(found.values())
  assert all(splits.hash_split(n, config) == s for s, ns in found.items() for n in ns)
