"""Generated CT-like phantom scans, so that every part of dsset runs offline.

Each scan is a torso-like body whose outline changes smoothly along the slice axis, with lungs,
liver, spine and one contrast-enhanced target object. The scan label is the object's 3D shape:

  0 sphere  discs whose radius grows then shrinks over a few slices
  1 tube    discs of constant radius along most of the scan (a cylinder on the slice axis)
  2 disc    a flat disc present in only one or two slices
  3 box     a square prism: any slice through it shows a square

Classes 0-2 look alike in any single slice (a disc of the same intensity and overlapping radii) and
differ only across slices; class 3 can be told from one slice that cuts the object. Scans are
generated on demand from (data.phantom.seed, index) with vectorised numpy (a few milliseconds for
32 x 64 x 64), so Grain workers need no shared memory.
"""

from __future__ import annotations

import functools

import numpy as np

from data_pipelines import intensity
from data_pipelines.errors import DataError
from data_pipelines.sources.base import Scan

CLASS_NAMES = ('sphere', 'tube', 'disc', 'box')

# Hounsfield-like values, spread over the default window (-1000, 1000) so that every tissue is a
# different grey: air 0.0, lung 0.1, fat 0.45, soft tissue 0.52, liver 0.56, object 0.64, bone 0.85.
HU = {'air': -1000.0, 'lung': -800.0, 'fat': -100.0, 'soft': 40.0, 'liver': 120.0,
      'object': 280.0, 'bone': 700.0}

# Voxel mask ids (0 = outside the body).
MASK_IDS = {'body': 1, 'lung': 2, 'liver': 3, 'bone': 4, 'object': 5}

# Physical extent of every phantom, whatever its voxel grid: the spacing follows from these.
_LENGTH_MM = 160.0  # along the slice axis
_FIELD_OF_VIEW_MM = 320.0  # in plane (rows and columns)
# In-plane radius of the object in mm: the ranges of the sphere's middle slice, the tube and the
# disc are the same so that a single slice cannot tell them apart.
_OBJECT_RADIUS_MM = (16.0, 28.0)


def _split_indices(num_scans: int, num_classes: int, val_fraction: float, test_fraction: float,
                   seed: int) -> dict[str, np.ndarray]:
  """Scan indices of each split, balanced by class.

  Scan i has label i % num_classes, so consecutive blocks of num_classes scans hold one scan of every
  class; whole blocks are assigned to splits (seeded permutation) and every split stays balanced.
  """
  num_blocks = num_scans // num_classes
  order = np.random.default_rng([seed, 7]).permutation(num_blocks)
  counts = []
  for fraction in (test_fraction, val_fraction):
    # At least one block for a non-zero fraction, so that small phantoms still have val/test scans.
    counts.append(max(1, round(fraction * num_blocks)) if fraction > 0 else 0)
  num_test, num_val = counts
  if num_test + num_val >= num_blocks:
    raise DataError(
        f'config key data.phantom.num_scans={num_scans} is too small for data.val_fraction and '
        f'data.test_fraction: it needs at least {(num_test + num_val + 1) * num_classes} scans')
  blocks = {'test': order[:num_test], 'val': order[num_test:num_test + num_val],
            'train': order[num_test + num_val:]}
  return {split: np.sort((b[:, None] * num_classes + np.arange(num_classes)).ravel())
          for split, b in blocks.items()}


def _extra_indices(num_scans: int, extra_eval: int, extra_train: int,
                   num_classes: int) -> dict[str, np.ndarray]:
  """Scans added after the regular ones: extra_eval held-out val/test scans, then extra_train ones.

  The held-out scans (num_scans .. num_scans + extra_eval - 1) go half to val and half to test:
  with a few dozen test scans one scan moves accuracy by several points. Blocks of num_classes scans
  alternate between test and val, so both stay class-balanced. The extra train scans come after
  them, so that either count can change without moving the other's scans. Neither touches the
  regular splits: an evaluation can add labelled train scans that its pretraining run never saw.
  """
  if extra_eval < 0 or extra_eval % (2 * num_classes):
    raise DataError(f'config key data.phantom.extra_eval_scans={extra_eval} is invalid: expected a '
                    f'non-negative multiple of {2 * num_classes} (whole class-balanced blocks for '
                    'val and test)')
  if extra_train < 0 or extra_train % num_classes:
    raise DataError(f'config key data.phantom.extra_train_scans={extra_train} is invalid: expected '
                    f'a non-negative multiple of {num_classes} (whole class-balanced blocks)')
  blocks = (num_scans + np.arange(extra_eval).reshape(-1, num_classes))
  return {'train': num_scans + extra_eval + np.arange(extra_train),
          'test': blocks[0::2].ravel(), 'val': blocks[1::2].ravel()}


