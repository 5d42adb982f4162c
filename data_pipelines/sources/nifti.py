"""A folder tree of NIfTI scans (.nii, .nii.gz) as a random-access scan source.

Layout (docs/data.md): every .nii / .nii.gz under data.path, searched recursively (hidden folders
skipped). Splits follow data_pipelines.sources.splits (train/ val/ test/ subfolders, else a stable
hash of the top folder or file), labels data_pipelines.sources.labels (data.labels_csv). Voxel masks
(optional) live under data.masks_path at the same path relative to data.path.

Headers are checked when the source is built (no voxels are read, see read_header); bad files are
skipped or stop the run by data.on_bad_scan. A 4D file uses its first volume (with a warning when
it has more than one). Volumes are decoded on first use (read_volume) into a VolumeCache and then
read as memory maps, float16 in [0, 1] (half the disk and page cache of float32, and finer than the
uint8 the samplers emit).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import tempfile

from absl import logging
import nibabel as nib
import numpy as np

from data_pipelines import intensity, orientation
from data_pipelines.errors import DataError
from data_pipelines.sources import folders, splits
from data_pipelines.sources import labels as labels_lib
from data_pipelines.sources.base import Scan
from data_pipelines.sources.cached import CachedScanSource, check_slice_count, keep_usable
from data_pipelines.volume_cache import VolumeCache

EXTENSIONS = ('.nii', '.nii.gz')
CACHE_FOLDER = '.dsset_cache'
# Bumped whenever the decoded layout changes, so that old cache entries are never read.
_CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class NiftiHeader:
  """What a NIfTI header says about the scan after orientation (no voxel read)."""
  shape: tuple[int, int, int]  # (slices, rows, columns) along data.slice_axis
  spacing: tuple[float, float, float]  # mm, same axes
  num_volumes: int  # 4th dimension (1 for 3D files)


def _raw_pixdim(path: str, header_class) -> np.ndarray:
  """pixdim[1:4] as stored: nibabel's checked header silently turns 0 into 1 and -x into x."""
  try:
    with nib.openers.ImageOpener(path) as f:
      header = header_class.from_fileobj(f, check=False)
    return np.asarray(header['pixdim'][1:4], dtype=np.float64)
  except Exception as e:  # the same damage nib.load reports, met again
    raise DataError(f'{path}: cannot be read as NIfTI ({type(e).__name__}: {e})') from None


def _load(path: str, data_config):
  """The nibabel image of a NIfTI file whose header passed every check that needs no voxel."""
  folders.check_file(path)
  try:
    image = nib.load(path)
    shape, affine = image.shape, image.affine
  except Exception as e:  # nibabel raises many types for damaged files; all mean "unreadable".
    raise DataError(f'{path}: cannot be read as NIfTI ({type(e).__name__}: {e})') from None
  if len(shape) < 3:
    raise DataError(f'{path}: is {len(shape)}D (shape {shape}); scans must be 3D volumes')
  if len(shape) > 4:
    raise DataError(f'{path}: has {len(shape)} dimensions (shape {shape}); expected 3D or 4D')
  if min(shape) < 1:
    raise DataError(f'{path}: has an empty dimension (shape {shape})')
  # Refused before any voxel is allocated: a damaged or hostile header can declare terabytes.
  voxels = int(np.prod(shape[:3], dtype=np.float64))
  if voxels > int(data_config.max_voxels):
    raise DataError(f'{path}: declares {voxels} voxels (shape {shape}), more than '
                    f'data.max_voxels={int(data_config.max_voxels)}')
  zooms = _raw_pixdim(path, type(image.header))
  if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
    raise DataError(f'{path}: voxel spacing (pixdim) {tuple(zooms.tolist())} must be positive')
  if not np.all(np.isfinite(affine)) or not abs(np.linalg.det(affine[:3, :3])) > 0:
    raise DataError(f'{path}: the voxel-to-world affine is degenerate or not finite')
  if not orientation.orientable(affine):
    raise DataError(f'{path}: the voxel-to-world affine is too ill-conditioned to orient the scan')
  return image


