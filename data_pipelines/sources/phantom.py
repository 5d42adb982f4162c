"""Generated CT-like phantom scans, so that every part of dsset runs offline.

Each scan is a torso-like body whose outline changes smoothly along the slice axis, with lungs,
liver, spine and one contrast-enhanced target object. The scan label is the object's 3D shape:

  0 sphere  discs whose radius grows then shrinks over a few slices
  1 tube    discs of constant radius along most of the scan (a cylinder on the slice axis)
  2 disc    a flat disc present in only one or two slices
  3 box     a square prism: any slice through it shows a square

Classes 0-2 look alike in any single slice (a disc of the same intensity and overlapping radii) and
differ only across slices; class 3 can be told from one slice that cuts the object.

data.phantom.anatomy='varied' (default) adds what makes scans of different patients on different
scanners differ (Variation, VARIATION_RANGES: scan length and slice thickness, habitus, table
position and rotation, organ outlines, calibration, contrast, noise, reconstruction blur, partial
volume across each slice) and 2-8 objects of the scan's class instead of one, their radius and
contrast drawn from data.phantom.object_radius_mm and object_hu; 'uniform' is the earlier phantom,
bit for bit. Scans are generated on
demand from (data.phantom.seed, index) with vectorised numpy (about 13 ms varied, 4 ms uniform for
32 x 64 x 64), so Grain workers need no shared memory.
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import numpy as np
from scipy import ndimage

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
# In-plane radius of the uniform phantom's object in mm (the varied phantom's is the config key
# data.phantom.object_radius_mm): the ranges of the sphere's middle slice, the tube and the disc are
# the same so that a single slice cannot tell them apart.
_UNIFORM_OBJECT_RADIUS_MM = (16.0, 28.0)
# Generated scans a source keeps: 256 default scans are about 170 MB.
_CACHED_SCANS = 256


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


def _organ(y, x, centre_y, centre_x, radius_y, radius_x, lobe):
  """An ellipse, joined by a second smaller one (a lobe) where `lobe` = (offset_y, offset_x, size)
  is given in units of the organ's radii: cheap shape variation that keeps every test separable."""
  organ = _ellipse(y, x, centre_y, centre_x, radius_y, radius_x)
  if lobe is None:
    return organ
  offset_y, offset_x, size = lobe
  return organ | _ellipse(y, x, centre_y + offset_y * radius_y, centre_x + offset_x * radius_x,
                          size * radius_y, size * radius_x)


@dataclasses.dataclass(frozen=True)
class Variation:
  """How one scan of the 'varied' phantom departs from the 'uniform' one (VARIATION_RANGES)."""
  length_mm: float = _LENGTH_MM  # covered along the slice axis: slice thickness = length / depth
  habitus: float = 1.0  # in-plane scale of body and organs (not of the labelled object)
  shift_mm: tuple[float, float] = (0.0, 0.0)  # table position (rows, columns)
  rotation_deg: float = 0.0  # in-plane rotation of the patient
  # A lobe joined to each lung and the liver: (offset_y, offset_x, size) in units of its radii.
  lobes: tuple[tuple[float, float, float], ...] | None = None
  gain: float = 1.0  # scanner calibration of every tissue but air: HU -> gain HU + offset
  offset_hu: float = 0.0
  object_hu: float = HU['object']  # contrast enhancement of the labelled objects
  num_objects: int = 1  # objects of the scan's class (lesions spread through the scan)
  noise_scale: float = 1.0  # times data.phantom.noise_hu (times the uniform phantom's own factor)
  blur_mm: float = 0.0  # reconstruction kernel: in-plane Gaussian sigma
  sub_slices: int = 1  # points averaged across each slice's thickness (partial volume)


# The documented ranges of every drawn variation (docs/data.md; tests check draws stay inside).
VARIATION_RANGES = {
    'length_mm': (128.0, 208.0),  # 4-6.5 mm slices at depth 32
    'habitus': (0.8, 1.25),
    'shift_mm': (-20.0, 20.0),
    'rotation_deg': (-12.0, 12.0),
    'lobe_offset': (-0.6, 0.6),
    'lobe_size': (0.3, 0.7),
    'gain': (0.85, 1.2),
    'offset_hu': (-50.0, 50.0),
    # Defaults of data.phantom.object_hu and object_radius_mm, chosen on val (docs/data.md): the
    # objects of 2026-12-06 (200-360 HU, 16-28 mm) were 1.6-2.8 px wide in radius at the quick
    # start's 32 px and no encoder, random or pretrained, read them.
    'object_hu': (400.0, 600.0),
    'object_radius_mm': (24.0, 40.0),
    'noise_scale': (0.7, 1.5),
    'blur_mm': (0.0, 3.0),
    'num_objects': (2, 8),
}
ANATOMIES = ('varied', 'uniform')


