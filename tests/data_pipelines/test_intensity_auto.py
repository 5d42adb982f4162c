"""data.intensity='auto': one policy per source from its first scans, printed once with its
evidence; the low-contrast warning; the phantom keeps exactly the 'ct' mapping."""

import nibabel as nib
import numpy as np
import pydicom
import pytest

from configs import base
from data_pipelines import intensity
from data_pipelines.errors import DataError
from data_pipelines.sources import dicom, nifti, npz, phantom, png_folder
from dsset.config_validation import ConfigError, validate
import format_fixtures as ff

SHAPE = (12, 40, 40)


@pytest.fixture(autouse=True)
def fresh_process_memory(monkeypatch):
  """Every test starts as a new process would: no source resolved, no line printed yet."""
  monkeypatch.setattr(intensity, '_RESOLVED', {})
  monkeypatch.setattr(intensity, '_TOLD', set())


def _grid(shape):
  d, h, w = shape
  return np.meshgrid(np.linspace(-1, 1, d), np.linspace(-1, 1, h), np.linspace(-1, 1, w),
                     indexing='ij')


def ct_volume(shape=SHAPE, seed=0):
  """HU: air (-1000) around an elliptic body of soft tissue, with fat, two lungs and a spine."""
  rng = np.random.default_rng(seed)
  _, y, x = _grid(shape)
  volume = np.full(shape, -1000.0) + rng.normal(0, 10, shape)
  body = (y / 0.8) ** 2 + (x / 0.9) ** 2 < 1
  volume[body] = rng.normal(-100, 15, body.sum())  # fat layer
  inner = (y / 0.7) ** 2 + (x / 0.8) ** 2 < 1
  volume[inner] = rng.normal(40, 15, inner.sum())
  for centre in (-0.4, 0.4):
    lung = ((y + 0.1) / 0.35) ** 2 + ((x - centre) / 0.25) ** 2 < 1
    volume[lung] = rng.normal(-820, 30, lung.sum())
  spine = ((y - 0.5) / 0.12) ** 2 + (x / 0.12) ** 2 < 1
  volume[spine] = rng.normal(700, 50, spine.sum())
  return volume.astype(np.int16)


def t1_volume(shape=SHAPE, seed=0):
  """T1-like MRI magnitudes: noise near 0 around a head; scalp bright, white > grey > CSF."""
  rng = np.random.default_rng(seed)
  z, y, x = _grid(shape)
  r = np.sqrt((y / 0.8) ** 2 + (x / 0.7) ** 2 + (z / 1.3) ** 2)
  volume = np.abs(rng.normal(0, 15, shape))
  for radius, mean in ((1.0, 1100), (0.8, 600), (0.55, 850), (0.2, 250)):
    inside = r < radius
    volume[inside] = rng.normal(mean, 50, inside.sum())
  return np.clip(volume, 0, None).astype(np.float32)


def save(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))


def auto_lines(text):
  return [line for line in text.splitlines() if line.startswith('data.intensity=auto')]


def warnings_in(text):
  return [line for line in text.splitlines() if 'almost no contrast' in line]


def test_auto_is_the_default_and_a_valid_value():
  config = base.get_config()
  assert config.data.intensity == 'auto' and 'auto' in intensity.POLICIES
  validate(config)
  config.data.intensity = 'hounsfield'
  with pytest.raises(ConfigError, match='data.intensity'):
    validate(config)


@pytest.mark.parametrize('split', ['train', 'val'])
def test_phantom_auto_is_bitwise_the_old_ct_mapping_without_warning(split, capsys):
  auto = phantom.make_source(base.get_config().data, split)
  explicit = base.get_config().data
  explicit.intensity = 'ct'
  ct = phantom.make_source(explicit, split)
  for index in (0, 1, 2, len(auto) - 1):
    np.testing.assert_array_equal(auto[index].volume, ct[index].volume)
  err = capsys.readouterr().err
  [line] = auto_lines(err)
  assert f'CT window data.ct_window=(-1000.0, 1000.0) for the phantom {split} scans' in line
  assert 'generated as CT in 3 sampled scans' in line and 'below -900 HU' in line
  assert not warnings_in(err)


def test_voxel_rule_alone_also_calls_the_phantom_ct():
  auto, ct = base.get_config().data, base.get_config().data
  ct.intensity = 'ct'
  for index in range(4):
    hu = phantom.generate_scan(index, 16, 32, 32, seed=0, noise_hu=20.0)[0]
    np.testing.assert_array_equal(intensity.normalise(hu, auto, 'p'),
                                  intensity.normalise(hu, ct, 'p'))


