"""Fixed-size cubes cut from scans: the host side of every 3D method (docs/data.md, "Volumes").

A cube has data.volume_size voxels per side. With data.voxel_mm = v > 0 its voxels are v mm apart
along every axis (isotropic, whatever the scan's spacing); with v = 0 they are the scan's own
voxels. Only the cube's own voxels are computed: along each axis the cube samples positions
start + k * step (k = 0..S-1) in the scan's index coordinates, step = v / spacing (1 when v = 0),
by separable linear interpolation for intensities and nearest neighbour for masks, so a 512^3 CT
costs S^3 work, not a resample of the whole scan.

Placement along each axis: the cube spans (S - 1) * step voxels of the scan. When that fits, the
start is drawn uniformly from the positions that keep the cube inside the scan (training) or
centred (evaluation); when the scan is shorter than the cube, the scan lies inside the cube, at a
uniform random offset (training) or centred, and the rest is zero (air after the CT window,
background after the MRI mapping; masks 0). Native voxels (v = 0) use whole-voxel starts, so no
interpolation blurs them.

Evaluation covers whole scans: tile_starts lays non-overlapping cubes over the scan (the last one
pulled back to end at the scan's edge, so tiles overlap only there) and the predictions of the
tiles are put back together by assemble_tiles.

Intensities arrive in [0, 1] from the source's intensity policy (the one the 2D path uses) and are
shipped as uint8 (round(x * 255)), one channel: volumes [S, S, S, 1].

Intra-inter clustering reads stacks of whole slices instead (SliceStackSampler): T consecutive
slices along the slice axis, crop-or-padded, each resized like a 2D method's slice.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np

from data_pipelines.errors import DataError
from data_pipelines.samplers import ViewSampler, resize_slice
from data_pipelines.sources.base import Scan, ScanSource


def axis_steps(spacing: Sequence[float], voxel_mm: float) -> np.ndarray:
  """Scan voxels per cube voxel along (slice, row, column): voxel_mm / spacing, or 1 when 0."""
  if voxel_mm <= 0:
    return np.ones(3)
  spacing = np.asarray(spacing, np.float64)
  if spacing.shape != (3,) or np.any(spacing <= 0):
    raise DataError(f'voxel spacing {tuple(spacing)} mm cannot be resampled to data.voxel_mm='
                    f'{voxel_mm}: it must be three positive sizes')
  return voxel_mm / spacing


def start_range(size: int, cube: int, step: float) -> tuple[float, float]:
  """Lowest and highest start (scan index of the cube's first voxel) along one axis.

  The cube spans (cube - 1) * step scan voxels; a start in [low, high] keeps it inside the scan when
  it fits, and keeps the scan inside it when it does not (then low < 0).
  """
  room = (size - 1) - (cube - 1) * step
  return (0.0, room) if room >= 0 else (room, 0.0)


def draw_starts(shape: Sequence[int], cube: int, steps: np.ndarray,
                rng: np.random.Generator | None) -> np.ndarray:
  """Start of the cube along each axis: uniform in start_range (rng) or its middle (None).

  Whole-voxel starts where the step is 1 (native voxels), so no sub-voxel shift blurs them.
  """
  starts = np.empty(3)
  for axis, (size, step) in enumerate(zip(shape, steps)):
    low, high = start_range(int(size), cube, float(step))
    start = (low + high) / 2 if rng is None else rng.uniform(low, high)
    starts[axis] = np.floor(start + 0.5) if step == 1 else start
  return starts


def _sample_axis(array: np.ndarray, axis: int, positions: np.ndarray, nearest: bool) -> np.ndarray:
  """Samples `array` at fractional index `positions` along `axis`; outside the scan -> 0.

  A position is inside when it rounds to a voxel of the scan ([-0.5, size - 0.5)); linear
  interpolation clamps to the edge voxel in the outer half-voxel, so masks and intensities agree on
  which samples are inside.
  """
  size = array.shape[axis]
  inside = (positions >= -0.5) & (positions < size - 0.5)
  shape = [1] * array.ndim
  shape[axis] = len(positions)
  if nearest:
    index = np.clip(np.floor(positions + 0.5).astype(np.int64), 0, size - 1)
    out = np.take(array, index, axis=axis)
  else:
    clamped = np.clip(positions, 0.0, size - 1)
    lower = np.floor(clamped).astype(np.int64)
    upper = np.minimum(lower + 1, size - 1)
    weight = (clamped - lower).reshape(shape).astype(np.float32)
    low, high = np.take(array, lower, axis=axis), np.take(array, upper, axis=axis)
    out = low * (1.0 - weight) + high * weight if np.any(weight) else low
  return np.where(inside.reshape(shape), out, np.zeros((), out.dtype))


def cut_cube(array: np.ndarray, starts: np.ndarray, steps: np.ndarray, cube: int,
             nearest: bool = False) -> np.ndarray:
  """The cube [S, S, S] of `array` [D, H, W] at `starts` with `steps` (scan voxels per cube voxel).

  Axis 0 first: a memory-mapped volume reads only the slices the cube needs.
  """
  out = array
  for axis in range(3):
    positions = starts[axis] + np.arange(cube) * steps[axis]
    out = _sample_axis(out, axis, positions, nearest)
  return out


def to_uint8(volume: np.ndarray) -> np.ndarray:
  """float [S, S, S] in [0, 1] -> uint8 [S, S, S, 1]."""
  return np.rint(np.clip(volume, 0.0, 1.0) * 255.0).astype(np.uint8)[..., None]


def tile_starts(shape: Sequence[int], cube: int, steps: np.ndarray) -> np.ndarray:
  """Starts [T, 3] of cubes covering the whole scan: a grid of non-overlapping cubes per axis, the
  last one moved back to end at the scan's last voxel (a scan shorter than the cube: one centred)."""
  per_axis = []
  for size, step in zip(shape, steps):
    step = float(step)
    span = (cube - 1) * step  # scan voxels one cube covers, first to last sample
    if span >= size - 1:
      starts = np.array([start_range(int(size), cube, step)[0] / 2])
    else:
      count = int(np.ceil((size - 1 - span) / (cube * step) - 1e-9)) + 1
      starts = np.minimum(np.arange(count) * cube * step, size - 1 - span)
    per_axis.append(np.floor(starts + 0.5) if step == 1 else starts)
  grid = np.meshgrid(*per_axis, indexing='ij')
  return np.stack([g.ravel() for g in grid], axis=1)


def assemble_tiles(tiles: np.ndarray, starts: np.ndarray, steps: np.ndarray) -> np.ndarray:
  """Per-tile arrays [T, S, S, S] at tile_starts -> one array over the scan on the cube's grid.

  Tile t covers grid voxels round((starts[t] - lowest start) / step) + 0..S-1; where tiles overlap
  (the last tile of an axis) the later one wins.
  """
  cube = tiles.shape[1]
  offsets = np.floor((starts - starts.min(axis=0)) / steps + 0.5).astype(int)
  out = np.zeros(tuple(offsets.max(axis=0) + cube), tiles.dtype)
  for tile, (d, h, w) in zip(tiles, offsets):
    out[d:d + cube, h:h + cube, w:w + cube] = tile
  return out


def scan_grid(scan: Scan, cube: int, voxel_mm: float, mask: bool = False) -> np.ndarray:
  """A whole scan (or its mask) on the cube's voxel grid: what the tiles, assembled, cover."""
  steps = axis_steps(scan.spacing, voxel_mm)
  array = np.asarray(scan.mask if mask else scan.volume)
  starts = tile_starts(array.shape, cube, steps)
  tiles = np.stack([cut_cube(array, s, steps, cube, nearest=mask) for s in starts])
  return assemble_tiles(tiles, starts, steps)


class SubsetSource:
  """The scans `indices` of a source, as a source (a label fraction of the train split)."""

  def __init__(self, source: ScanSource, indices: Sequence[int]):
    self._source = source
    self._indices = [int(i) for i in indices]

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> Scan:
    return self._source[self._indices[index]]

  @property
  def num_classes(self) -> int:
    return self._source.num_classes

  @property
  def entries(self):
    entries = self._source.entries  # AttributeError for sources without entries, as theirs
    return [entries[i] for i in self._indices]


class VolumeSampler(ViewSampler, grain.transforms.RandomMap):
  """3D training examples: record = scan index; one random cube of the scan.

  Example: volume uint8 [S, S, S, 1], label int32, scan_id int32, replaced int32, and with
  with_masks the cube of the voxel mask, mask uint8 [S, S, S] (a scan without one is a DataError).
  Bad scans follow data.on_bad_scan as in the 2D samplers (the next scan substitutes).
  """

  def __init__(self, source: ScanSource, volume_size: int, voxel_mm: float,
               with_masks: bool = False, on_bad_scan: str = 'skip'):
    super().__init__(source, volume_size, 1, set_size=1, on_bad_scan=on_bad_scan)
    self._cube = int(volume_size)
    self._voxel_mm = float(voxel_mm)
    self._with_masks = with_masks

  def _draw(self, candidate, rng) -> dict:
    scan = self._source[candidate]
    volume = scan.volume
    steps = axis_steps(scan.spacing, self._voxel_mm)
    starts = draw_starts(volume.shape, self._cube, steps, rng)
    example = {'volume': to_uint8(cut_cube(volume, starts, steps, self._cube)),
               'scan_id': np.int32(candidate), 'label': np.int32(scan.label)}
    if self._with_masks:
      if scan.mask is None:
        raise DataError(f'scan {scan.scan_id} has no voxel mask: 3D segmentation needs masks for '
                        'every training scan (data.masks_path, or mask paths in a datalist)')
      mask = cut_cube(np.asarray(scan.mask), starts, steps, self._cube, nearest=True)
      if mask.max(initial=0) > 255:
        raise DataError(f'scan {scan.scan_id}: mask id {int(mask.max())} is above 255')
      example['mask'] = mask.astype(np.uint8)
    return example

  def random_map(self, element: int, rng: np.random.Generator) -> dict:
    return self._sample(int(element), rng)


def stack_indices(num_slices: int, length: int, rng: np.random.Generator | None) -> np.ndarray:
  """Which scan slice fills each of the `length` positions of a slice stack: int64 [length], -1
  for a padded position.

  Crop-or-pad along the slice axis: a scan with at least `length` slices gives `length`
  consecutive ones, starting uniformly at random (rng) or centred (None, rounded down); a shorter
  scan keeps all its slices, in order, at a random offset (rng) or centred, the other positions
  padded.
  """
  room = abs(num_slices - length)  # start positions beyond the first, of crop or scan
  shift = room // 2 if rng is None else int(rng.integers(room + 1))
  if num_slices >= length:
    return np.arange(shift, shift + length)
  indices = np.full(length, -1, np.int64)
  indices[shift:shift + num_slices] = np.arange(num_slices)
  return indices


class SliceStackSampler(ViewSampler, grain.transforms.RandomMap):
  """Intra-inter clustering's examples (dsset.methods.intra_inter): record = scan index; a stack
  of data.num_slices = T slices of the scan along its slice axis (stack_indices: a random run of
  T consecutive slices, or the whole scan padded to T).

  Each slice is resized whole to image_size x image_size as the 2D samplers do (resize_slice).
  Padded positions are zero images, the value of air after the CT window and of background after
  the MRI mapping (and TorchIO's CropOrPad default, which the released code uses); repeating the
  edge slice instead would make up anatomy, and copies the masked-embedding task could predict
  trivially. `valid` marks the real slices.

  Example: slices uint8 [T, image_size, image_size, channels], valid bool [T], label int32,
  scan_id int32, replaced int32. Bad scans follow data.on_bad_scan as in the 2D samplers.
  """

  def __init__(self, source: ScanSource, num_slices: int, image_size: int, channels: int,
               on_bad_scan: str = 'skip'):
    super().__init__(source, image_size, channels, set_size=num_slices, on_bad_scan=on_bad_scan)
    self._image_size = int(image_size)

  def _draw(self, candidate, rng) -> dict:
    scan = self._source[candidate]
    indices = stack_indices(scan.num_slices, self._set_size, rng)
    valid = indices >= 0
    size, channels = self._image_size, self._channels
    slices = np.zeros((self._set_size, size, size, channels), np.uint8)
    # One read of just these slices: a memory-mapped volume reads nothing else.
    for position, image in zip(np.flatnonzero(valid), np.asarray(scan.volume[indices[valid]])):
      slices[position] = resize_slice(image, size, channels)
    return {'slices': slices, 'valid': valid, 'scan_id': np.int32(candidate),
            'label': np.int32(scan.label)}

  def random_map(self, element: int, rng: np.random.Generator) -> dict:
    return self._sample(int(element), rng)