def draw_variation(index: int, seed: int, anatomy: str,
                   object_hu: tuple[float, float] = VARIATION_RANGES['object_hu']) -> Variation:
  """The variation of phantom `index`: none for 'uniform', else drawn from its own random stream
  ([seed, index, 1]), so the uniform draws (label, organs, object) are the same in both phantoms;
  the objects' HU from the range `object_hu` (data.phantom.object_hu)."""
  if anatomy == 'uniform':
    return Variation()
  if anatomy != 'varied':
    raise DataError(f'config key data.phantom.anatomy={anatomy!r} is not one of {ANATOMIES}')
  rng = np.random.default_rng([seed, index, 1])
  r = VARIATION_RANGES
  return Variation(
      length_mm=rng.uniform(*r['length_mm']), habitus=rng.uniform(*r['habitus']),
      shift_mm=tuple(rng.uniform(*r['shift_mm'], size=2)),
      rotation_deg=rng.uniform(*r['rotation_deg']),
      lobes=tuple((*rng.uniform(*r['lobe_offset'], size=2), rng.uniform(*r['lobe_size']))
                  for _ in range(3)),
      gain=rng.uniform(*r['gain']), offset_hu=rng.uniform(*r['offset_hu']),
      object_hu=rng.uniform(*object_hu), noise_scale=rng.uniform(*r['noise_scale']),
      blur_mm=rng.uniform(*r['blur_mm']), sub_slices=2,
      num_objects=int(rng.integers(r['num_objects'][0], r['num_objects'][1] + 1)))