def read_header(path: str, data_config) -> NiftiHeader:
  """Checks and reads the header of a NIfTI file; DataError names the file for anything unusable.

  Refused: unreadable, empty or damaged files, 2D or 5D+ shapes, empty dimensions, more than
  data.max_voxels voxels, zero/negative/non-finite spacing and degenerate affines.
  """
  image = _load(path, data_config)
  shape = image.shape
  oriented, spacing = orientation.canonical_geometry(shape[:3], image.affine,
                                                     data_config.slice_axis)
  return NiftiHeader(shape=oriented, spacing=spacing,
                     num_volumes=shape[3] if len(shape) == 4 else 1)


def _decode(path: str, data_config) -> tuple[np.ndarray, np.ndarray]:
  """(float32 3D array of the first volume, voxel-to-RAS affine); DataError names the file."""
  image = _load(path, data_config)
  try:
    proxy = image.dataobj
    array = proxy[..., 0] if len(image.shape) == 4 else proxy[...]
    # Inside the try: RGB or complex datatypes fail here rather than later.
    return np.asarray(array, dtype=np.float32), image.affine
  except Exception as e:  # damaged or truncated data surfaces as many exception types
    raise DataError(f'{path}: cannot decode voxels ({type(e).__name__}: {e})') from None


def read_raw(path: str, data_config) -> tuple[np.ndarray, tuple[float, float, float]]:
  """(values float32 [D, H, W] as stored, spacing) of a NIfTI file: decode and orient only."""
  array, affine = _decode(path, data_config)
  return orientation.canonical_slices(array, affine, data_config.slice_axis)


def read_volume(path: str, data_config) -> tuple[np.ndarray, tuple[float, float, float]]:
  """(volume float32 [D, H, W] in [0, 1], spacing) of a NIfTI file: decode, orient, normalise.

  The first volume of a 4D file; data.slice_axis and data.intensity apply (sources pass the policy
  they resolved; see intensity.resolve_policy). DataError names the file.
  """
  volume, spacing = read_raw(path, data_config)
  return intensity.normalise(volume, data_config, str(path)), spacing


def read_mask(path: str, data_config) -> np.ndarray:
  """The voxel mask in a NIfTI file, oriented like read_volume (integer ids)."""
  array, affine = _decode(path, data_config)
  return orientation.canonical_mask(array, affine, data_config.slice_axis)


@dataclasses.dataclass(frozen=True)
class NiftiEntry:
  """One usable file of the split, as found when the source was built."""
  path: str
  scan_id: str  # path relative to the split folder
  spacing: tuple[float, float, float]
  num_slices: int
  label: int
  mask: str | None
  # Cache keys, taken once when the source is built: a file replaced during a run is read as it was.
  # volume_key names the file and slice axis; load_entry adds the intensity policy the source chose.
  volume_key: tuple[str, ...]
  mask_key: tuple[str, ...] | None


def _cache_key(path: str, kind: str, data_config) -> tuple[str, ...]:
  """The file's identity and slice axis; a volume's full key adds _intensity_key."""
  stat = os.stat(path)
  key = [_CACHE_VERSION, kind, str(pathlib.Path(path).resolve()), stat.st_size, stat.st_mtime_ns,
         data_config.slice_axis]
  return tuple(map(str, key))


def _intensity_key(data_config) -> tuple[str]:
  """The policy a cached volume was normalised with (the resolved one, never 'auto')."""
  settings = intensity.IntensitySettings.from_config(data_config)
  return (str([settings.intensity, settings.ct_window, settings.mri_percentiles]),)


def _cache_dir(data_config) -> str:
  if data_config.cache_dir:
    return data_config.cache_dir
  if os.access(data_config.path, os.W_OK):
    return os.path.join(data_config.path, CACHE_FOLDER)
  return os.path.join(tempfile.gettempdir(), 'dsset_cache')