def _ellipse(y, x, centre_y, centre_x, radius_y, radius_x):
  """Boolean mask of an axis-aligned ellipse; radii may vary per slice (broadcast over D)."""
  with np.errstate(divide='ignore', invalid='ignore'):
    inside = ((y - centre_y) / radius_y) ** 2 + ((x - centre_x) / radius_x) ** 2 <= 1.0
  return inside & (radius_y > 0) & (radius_x > 0)


def generate_scan(index: int, depth: int, height: int, width: int, seed: int,
                  noise_hu: float) -> tuple[np.ndarray, np.ndarray, int]:
  """Returns (HU volume float32 [D, H, W], voxel mask uint8 [D, H, W], label) of phantom `index`."""
  rng = np.random.default_rng([seed, index])
  label = index % len(CLASS_NAMES)
  slice_mm = _LENGTH_MM / depth
  # Millimetre coordinates of voxel centres, centred on the scan; rows run anterior -> posterior.
  z = ((np.arange(depth) - (depth - 1) / 2) * slice_mm)[:, None, None]
  y = ((np.arange(height) - (height - 1) / 2) * (_FIELD_OF_VIEW_MM / height))[None, :, None]
  x = ((np.arange(width) - (width - 1) / 2) * (_FIELD_OF_VIEW_MM / width))[None, None, :]
  t = z / (_LENGTH_MM / 2)  # -1 (inferior) .. 1 (superior)

  # Patient: attributes drawn once per scan that every slice shows (body habitus, fat layer, organ
  # sizes and positions, scanner calibration), as real scans of different people differ. Without
  # them, slices far apart in one scan would be no more alike than slices of two scans, and
  # contrasting two windows of a scan (DS-SimCLR) would have nothing to learn.
  base_width, base_depth = rng.uniform(105.0, 140.0), rng.uniform(75.0, 100.0)
  centre_x = rng.uniform(-12.0, 12.0)
  fat = rng.uniform(5.0, 14.0)
  lung_size, liver_size = rng.uniform(0.8, 1.2, size=2)
  lung_gap = rng.uniform(45.0, 65.0)
  liver_x = rng.uniform(-50.0, -30.0)
  spine_radius = rng.uniform(10.0, 17.0)
  calibration = rng.uniform(-30.0, 30.0)  # HU offset of soft tissues
  noise_hu = noise_hu * rng.uniform(0.6, 1.4)

  # Body outline: semi-axes that breathe smoothly along the slice axis.
  phase = rng.uniform(0, 2 * np.pi, size=2)
  half_width = base_width + 12.0 * np.sin(np.pi * t + phase[0])
  half_depth = base_depth + 8.0 * np.sin(0.8 * np.pi * t + phase[1])
  body = _ellipse(y, x, 0.0, centre_x, half_depth, half_width)
  inner = _ellipse(y, x, 0.0, centre_x, half_depth - fat, half_width - fat)

  # Lungs above a diaphragm level, liver below it; both grow smoothly away from that level.
  diaphragm = rng.uniform(-0.3, 0.1)
  lung_scale = lung_size * np.sqrt(np.clip((t - diaphragm) / 0.4, 0.0, 1.0))
  liver_scale = liver_size * np.sqrt(np.clip((diaphragm + 0.25 - t) / 0.4, 0.0, 1.0))
  lungs = (_ellipse(y, x, -10.0, centre_x - lung_gap, 55.0 * lung_scale, 38.0 * lung_scale)
           | _ellipse(y, x, -10.0, centre_x + lung_gap, 55.0 * lung_scale, 38.0 * lung_scale))
  liver = _ellipse(y, x, 0.0, centre_x + liver_x, 50.0 * liver_scale, 65.0 * liver_scale)
  spine = (_ellipse(y, x, 60.0, centre_x, spine_radius, spine_radius)
           & np.ones_like(t, dtype=bool))

  obj = _object(label, rng, z, y, x, slice_mm)

  volume = np.full((depth, height, width), HU['air'], dtype=np.float32)
  mask = np.zeros((depth, height, width), dtype=np.uint8)
  # Painted from the outside in, so later structures overwrite earlier ones.
  for region, hu, mask_id in ((body, HU['fat'] + calibration, MASK_IDS['body']),
                              (inner, HU['soft'] + calibration, MASK_IDS['body']),
                              (lungs & inner, HU['lung'], MASK_IDS['lung']),
                              (liver & inner, HU['liver'] + calibration, MASK_IDS['liver']),
                              (spine, HU['bone'], MASK_IDS['bone']),
                              (obj, HU['object'], MASK_IDS['object'])):
    volume[region] = hu
    mask[region] = mask_id
  volume += rng.normal(0.0, noise_hu, size=volume.shape).astype(np.float32)
  return volume, mask, label