def generate_scan(index: int, depth: int, height: int, width: int, seed: int, noise_hu: float,
                  anatomy: str = 'uniform',
                  object_radius_mm: tuple[float, float] = VARIATION_RANGES['object_radius_mm'],
                  object_hu: tuple[float, float] = VARIATION_RANGES['object_hu'],
                  ) -> tuple[np.ndarray, np.ndarray, int]:
  """Returns (HU volume float32 [D, H, W], voxel mask uint8 [D, H, W], label) of phantom `index`.

  object_radius_mm and object_hu (data.phantom.*) are the varied phantom's; 'uniform' keeps its
  own objects (16-28 mm, 280 HU), so its scans stay those of every earlier table."""
  vary = draw_variation(index, seed, anatomy, object_hu)
  if anatomy == 'uniform':
    object_radius_mm = _UNIFORM_OBJECT_RADIUS_MM
  rng = np.random.default_rng([seed, index])
  label = index % len(CLASS_NAMES)
  slice_mm = vary.length_mm / depth
  # Millimetre coordinates of voxel centres, centred on the scan; rows run anterior -> posterior.
  # Each slice is sampled at vary.sub_slices points across its thickness, averaged at the end.
  slice_centres = (np.arange(depth) - (depth - 1) / 2) * slice_mm
  sub = (np.arange(vary.sub_slices) - (vary.sub_slices - 1) / 2) * (slice_mm / vary.sub_slices)
  z = (slice_centres[:, None] + sub[None, :]).reshape(-1)[:, None, None]
  y = ((np.arange(height) - (height - 1) / 2) * (_FIELD_OF_VIEW_MM / height))[None, :, None]
  x = ((np.arange(width) - (width - 1) / 2) * (_FIELD_OF_VIEW_MM / width))[None, None, :]
  # Anatomy at a fixed scale along the slice axis, so that a longer scan covers more of it.
  t = z / (_LENGTH_MM / 2)  # -1 (inferior) .. 1 (superior) for the uniform phantom's 160 mm
  ya, xa = y / vary.habitus, x / vary.habitus  # body and organs scale with the habitus

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
  noise_hu = noise_hu * rng.uniform(0.6, 1.4) * vary.noise_scale

  # Body outline: semi-axes that breathe smoothly along the slice axis.
  phase = rng.uniform(0, 2 * np.pi, size=2)
  half_width = base_width + 12.0 * np.sin(np.pi * t + phase[0])
  half_depth = base_depth + 8.0 * np.sin(0.8 * np.pi * t + phase[1])
  body = _ellipse(ya, xa, 0.0, centre_x, half_depth, half_width)
  inner = _ellipse(ya, xa, 0.0, centre_x, half_depth - fat, half_width - fat)

  # Lungs above a diaphragm level, liver below it; both grow smoothly away from that level.
  diaphragm = rng.uniform(-0.3, 0.1)
  lung_scale = lung_size * np.sqrt(np.clip((t - diaphragm) / 0.4, 0.0, 1.0))
  liver_scale = liver_size * np.sqrt(np.clip((diaphragm + 0.25 - t) / 0.4, 0.0, 1.0))
  lobes = vary.lobes or (None,) * 3
  lungs = (_organ(ya, xa, -10.0, centre_x - lung_gap, 55.0 * lung_scale, 38.0 * lung_scale,
                  lobes[0])
           | _organ(ya, xa, -10.0, centre_x + lung_gap, 55.0 * lung_scale, 38.0 * lung_scale,
                    lobes[1]))
  liver = _organ(ya, xa, 0.0, centre_x + liver_x, 50.0 * liver_scale, 65.0 * liver_scale,
                 lobes[2])
  spine = (_ellipse(ya, xa, 60.0, centre_x, spine_radius, spine_radius)
           & np.ones_like(t, dtype=bool))

  # The object keeps its size whatever the habitus; its placement scales so it stays inside.
  obj = _object(label, rng, z, y, x, slice_centres, slice_mm, vary.length_mm, vary.habitus,
                object_radius_mm)
  if vary.num_objects > 1:
    # More objects of the same class, from a stream of their own: the label is then a pattern
    # spread through the scan (as metastases or vessels are), which their count and placement
    # vary, so the share of slices showing an object no longer gives the class away.
    more = np.random.default_rng([seed, index, 2])
    for _ in range(vary.num_objects - 1):
      obj = obj | _object(label, more, z, y, x, slice_centres, slice_mm, vary.length_mm,
                          vary.habitus, object_radius_mm)

  volume = np.full(np.broadcast_shapes(z.shape, y.shape, x.shape), HU['air'], dtype=np.float32)
  mask = np.zeros(volume.shape, dtype=np.uint8)
  # Painted from the outside in, so later structures overwrite earlier ones.
  for region, hu, mask_id in ((body, HU['fat'] + calibration, MASK_IDS['body']),
                              (inner, HU['soft'] + calibration, MASK_IDS['body']),
                              (lungs & inner, HU['lung'], MASK_IDS['lung']),
                              (liver & inner, HU['liver'] + calibration, MASK_IDS['liver']),
                              (spine, HU['bone'], MASK_IDS['bone']),
                              (obj, vary.object_hu, MASK_IDS['object'])):
    volume[region] = vary.gain * hu + vary.offset_hu
    mask[region] = mask_id
  if vary.sub_slices > 1:
    # Partial volume: a slice is the mean over its thickness; its mask keeps the highest id seen
    # (ids grow inwards, so a structure crossing part of a slice is labelled in it).
    volume = volume.reshape(depth, vary.sub_slices, height, width).mean(axis=1)
    mask = mask.reshape(depth, vary.sub_slices, height, width).max(axis=1)
  if vary.rotation_deg or any(vary.shift_mm):
    volume, mask = _position(volume, mask, vary)
  if vary.blur_mm > 0:
    sigma = (0.0, vary.blur_mm * height / _FIELD_OF_VIEW_MM, vary.blur_mm * width / _FIELD_OF_VIEW_MM)
    volume = ndimage.gaussian_filter(volume, sigma, mode='nearest')
  volume += rng.normal(0.0, noise_hu, size=volume.shape).astype(np.float32)
  return volume, mask, label


def _position(volume: np.ndarray, mask: np.ndarray, vary: Variation):
  """The patient as the table placed it: every slice rotated by vary.rotation_deg about the image
  centre and shifted by vary.shift_mm (bilinear interpolation, air outside; the mask by nearest
  neighbour). One gather per corner for all slices at once: scipy's general affine path costs
  several times the whole scan's generation."""
  depth, height, width = volume.shape
  pixel = np.array([_FIELD_OF_VIEW_MM / height, _FIELD_OF_VIEW_MM / width])
  angle = np.deg2rad(vary.rotation_deg)
  rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  centre = (np.array([height, width]) - 1) / 2
  out = np.stack(np.meshgrid(np.arange(height), np.arange(width), indexing='ij'), -1).reshape(-1, 2)
  # Output pixel o shows the patient point R^-1 (o - centre - shift) (millimetres) + centre.
  source = ((out - centre) * pixel - np.asarray(vary.shift_mm)) @ rotation / pixel + centre
  low = np.floor(source).astype(np.int64)
  frac = (source - low).astype(np.float32)
  padded = np.pad(volume, ((0, 0), (1, 1), (1, 1)), constant_values=HU['air'])
  result = np.zeros((depth, height * width), np.float32)
  for d_row, d_col, weight in ((0, 0, (1 - frac[:, 0]) * (1 - frac[:, 1])),
                               (0, 1, (1 - frac[:, 0]) * frac[:, 1]),
                               (1, 0, frac[:, 0] * (1 - frac[:, 1])),
                               (1, 1, frac[:, 0] * frac[:, 1])):
    # +1 for the padding; corners beyond the image clip onto the padding, which is air.
    row = np.clip(low[:, 0] + 1 + d_row, 0, height + 1)
    col = np.clip(low[:, 1] + 1 + d_col, 0, width + 1)
    result += padded[:, row, col] * weight
  nearest = np.rint(source).astype(np.int64)
  inside = ((nearest >= 0) & (nearest < [height, width])).all(axis=1)
  nearest = np.clip(nearest, 0, [height - 1, width - 1])
  moved_mask = np.where(inside, mask[:, nearest[:, 0], nearest[:, 1]], 0).astype(np.uint8)
  return result.reshape(depth, height, width), moved_mask.reshape(depth, height, width)


