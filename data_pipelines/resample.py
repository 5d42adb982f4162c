"""Resampling a volume to a target voxel spacing (used once, by data_pipelines.prepare).

Samples are taken at physical distances 0, t, 2t, ... from the first voxel centre along each
axis (t = the target spacing), as far as the last voxel centre, so the output spacing is exactly the
target and no sample lies outside the scan. Values: separable linear interpolation (a [0, 1] volume
stays in [0, 1]); masks: nearest neighbour (labels are never blended). An axis already at the target spacing
is left untouched, so resampling to the scan's own spacing is the identity.
"""

from __future__ import annotations

import numpy as np

from data_pipelines.errors import DataError

INTERPOLATIONS = ('linear', 'nearest')


def _positions(size: int, spacing: float, target: float) -> np.ndarray:
  """Input index coordinates of the output samples along one axis."""
  count = int(np.floor((size - 1) * spacing / target + 1e-6)) + 1
  return np.arange(count, dtype=np.float64) * (target / spacing)


def _resample_axis(volume: np.ndarray, axis: int, positions: np.ndarray,
                   interpolation: str) -> np.ndarray:
  size = volume.shape[axis]
  if interpolation == 'nearest':
    return np.take(volume, np.minimum(np.floor(positions + 0.5).astype(int), size - 1), axis=axis)
  lower = np.minimum(np.floor(positions).astype(int), size - 1)
  upper = np.minimum(lower + 1, size - 1)
  weight_shape = [1] * volume.ndim
  weight_shape[axis] = len(positions)
  weight = (positions - lower).reshape(weight_shape)
  low, high = np.take(volume, lower, axis=axis), np.take(volume, upper, axis=axis)
  return (low * (1.0 - weight) + high * weight).astype(volume.dtype)


def resample(volume: np.ndarray, spacing, target_spacing, interpolation: str = 'linear'):
  """Resamples [D, H, W] from `spacing` to `target_spacing` (mm); returns (volume, new spacing).

  An empty target_spacing keeps the volume as it is.
  """
  if interpolation not in INTERPOLATIONS:
    raise ValueError(f'interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}')
  if not target_spacing:
    return volume, tuple(float(s) for s in spacing)
  target = tuple(float(t) for t in target_spacing)
  if len(target) != 3 or min(target) <= 0:
    raise DataError(f'config key data.target_spacing={tuple(target_spacing)} must be three '
                    'positive spacings in mm (slice, row, column), or () to keep each scan\'s own')
  out = volume
  for axis, (current, wanted) in enumerate(zip(spacing, target)):
    if np.isclose(current, wanted, rtol=1e-6):
      continue
    out = _resample_axis(out, axis, _positions(out.shape[axis], float(current), wanted),
                         interpolation)
  new_spacing = tuple(t if not np.isclose(s, t, rtol=1e-6) else float(s)
                      for s, t in zip(spacing, target))
  return np.ascontiguousarray(out), new_spacing