def _object(label: int, rng: np.random.Generator, z, y, x, slice_mm: float) -> np.ndarray:
  """Boolean [D, H, W] mask of the labelled object, placed inside the body."""
  radius = rng.uniform(*_OBJECT_RADIUS_MM)
  centre_y, centre_x = rng.uniform(-30.0, 30.0), rng.uniform(-50.0, 50.0)
  half_length = _LENGTH_MM / 2
  in_plane = ((y - centre_y) ** 2 + (x - centre_x) ** 2) <= radius ** 2
  name = CLASS_NAMES[label]
  if name == 'sphere':
    centre_z = rng.uniform(-half_length + radius, half_length - radius)
    return (z - centre_z) ** 2 + (y - centre_y) ** 2 + (x - centre_x) ** 2 <= radius ** 2
  if name == 'tube':
    length = rng.uniform(0.6, 0.9) * _LENGTH_MM
    centre_z = rng.uniform(-half_length + length / 2, half_length - length / 2)
    return in_plane & (np.abs(z - centre_z) <= length / 2)
  if name == 'disc':
    # Centred on a slice, thinner than two slices: it shows in one slice (two with the jitter).
    slice_centres = z.ravel()
    centre_z = rng.choice(slice_centres[2:-2]) + rng.uniform(-0.3, 0.3) * slice_mm
    return in_plane & (np.abs(z - centre_z) <= 0.6 * slice_mm)
  # Box: a square of the same area as the disc, over the same slices as a sphere would cover.
  half_side = radius * np.sqrt(np.pi) / 2
  centre_z = rng.uniform(-half_length + radius, half_length - radius)
  return ((np.abs(y - centre_y) <= half_side) & (np.abs(x - centre_x) <= half_side)
          & (np.abs(z - centre_z) <= radius))


class PhantomSource:
  """Random-access phantom scans of one split (see the module docstring for the classes)."""

  def __init__(self, data_config, split: str):
    phantom = data_config.phantom
    self._shape = (int(phantom.depth), int(phantom.height), int(phantom.width))
    if min(self._shape) < 8:
      raise DataError(f'config keys data.phantom.depth/height/width={self._shape} must all be >= 8')
    if self._shape[0] < int(data_config.min_slices):
      # Other sources leave out scans shorter than data.min_slices; here that would be all of them.
      raise DataError(f'config key data.phantom.depth={self._shape[0]} is below data.min_slices='
                      f'{data_config.min_slices}: every phantom scan would be left out')
    self._seed = int(phantom.seed)
    self._noise_hu = float(phantom.noise_hu)
    self._intensity = intensity.IntensitySettings.from_config(data_config)
    num_scans = int(phantom.num_scans)
    splits = _split_indices(num_scans, len(CLASS_NAMES), float(data_config.val_fraction),
                            float(data_config.test_fraction), self._seed)
    extra = _extra_indices(num_scans, int(phantom.extra_eval_scans),
                           int(phantom.extra_train_scans), len(CLASS_NAMES))
    self._indices = np.concatenate([splits[split], extra[split]])
    # Phantom scans are generated in Hounsfield units: data.intensity='auto' resolves to 'ct'.
    candidates = (intensity.Candidate(f'phantom_{i:05d}', functools.partial(self._hu, int(i)), 'CT')
                  for i in self._indices)
    policy = intensity.resolve_policy(
        data_config, f'phantom {split}', candidates, known_from='generated as',
        memo_key=('phantom', self._shape, self._seed, self._noise_hu,
                  tuple(int(i) for i in self._indices[:2 * intensity.SAMPLE_SCANS])))
    self._intensity = intensity.with_policy(self._intensity, policy)

  def _hu(self, phantom_index: int) -> np.ndarray:
    return generate_scan(phantom_index, *self._shape, seed=self._seed, noise_hu=self._noise_hu)[0]

  @property
  def num_classes(self) -> int:
    return len(CLASS_NAMES)

  @property
  def slice_counts(self) -> np.ndarray:
    """Slices of every scan, known without generating any (used by the simclr record space)."""
    return np.full(len(self), self._shape[0], dtype=np.int64)

  @property
  def max_slice_edge(self) -> int:
    """The larger side of every slice, known without generating a scan (samplers.ship_size)."""
    return max(self._shape[1:])

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> Scan:
    phantom_index = int(self._indices[index])
    hu, mask, label = generate_scan(phantom_index, *self._shape, seed=self._seed,
                                    noise_hu=self._noise_hu)
    name = f'phantom_{phantom_index:05d}'
    depth, height, width = self._shape
    spacing = (_LENGTH_MM / depth, _FIELD_OF_VIEW_MM / height, _FIELD_OF_VIEW_MM / width)
    return Scan(volume=intensity.normalise(hu, self._intensity, name), spacing=spacing,
                scan_id=name, label=label, mask=mask)


def make_source(data_config, split: str) -> PhantomSource:
  """The phantom scans of `split` ('train' | 'val' | 'test'), split by scan index."""
  return PhantomSource(data_config, split)