def _object(label: int, rng: np.random.Generator, z, y, x, slice_centres, slice_mm: float,
            length_mm: float, placement_scale: float,
            radius_mm: tuple[float, float]) -> np.ndarray:
  """Boolean [D, H, W] mask of the labelled object, placed inside the body."""
  radius = rng.uniform(*radius_mm)
  centre_y, centre_x = rng.uniform(-30.0, 30.0), rng.uniform(-50.0, 50.0)
  centre_y, centre_x = centre_y * placement_scale, centre_x * placement_scale
  half_length = length_mm / 2
  in_plane = ((y - centre_y) ** 2 + (x - centre_x) ** 2) <= radius ** 2
  name = CLASS_NAMES[label]
  if name == 'sphere':
    centre_z = rng.uniform(-half_length + radius, half_length - radius)
    return (z - centre_z) ** 2 + (y - centre_y) ** 2 + (x - centre_x) ** 2 <= radius ** 2
  if name == 'tube':
    length = rng.uniform(0.6, 0.9) * length_mm
    centre_z = rng.uniform(-half_length + length / 2, half_length - length / 2)
    return in_plane & (np.abs(z - centre_z) <= length / 2)
  if name == 'disc':
    # Centred on a slice, thinner than two slices: it shows in one slice (two with the jitter).
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
    self._anatomy = str(phantom.anatomy)
    self._objects = {'object_radius_mm': tuple(float(v) for v in phantom.object_radius_mm),
                     'object_hu': tuple(float(v) for v in phantom.object_hu)}
    draw_variation(0, self._seed, self._anatomy)  # an unknown anatomy fails here, naming the key
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
        memo_key=('phantom', self._shape, self._seed, self._noise_hu, self._anatomy,
                  tuple(self._objects.values()),
                  tuple(int(i) for i in self._indices[:2 * intensity.SAMPLE_SCANS])))
    self._intensity = intensity.with_policy(self._intensity, policy)
    self._recent: collections.OrderedDict[int, Scan] = collections.OrderedDict()

  def _hu(self, phantom_index: int) -> np.ndarray:
    return generate_scan(phantom_index, *self._shape, seed=self._seed, noise_hu=self._noise_hu,
                         anatomy=self._anatomy, **self._objects)[0]

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
    """Scan `index` of the split; the last _CACHED_SCANS are kept (read-only), since single-slice
    samplers generate a whole scan for every slice they draw."""
    scan = self._recent.pop(index, None) or self._generate(index)
    self._recent[index] = scan
    if len(self._recent) > _CACHED_SCANS:
      self._recent.popitem(last=False)
    return scan

  def __getstate__(self):
    # Grain workers get the recipe, not the cached megabytes.
    return {**self.__dict__, '_recent': collections.OrderedDict()}

  def _generate(self, index: int) -> Scan:
    phantom_index = int(self._indices[index])
    hu, mask, label = generate_scan(phantom_index, *self._shape, seed=self._seed,
                                    noise_hu=self._noise_hu, anatomy=self._anatomy, **self._objects)
    name = f'phantom_{phantom_index:05d}'
    depth, height, width = self._shape
    length_mm = draw_variation(phantom_index, self._seed, self._anatomy).length_mm
    spacing = (length_mm / depth, _FIELD_OF_VIEW_MM / height, _FIELD_OF_VIEW_MM / width)
    volume = intensity.normalise(hu, self._intensity, name)
    volume.flags.writeable = mask.flags.writeable = False  # shared by the cache: never edit in place
    return Scan(volume=volume, spacing=spacing, scan_id=name, label=label, mask=mask)


def make_source(data_config, split: str) -> PhantomSource:
  """The phantom scans of `split` ('train' | 'val' | 'test'), split by scan index."""
  return PhantomSource(data_config, split)