@pytest.mark.parametrize('kind, make, policy, evidence', [
    ('ct', ct_volume, 'ct', 'Hounsfield-like voxels'),
    ('t1', t1_volume, 'mri', 'not Hounsfield-like'),
])
def test_nifti_auto_picks_ct_for_hu_and_mri_for_t1(tmp_path, capsys, kind, make, policy,
                                                   evidence):
  for i in range(4):
    save(tmp_path / kind / f'scan{i}.nii.gz', make(seed=i))
  source = nifti.make_source(ff.data_config(tmp_path / kind, 'nifti'), 'train')
  explicit = nifti.make_source(ff.data_config(tmp_path / kind, 'nifti', intensity=policy), 'train')
  # The same cache entries: the resolved policy, not 'auto', is in the key.
  np.testing.assert_array_equal(source[3].volume, explicit[3].volume)
  assert len(list((tmp_path / f'{kind}_cache').glob('*.npy'))) == 1
  [line] = auto_lines(capsys.readouterr().err)
  assert f'for the NIfTI train scans ({evidence}' in line and 'in 3 sampled scans' in line
  assert line.startswith('data.intensity=auto: ' + {'ct': 'CT window', 'mri': 'MRI percentile'}[
      policy])


def test_evidence_rule_on_volumes():
  def choice(volume):
    return intensity._choose([intensity._Sample.of(intensity.Candidate('v', lambda: volume),
                                                   base.get_config().data)], 'mri', '')[0]

  assert choice(ct_volume().astype(np.float32)) == 'ct'
  # A crop inside the body, no air at all: fat (about -100 HU) is evidence enough.
  assert choice(ct_volume().astype(np.float32)[:, 12:28, 4:36]) == 'ct'
  assert choice(np.random.default_rng(0).integers(-1000, 1000, SHAPE).astype(np.float32)) == 'ct'
  assert choice(t1_volume()) == 'mri'
  assert choice(t1_volume() / 1500) == 'mri'  # MRI rescaled to [0, 1]
  t1 = t1_volume()
  assert choice((t1 - t1.mean()) / t1.std()) == 'mri'  # z-scored MRI has small negatives only


def test_choice_is_deterministic_and_made_from_the_first_scans_in_sorted_order(tmp_path, capsys):
  for i in range(3):
    save(tmp_path / f'a{i}.nii', t1_volume(seed=i))
  for i in range(3):
    save(tmp_path / f'b{i}.nii', ct_volume(seed=i))
  config = ff.data_config(tmp_path, 'nifti')
  first = nifti.make_source(config, 'train')
  line = auto_lines(capsys.readouterr().err)
  intensity._RESOLVED.clear()
  intensity._TOLD.clear()
  again = nifti.make_source(config, 'train')
  assert auto_lines(capsys.readouterr().err) == line
  assert 'MRI percentile scaling' in line[0]  # a0..a2 decide; the CT files sort after them
  for index in (0, 5):
    np.testing.assert_array_equal(first[index].volume, again[index].volume)


def test_line_is_printed_once_per_source(tmp_path, capsys):
  for split in ('train', 'val', 'test'):
    for i in range(2):
      save(tmp_path / split / f'{split}{i}.nii.gz', ct_volume(seed=i))
  config = ff.data_config(tmp_path, 'nifti')
  train = nifti.make_source(config, 'train')
  for i in range(len(train)):
    train[i]
  nifti.make_source(config, 'train')  # built again (evaluations do): no second line
  nifti.make_source(config, 'val')
  lines = auto_lines(capsys.readouterr().err)
  assert len(lines) == 2
  assert 'NIfTI train scans' in lines[0] and 'NIfTI val scans' in lines[1]
  assert 'in 2 sampled scans' in lines[0]


def test_low_contrast_warning_fires_for_mri_mapped_with_ct(tmp_path, capsys):
  # MRI stored in [0, 1] (a common preprocessing): the HU window maps it to 0.5..0.5005.
  for i in range(3):
    save(tmp_path / f'mr{i}.nii.gz', t1_volume(seed=i) / 1500)
  nifti.make_source(ff.data_config(tmp_path, 'nifti', intensity='ct'), 'train')
  nifti.make_source(ff.data_config(tmp_path, 'nifti', intensity='ct'), 'train')
  err = capsys.readouterr().err
  [warning] = warnings_in(err)  # once, though built twice
  assert not auto_lines(err)  # an explicit policy is not announced
  assert "data.intensity='ct'" in warning and 'NIfTI train' in warning
  assert "Set data.intensity='mri'" in warning and 'data.ct_window' in warning
  nifti.make_source(ff.data_config(tmp_path, 'nifti'), 'train')  # auto: mri, plenty of contrast
  err = capsys.readouterr().err
  assert 'MRI percentile scaling' in auto_lines(err)[0] and not warnings_in(err)


