"""Intensity policies: raw scanner values -> float32 in [0, 1].

CT is windowed in Hounsfield units (values are physical, so one fixed window fits every scan); MRI has
no absolute scale, so each scan is clipped at its own percentiles and rescaled.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipelines.errors import DataError

POLICIES = ('ct', 'mri', 'minmax')


def normalise(volume: np.ndarray, data_config, name: str) -> np.ndarray:
  """Applies data_config.intensity to a volume; `name` (file or scan) is used in error messages.

  Non-finite voxels are an error: silently clipping NaN would poison training without a trace.
  """
  volume = np.asarray(volume, dtype=np.float32)
  if not np.all(np.isfinite(volume)):
    bad = int(np.size(volume) - np.count_nonzero(np.isfinite(volume)))
    raise DataError(f'{name}: {bad} voxels are NaN or infinite')
  if volume.size and volume.min() == volume.max():
    # Checked before the policy: the CT window would map a constant scan to a flat grey.
    raise DataError(f'{name}: every voxel is {volume.flat[0]:g}; the scan is constant')
  policy = data_config.intensity
  if policy == 'ct':
    low, high = (float(v) for v in data_config.ct_window)
  elif policy == 'mri':
    low, high = (float(v) for v in np.percentile(volume, tuple(data_config.mri_percentiles)))
  elif policy == 'minmax':
    low, high = float(volume.min()), float(volume.max())
  else:
    raise DataError(f'config key data.intensity={policy!r} is not one of {POLICIES}')
  if not high > low:
    # A constant scan (or a window of zero width) carries no image; callers skip it by config.
    raise DataError(f'{name}: intensity range is empty (low={low:g}, high={high:g}); '
                    'the scan is constant or data.ct_window is degenerate')
  out = (volume - low) / (high - low)
  return np.clip(out, 0.0, 1.0, out=out)


def scale_8bit(values: np.ndarray, name: str) -> np.ndarray:
  """8-bit display values (PNG/JPEG slices, uint8 arrays) -> float32 in [0, 1], by 1/255.

  They are already windowed for display, so no policy applies; a constant scan is still an error.
  """
  if values.size and values.min() == values.max():
    raise DataError(f'{name}: every voxel is {values.flat[0]}; the scan is constant')
  return values.astype(np.float32) / np.float32(255.0)


@dataclasses.dataclass(frozen=True)
class IntensitySettings:
  """The data-config keys `normalise` reads, as plain values.

  Sources keep this instead of the ConfigDict so that they pickle cheaply into Grain workers, and
  use it in cache keys (a cached volume is only valid for the policy that produced it).
  """

  intensity: str
  ct_window: tuple[float, float]
  mri_percentiles: tuple[float, float]

  @classmethod
  def from_config(cls, data_config) -> 'IntensitySettings':
    return cls(intensity=str(data_config.intensity),
               ct_window=tuple(float(v) for v in data_config.ct_window),
               mri_percentiles=tuple(float(v) for v in data_config.mri_percentiles))
