"""A folder tree of NIfTI scans (.nii, .nii.gz) as a random-access scan source.

Layout (docs/data.md): every .nii / .nii.gz under data.path, searched recursively. If data.path has
any of the subfolders train/, val/, test/, they are the splits (files elsewhere are ignored);
otherwise a file's split follows from a hash of its path relative to data.path, with
data.val_fraction and data.test_fraction, so adding files never moves existing ones between splits.
Labels (optional) come from data.labels_csv, with a header row and columns `file` (relative path or
bare file name) and `label` (integers, or class names numbered in sorted order). Voxel masks
(optional) live under data.masks_path at the same relative path.

Headers are checked when the source is built (no voxels are read): files that cannot be read, are
2D, have more than 4 dimensions, or have fewer slices than one set needs are reported by name and
skipped with a warning or raise DataError, by data.on_bad_scan. A 4D file uses its first volume (with
a warning when it has more than one). Volumes are decoded once into a VolumeCache and then read as
memory maps, float16 in [0, 1] (half the disk and page-cache of float32, and finer than the uint8
the samplers emit).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import pathlib
import tempfile
import warnings
from collections import OrderedDict

import nibabel as nib
import numpy as np

from data_pipelines import intensity, orientation
from data_pipelines.errors import DataError
from data_pipelines.sources.base import Scan
from data_pipelines.volume_cache import VolumeCache

EXTENSIONS = ('.nii', '.nii.gz')
SPLIT_FOLDERS = ('train', 'val', 'test')
CACHE_FOLDER = '.dsset_cache'
# Bumped whenever the decoded layout changes, so that old cache entries are never read.
_CACHE_VERSION = 1
# Memory maps kept open per process: enough for hot scans, well below the kernel's mapping limit.
_MAX_OPEN_MAPS = 256


def _is_nifti(path: pathlib.Path) -> bool:
  return path.name.endswith(EXTENSIONS)


def _find_files(root: pathlib.Path) -> list[pathlib.Path]:
  """Every NIfTI file under root, sorted, skipping hidden folders (the cache among them)."""
  found = []
  for folder, subfolders, names in os.walk(root):
    subfolders[:] = sorted(d for d in subfolders if not d.startswith('.'))
    found.extend(pathlib.Path(folder) / n for n in sorted(names) if n.endswith(EXTENSIONS))
  return found


def split_of(relative_path: str, val_fraction: float, test_fraction: float) -> str:
  """The split of a file when the folder has no split subfolders (stable hash of its path)."""
  digest = hashlib.sha256(relative_path.encode()).hexdigest()
  position = int(digest[:12], 16) / 16 ** 12
  if position < test_fraction:
    return 'test'
  if position < test_fraction + val_fraction:
    return 'val'
  return 'train'


def _files_of_split(root: pathlib.Path, split: str, data_config) -> list[pathlib.Path]:
  if any((root / s).is_dir() for s in SPLIT_FOLDERS):
    folder = root / split
    return _find_files(folder) if folder.is_dir() else []
  return [p for p in _find_files(root)
          if split_of(p.relative_to(root).as_posix(), float(data_config.val_fraction),
                      float(data_config.test_fraction)) == split]


def read_labels(csv_path: str) -> tuple[dict[str, int], int]:
  """(file key -> label, number of classes) from a `file,label` CSV; see the module docstring."""
  try:
    with open(csv_path, newline='') as f:
      rows = list(csv.DictReader(f))
  except OSError as e:
    raise DataError(f'data.labels_csv={csv_path!r} cannot be read: {e}') from e
  if not rows or not {'file', 'label'} <= set(rows[0]):
    raise DataError(f'{csv_path}: needs a header row with columns "file" and "label"')
  raw = {row['file'].strip(): (row['label'] or '').strip() for row in rows}
  try:
    labels = {k: int(v) for k, v in raw.items()}
  except ValueError:
    names = sorted(set(raw.values()))
    labels = {k: names.index(v) for k, v in raw.items()}
  if min(labels.values()) < 0:
    raise DataError(f'{csv_path}: labels must be >= 0 (-1 means unlabelled)')
  return labels, max(labels.values()) + 1


class _BadScan(Exception):
  """Why one file cannot be used (collected, then reported by data.on_bad_scan)."""


def _inspect(path: pathlib.Path, slice_axis: str, min_slices: int):
  """(oriented shape, spacing, number of volumes) from the header; raises _BadScan."""
  try:
    image = nib.load(path)
    shape = image.shape
    affine = image.affine
  except Exception as e:  # nibabel raises many types for damaged files; all mean "unreadable".
    raise _BadScan(f'cannot be read as NIfTI ({type(e).__name__}: {e})') from e
  if len(shape) < 3:
    raise _BadScan(f'is {len(shape)}D (shape {shape}); scans must be 3D volumes')
  if len(shape) > 4:
    raise _BadScan(f'has {len(shape)} dimensions (shape {shape}); expected 3D or 4D')
  volumes = shape[3] if len(shape) == 4 else 1
  if volumes < 1:
    raise _BadScan(f'has an empty 4th dimension (shape {shape})')
  oriented, spacing = orientation.canonical_geometry(shape[:3], affine, slice_axis)
  if oriented[0] < min_slices:
    raise _BadScan(f'has {oriented[0]} {slice_axis} slices; a set needs data.set_size='
                   f'{min_slices} (or set data.variable_set_size=True)')
  return oriented, spacing, volumes


def _read_array(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """(3D array of the first volume, affine), decoded; raises DataError naming the file."""
  try:
    image = nib.load(path)
    proxy = image.dataobj
    array = proxy[..., 0] if len(image.shape) == 4 else proxy[...]
    return np.asarray(array), image.affine
  except Exception as e:
    raise DataError(f'{path}: cannot decode voxels ({type(e).__name__}: {e})') from e


class NiftiSource:
  """Scans of one split of a NIfTI folder (see the module docstring)."""

  def __init__(self, data_config, split: str):
    self._root = pathlib.Path(data_config.path or '')
    if not data_config.path or not self._root.is_dir():
      raise DataError(f'config key data.path={data_config.path!r} is not a folder of NIfTI scans')
    if data_config.on_bad_scan not in ('skip', 'stop'):
      raise DataError(f"config key data.on_bad_scan={data_config.on_bad_scan!r} is not 'skip' or "
                      "'stop'")
    self._slice_axis = str(data_config.slice_axis)
    if self._slice_axis not in orientation.SLICE_AXES:
      raise DataError(f'config key data.slice_axis={self._slice_axis!r} is not one of '
                      f'{orientation.SLICE_AXES}')
    self._intensity = intensity.IntensitySettings.from_config(data_config)
    self._masks_root = pathlib.Path(data_config.masks_path) if data_config.masks_path else None
    self._cache = VolumeCache(self._cache_dir(data_config),
                              int(float(data_config.cache_max_gb) * 1e9))
    labels, self._num_classes = (read_labels(data_config.labels_csv) if data_config.labels_csv
                                 else ({}, 0))
    min_slices = 1 if data_config.variable_set_size else int(data_config.set_size)

    self._files, self._geometry, self._labels, self._masks = [], [], [], []
    bad = []
    for path in _files_of_split(self._root, split, data_config):
      relative = path.relative_to(self._root).as_posix()
      try:
        shape, spacing, volumes = _inspect(path, self._slice_axis, min_slices)
        mask = self._mask_file(relative, shape)
      except _BadScan as e:
        bad.append(f'{path}: {e}')
        continue
      if volumes > 1:
        warnings.warn(f'{path}: 4D with {volumes} volumes; using the first', stacklevel=2)
      self._files.append(path)
      self._geometry.append((shape, spacing))
      self._labels.append(labels.get(relative, labels.get(path.name, -1)))
      self._masks.append(mask)
    self._report(bad, data_config, split)
    self._open_maps: OrderedDict = OrderedDict()

  @staticmethod
  def _cache_dir(data_config) -> pathlib.Path:
    if data_config.cache_dir:
      return pathlib.Path(data_config.cache_dir)
    beside = pathlib.Path(data_config.path) / CACHE_FOLDER
    if os.access(data_config.path, os.W_OK):
      return beside
    return pathlib.Path(tempfile.gettempdir()) / 'dsset_cache'

  def _mask_file(self, relative: str, shape) -> pathlib.Path | None:
    if self._masks_root is None:
      return None
    path = self._masks_root / relative
    if not path.is_file():
      return None
    try:
      mask_shape, _, _ = _inspect(path, self._slice_axis, 1)
    except _BadScan as e:
      raise _BadScan(f'its mask {path} {e}') from e
    if mask_shape != tuple(shape):
      raise _BadScan(f'its mask {path} has shape {mask_shape} after orientation, the scan {shape}')
    return path

  def _report(self, bad: list[str], data_config, split: str) -> None:
    if bad and data_config.on_bad_scan == 'stop':
      raise DataError(f'{len(bad)} unusable NIfTI file(s) (data.on_bad_scan=stop):\n  '
                      + '\n  '.join(bad))
    for line in bad:
      warnings.warn(f'skipping {line}', stacklevel=3)
    if bad:
      logging.warning('NIfTI %s split: skipped %d of %d files (data.on_bad_scan=skip)', split,
                      len(bad), len(bad) + len(self._files))
    if not self._files and (bad or split == 'train'):
      raise DataError(f'no usable NIfTI scans for split {split!r} under data.path='
                      f'{str(self._root)!r}')

  def __getstate__(self):
    # Memory maps are per process: workers open their own.
    state = self.__dict__.copy()
    state['_open_maps'] = OrderedDict()
    return state

  @property
  def num_classes(self) -> int:
    return self._num_classes

  @property
  def slice_counts(self) -> np.ndarray:
    return np.array([shape[0] for shape, _ in self._geometry], dtype=np.int64)

  @property
  def files(self) -> list[pathlib.Path]:
    return list(self._files)

  def __len__(self) -> int:
    return len(self._files)

  def __getitem__(self, index: int) -> Scan:
    path = self._files[index]
    mask_path = self._masks[index]
    return Scan(volume=self._mapped(path, 'volume'), spacing=self._geometry[index][1],
                scan_id=path.relative_to(self._root).as_posix(), label=self._labels[index],
                mask=None if mask_path is None else self._mapped(mask_path, 'mask'))

  def _mapped(self, path: pathlib.Path, kind: str) -> np.ndarray:
    """The decoded volume (or mask) of a file as a memory map, decoding it on a cache miss."""
    stat = path.stat()
    key = [_CACHE_VERSION, kind, str(path.resolve()), stat.st_size, stat.st_mtime_ns,
           self._slice_axis]
    if kind == 'volume':
      key.append([self._intensity.intensity, self._intensity.ct_window,
                  self._intensity.mri_percentiles])
    cache_key = tuple(map(str, key))
    if cache_key in self._open_maps:
      self._open_maps.move_to_end(cache_key)
      return self._open_maps[cache_key]
    build = self._decode_volume if kind == 'volume' else self._decode_mask
    array = self._cache.load(key, lambda: build(path))
    self._open_maps[cache_key] = array
    if len(self._open_maps) > _MAX_OPEN_MAPS:
      self._open_maps.popitem(last=False)
    return array

  def _decode_volume(self, path: pathlib.Path) -> np.ndarray:
    array, affine = _read_array(path)
    volume, _ = orientation.canonical_slices(array, affine, self._slice_axis)
    return intensity.normalise(volume, self._intensity, str(path)).astype(np.float16)

  def _decode_mask(self, path: pathlib.Path) -> np.ndarray:
    array, affine = _read_array(path)
    mask, _ = orientation.canonical_slices(np.rint(array).astype(np.int32), affine,
                                           self._slice_axis)
    return mask.astype(np.uint8) if mask.min() >= 0 and mask.max() < 256 else mask


def make_source(data_config, split: str) -> NiftiSource:
  """The NIfTI scans of `split` under data_config.path."""
  return NiftiSource(data_config, split)