def test_a_bad_first_scan_is_passed_over_and_still_named_when_read(tmp_path, capsys):
  bad = ct_volume().astype(np.float32)
  bad[0, 0, 0] = np.nan
  save(tmp_path / 'a.nii', bad)
  for i in range(3):
    save(tmp_path / f'b{i}.nii', t1_volume(seed=i))
  source = nifti.make_source(ff.data_config(tmp_path, 'nifti'), 'train')
  assert 'MRI percentile scaling' in auto_lines(capsys.readouterr().err)[0]
  with pytest.raises(DataError, match='a.nii: 1 voxels are NaN'):
    source[0]


def _set_modality(folder, modality):
  for path in folder.iterdir():
    ds = pydicom.dcmread(path)
    ds.Modality = modality
    ds.save_as(path)


def test_dicom_modality_decides_and_mixed_sources_are_warned(tmp_path, capsys):
  data = ff.stored_values()  # HU-like after the -1024 intercept
  ff.write_dicom_series(tmp_path / 'ct' / 'p1', data)
  ff.write_dicom_series(tmp_path / 'mr' / 'p1', data)
  _set_modality(tmp_path / 'mr' / 'p1', 'MR')
  assert dicom.make_source(ff.data_config(tmp_path / 'ct', 'dicom'), 'train') is not None
  [line] = auto_lines(capsys.readouterr().err)
  assert line.startswith('data.intensity=auto: CT window') and 'DICOM Modality CT' in line
  dicom.make_source(ff.data_config(tmp_path / 'mr', 'dicom'), 'train')
  [line] = auto_lines(capsys.readouterr().err)
  assert line.startswith('data.intensity=auto: MRI percentile') and 'DICOM Modality MR' in line
  # Any other named modality is not HU either, whatever the voxels look like.
  ff.write_dicom_series(tmp_path / 'pt' / 'p1', data)
  _set_modality(tmp_path / 'pt' / 'p1', 'PT')
  dicom.make_source(ff.data_config(tmp_path / 'pt', 'dicom'), 'train')
  [line] = auto_lines(capsys.readouterr().err)
  assert line.startswith('data.intensity=auto: MRI percentile') and 'DICOM Modality PT' in line
  ff.write_dicom_series(tmp_path / 'mr' / 'p2', data, seed=1)
  dicom.make_source(ff.data_config(tmp_path / 'mr', 'dicom'), 'train')
  [warning] = [x for x in capsys.readouterr().err.splitlines() if 'mix' in x]
  assert '1 CT and 1 MR series' in warning and 'data.intensity' in warning


def test_formats_without_units_use_minmax_unless_hu_like(tmp_path, capsys):
  sixteen = np.random.default_rng(1).integers(0, 4000, size=(4, 8, 8)).astype(np.uint16)
  ff.write_png_folder(tmp_path / 'png' / 's', sixteen)
  scan = png_folder.make_source(ff.data_config(tmp_path / 'png', 'png'), 'train')[0]
  expected = (sixteen - sixteen.min()) / float(sixteen.max() - sixteen.min())
  np.testing.assert_allclose(scan.volume, expected, atol=1e-6)
  assert 'min-max scaling' in auto_lines(capsys.readouterr().err)[0]

  def write_npz(path, images):
    np.savez(path, train_images=images, train_labels=np.zeros(len(images), np.int64))

  unit = np.random.default_rng(0).random((3, 4, 8, 8)).astype(np.float32)
  write_npz(tmp_path / 'unit.npz', unit)
  npz.make_source(ff.data_config(tmp_path / 'unit.npz', 'npz'), 'train')
  assert 'min-max scaling' in auto_lines(capsys.readouterr().err)[0]
  hu = np.stack([ct_volume(shape=(4, 16, 16), seed=i) for i in range(3)]).astype(np.float32)
  write_npz(tmp_path / 'hu.npz', hu)
  npz.make_source(ff.data_config(tmp_path / 'hu.npz', 'npz'), 'train')
  assert 'CT window' in auto_lines(capsys.readouterr().err)[0]
  write_npz(tmp_path / 'u8.npz', (unit * 255).astype(np.uint8))
  npz.make_source(ff.data_config(tmp_path / 'u8.npz', 'npz'), 'train')
  assert '8-bit images, scaled by 1/255' in auto_lines(capsys.readouterr().err)[0]