def _mask_of(path: str, header: NiftiHeader, data_config) -> str | None:
  """The mask file parallel to `path` under data.masks_path, checked against the scan's shape."""
  if not data_config.masks_path:
    return None
  mask = os.path.join(data_config.masks_path, os.path.relpath(path, data_config.path))
  if not os.path.isfile(mask):
    return None
  try:
    mask_shape = read_header(mask, data_config).shape
  except DataError as e:
    raise DataError(f'{path}: its mask is unusable: {e}') from None
  if mask_shape != header.shape:
    raise DataError(f'{path}: its mask {mask} has shape {mask_shape} after orientation, the scan '
                    f'{header.shape}')
  return mask


def _build(candidate: tuple[str, str], labels: labels_lib.Labels, data_config) -> NiftiEntry:
  path, scan_id = candidate
  header = read_header(path, data_config)
  check_slice_count(header.shape[0], data_config, path)
  if header.num_volumes > 1:
    logging.warning('%s: 4D with %d volumes; using the first', path, header.num_volumes)
  mask = _mask_of(path, header, data_config)
  return NiftiEntry(
      path=path, scan_id=scan_id, spacing=header.spacing, num_slices=header.shape[0],
      label=labels.label_for(scan_id, os.path.basename(scan_id)), mask=mask,
      volume_key=_cache_key(path, 'volume', data_config),
      mask_key=None if mask is None else _cache_key(mask, 'mask', data_config))


def load_entry(entry: NiftiEntry, cache: VolumeCache, data_config) -> Scan:
  """The entry's scan: volume (and mask) as read-only memory maps, decoded on a cache miss."""
  volume = cache.load(entry.volume_key + _intensity_key(data_config),
                      lambda: read_volume(entry.path, data_config)[0].astype(np.float16))
  mask = None
  if entry.mask is not None:
    mask = cache.load(entry.mask_key, lambda: read_mask(entry.mask, data_config))
  return Scan(volume=volume, spacing=entry.spacing, scan_id=entry.scan_id, label=entry.label,
              mask=mask)


def resolve_intensity(entries: list[NiftiEntry], data_config, where: str):
  """`data_config` with the data.intensity the source's first scans call for (intensity.py)."""
  sampled = entries[:2 * intensity.SAMPLE_SCANS]
  candidates = (intensity.Candidate(e.scan_id, functools.partial(_raw_values, e.path, data_config))
                for e in sampled)
  policy = intensity.resolve_policy(
      data_config, where, candidates,
      memo_key=('nifti', tuple(e.volume_key for e in sampled)))
  return intensity.with_policy(data_config, policy)


def _raw_values(path: str, data_config) -> np.ndarray:
  return read_raw(path, data_config)[0]


def find_files(root: str) -> list[tuple[str, str]]:
  """(path, path relative to root) of every NIfTI file under root, sorted."""
  return [(os.path.join(folder, name), os.path.relpath(os.path.join(folder, name), root))
          for folder, names in folders.walk(root) for name in names if name.endswith(EXTENSIONS)]


def make_source(data_config, split: str) -> CachedScanSource:
  """The NIfTI scans of `split` under data.path."""
  labels = labels_lib.labels_from_config(data_config)
  candidates = splits.find_in_split(data_config, split, find_files,
                                    lambda c: splits.group_of(c[1]), f'NIfTI files {EXTENSIONS}')
  problems = []
  build = functools.partial(_build, labels=labels, data_config=data_config)
  entries = keep_usable(candidates, build, data_config, f'NIfTI files for split {split!r}',
                        problems)
  data_config = resolve_intensity(entries, data_config, f'NIfTI {split}')
  cache = VolumeCache(_cache_dir(data_config), int(float(data_config.cache_max_gb) * 1e9))
  return CachedScanSource(entries, functools.partial(load_entry, cache=cache,
                                                     data_config=data_config),
                          [e.num_slices for e in entries], labels.num_classes,
                          data_config.decoded_cache_scans, problems)
