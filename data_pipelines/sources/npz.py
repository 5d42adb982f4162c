"""A .npz file in the MedMNIST layout: <split>_images and (optional) <split>_labels per split.

<split> is train, val or test. Images are [N, D, H, W] (3D scans), [N, H, W] (2D images, each a
one-slice scan) or [N, H, W, 3] (2D colour images, converted to grey with the ITU-R 601 weights).
Labels are [N] or [N, 1] integers. Arrays have no geometry: slices stay in array order and the
spacing is data.default_spacing.

Intensity: uint8 arrays hold display values and are scaled by 1/255 (like 8-bit PNGs); any other
dtype goes through data.intensity ('auto': 'ct' when the values look like Hounsfield units, else
'minmax', since arrays carry no unit). The split's image array is read into memory once per process.
"""

from __future__ import annotations

import functools
import os
import zipfile

import numpy as np

from data_pipelines import intensity
from data_pipelines.errors import DataError
from data_pipelines.intensity import normalise, scale_8bit
from data_pipelines.sources.base import Scan
from data_pipelines.sources.cached import check_slice_count

_RGB_TO_GREY = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _read_arrays(path: str, keys: list[str]) -> dict[str, np.ndarray]:
  """The named arrays of an .npz file (missing keys are left out); DataError names the file."""
  if not os.path.isfile(path):
    raise DataError(f'data.path: {path} is not an .npz file')
  try:
    with np.load(path, allow_pickle=False) as archive:
      return {key: archive[key] for key in keys if key in archive.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise DataError(f'{path}: damaged or truncated .npz file ({type(e).__name__}: {e})') from None


def _archive_keys(path: str) -> list[str]:
  try:
    with np.load(path, allow_pickle=False) as archive:
      return list(archive.files)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise DataError(f'{path}: damaged or truncated .npz file ({type(e).__name__}: {e})') from None


def _as_volumes(images: np.ndarray, path: str, key: str) -> np.ndarray:
  """Images of any supported layout -> [N, D, H, W] (D = 1 for 2D images)."""
  if images.ndim == 3:
    return images[:, None]
  if images.ndim == 4 and images.shape[-1] == 3:
    # The weights sum to 1, so 8-bit colour stays in 0..255 and keeps the 8-bit scaling.
    return (images.astype(np.float32) @ _RGB_TO_GREY)[:, None]
  if images.ndim == 4:
    return images
  raise DataError(f'{path}: {key} has shape {images.shape}; expected [N, D, H, W], [N, H, W] or '
                  '[N, H, W, 3]')


def _as_labels(labels: np.ndarray, count: int, path: str, key: str) -> np.ndarray:
  if labels.ndim == 2 and labels.shape[1] == 1:
    labels = labels[:, 0]
  if labels.ndim != 1 or labels.shape[0] != count:
    raise DataError(f'{path}: {key} has shape {labels.shape}; expected [{count}] or [{count}, 1] '
                    '(one integer class per image; multi-label arrays are not supported)')
  if not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
    raise DataError(f'{path}: {key} must hold non-negative integers, got {labels.dtype}')
  return labels.astype(np.int64)


class NpzSource:
  """One split of a MedMNIST-layout .npz file as a random-access scan source."""

  def __init__(self, data_config, split: str):
    self._path = data_config.path
    self._split = split
    self._data_config = data_config
    self._images_key, self._labels_key = f'{split}_images', f'{split}_labels'
    keys = _archive_keys(self._path)
    if self._images_key not in keys:
      raise DataError(f'{self._path}: no array {self._images_key!r} for split {split!r} '
                      f'(the file holds {sorted(keys)})')
    arrays = _read_arrays(self._path, [self._images_key, self._labels_key])
    self._images = _as_volumes(arrays[self._images_key], self._path, self._images_key)
    self._images_shape = self._images.shape
    self._eight_bit = arrays[self._images_key].dtype == np.uint8
    check_slice_count(self._images.shape[1], data_config, f'{self._path} {self._images_key}')
    if self._labels_key in arrays:
      self._labels = _as_labels(arrays[self._labels_key], len(self._images), self._path,
                                self._labels_key)
    else:
      self._labels = np.full(len(self._images), -1, dtype=np.int64)
    # Classes are counted over every split in the file so that train, val and test agree.
    all_labels = _read_arrays(self._path, [k for k in keys if k.endswith('_labels')])
    self._num_classes = max((int(v.max()) + 1 for v in all_labels.values() if v.size), default=0)
    self._stem = os.path.splitext(os.path.basename(self._path))[0]
    # Arrays have no physical unit: 'auto' is 'ct' only for HU-like values, else 'minmax'.
    candidates = (intensity.Candidate(f'{self._path} {self._images_key}[{i}]',
                                      functools.partial(self._values, i))
                  for i in range(min(len(self), 2 * intensity.SAMPLE_SCANS)))
    stat = os.stat(self._path)
    policy = intensity.resolve_policy(
        data_config, f'npz {split}', candidates, physical_units=False,
        memo_key=('npz', os.path.abspath(self._path), stat.st_size, stat.st_mtime_ns, split))
    self._data_config = intensity.with_policy(data_config, policy)

  def _values(self, index: int) -> np.ndarray:
    values = self._images[index]
    if self._eight_bit:  # grey from colour is float in 0..255: marked 8-bit for the sample
      return np.asarray(values).astype(np.uint8)
    return np.asarray(values, np.float32)

  def __len__(self) -> int:
    return int(self._labels.shape[0])

  def __getitem__(self, index: int) -> Scan:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f'scan index {index} out of range for {len(self)} scans')
    if self._images is None:
      self._images = _as_volumes(_read_arrays(self._path, [self._images_key])[self._images_key],
                                 self._path, self._images_key)
    scan_id = f'{self._stem}-{self._split}-{index}'
    values = self._images[index]
    if self._eight_bit:
      volume = scale_8bit(values, f'{self._path} {self._images_key}[{index}]')
    else:
      volume = normalise(values, self._data_config, f'{self._path} {self._images_key}[{index}]')
    spacing = tuple(float(v) for v in self._data_config.default_spacing)
    return Scan(volume=volume, spacing=spacing, scan_id=scan_id, label=int(self._labels[index]))

  @property
  def num_classes(self) -> int:
    return self._num_classes

  @property
  def slice_counts(self) -> np.ndarray:
    return np.full(len(self), self._images_shape[1], dtype=np.int64)

  @property
  def max_slice_edge(self) -> int:
    """The larger side of every slice, from the array's shape (samplers.ship_size)."""
    return max(self._images_shape[2:])

  def __getstate__(self):
    # Workers reread the images rather than receive a pickled copy of the whole array.
    state = dict(self.__dict__)
    state['_images'] = None
    return state


def make_source(data_config, split: str) -> NpzSource:
  """The `split` arrays of the .npz file at data.path."""
  return NpzSource(data_config, split)
