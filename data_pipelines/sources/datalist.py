"""A MONAI-style JSON datalist: {"training": [{"image": ..., "label": ...}], "validation": [...]}.

Each "image" is a NIfTI file or a folder holding one DICOM series, relative to the JSON file's
folder (or absolute). "label" is optional: an integer is the scan's class, a path is a voxel mask (NIfTI or
DICOM) in the same geometry. Splits: train = "training", val = "validation", test = "test"; a
datalist without a "test" list serves "validation" for the test split, with a warning.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

from absl import logging
import numpy as np

from data_pipelines import intensity
from data_pipelines.errors import DataError
from data_pipelines.orientation import canonical_mask
from data_pipelines.sources import labels, nifti
from data_pipelines.sources.base import Scan
from data_pipelines.sources.cached import CachedScanSource, check_slice_count, keep_usable

SPLIT_KEYS = {'train': 'training', 'val': 'validation', 'test': 'test'}


@dataclasses.dataclass(frozen=True)
class DatalistEntry:
  """One scan of the datalist: where its voxels (and mask) are and how many slices it has."""
  scan_id: str
  image: str
  mask: str | None
  label: int
  num_slices: int


def _read_datalist(path: str) -> dict:
  if not os.path.isfile(path):
    raise DataError(f'data.path: {path} is not a JSON datalist file')
  try:
    with open(path, encoding='utf-8') as f:
      datalist = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f'{path}: not a readable JSON datalist ({e})') from None
  if not isinstance(datalist, dict):
    raise DataError(f'{path}: expected a JSON object with "training"/"validation" lists')
  return datalist


def _dicom_series(folder: str, data_config):
  from data_pipelines.sources import dicom  # pydicom is needed only for DICOM entries
  series = dicom.find_series(folder, data_config, labels.Labels(), [])
  if len(series) != 1:
    raise DataError(f'{folder}: a datalist folder must hold one DICOM series, found {len(series)}')
  return series[0]


def _num_slices(path: str, data_config) -> int:
  """Slices along data.slice_axis after orientation, from headers only."""
  if os.path.isdir(path):
    return _dicom_series(path, data_config).num_slices
  if not path.endswith(nifti.EXTENSIONS):
    raise DataError(f'{path}: datalist images must be NIfTI files {nifti.EXTENSIONS} or DICOM '
                    'folders')
  return nifti.read_header(path, data_config).shape[0]


def _read_volume(path: str, data_config) -> tuple[np.ndarray, tuple[float, float, float]]:
  """(volume [D, H, W] in [0, 1], spacing) of a NIfTI file or a one-series DICOM folder."""
  if os.path.isdir(path):
    from data_pipelines.sources import dicom
    scan = dicom.load_series(_dicom_series(path, data_config), data_config)
    return scan.volume, scan.spacing
  return nifti.read_volume(path, data_config)


def _read_mask(path: str, data_config) -> np.ndarray:
  """Oriented voxel mask of a NIfTI file or a one-series DICOM folder."""
  if os.path.isdir(path):
    from data_pipelines.sources import dicom
    array, affine = dicom.series_array(_dicom_series(path, data_config))
    return canonical_mask(array, affine, data_config.slice_axis)
  return nifti.read_mask(path, data_config)


def _build(item: tuple[str, object], base: str, data_config) -> DatalistEntry:
  where, record = item
  if not isinstance(record, dict) or not isinstance(record.get('image'), str):
    raise DataError(f'{where}: each entry needs "image": a path (got {record!r})')
  image = os.path.join(base, record['image'])
  if not os.path.exists(image):
    raise DataError(f'{where}: image {image} does not exist')
  label, mask = record.get('label', -1), None
  if isinstance(label, str):
    mask, label = os.path.join(base, label), -1
    if not os.path.exists(mask):
      raise DataError(f'{where}: label mask {mask} does not exist')
  elif isinstance(label, bool) or not isinstance(label, int) or label < -1:
    raise DataError(f'{where}: "label" must be a class number >= 0 or a mask path, got {label!r}')
  num_slices = _num_slices(image, data_config)
  check_slice_count(num_slices, data_config, image)
  return DatalistEntry(scan_id=record['image'], image=image, mask=mask, label=label,
                       num_slices=num_slices)


def _candidate(entry: DatalistEntry, data_config) -> intensity.Candidate:
  """The entry as a scan data.intensity='auto' may sample (DICOM folders know their Modality)."""
  if os.path.isdir(entry.image):
    from data_pipelines.sources import dicom
    return dicom.candidate(_dicom_series(entry.image, data_config), data_config)
  return intensity.Candidate(entry.image, lambda: nifti.read_raw(entry.image, data_config)[0])


def _candidates(entries: list[DatalistEntry], data_config):
  for entry in entries:
    try:
      yield _candidate(entry, data_config)
    except DataError:
      continue  # named when the entry is read


def load_entry(entry: DatalistEntry, data_config) -> Scan:
  """Decodes one entry (and its mask) into a Scan: canonical orientation, then data.intensity."""
  volume, spacing = _read_volume(entry.image, data_config)
  mask = None
  if entry.mask:
    mask = _read_mask(entry.mask, data_config)
    if mask.shape != volume.shape:
      raise DataError(f'{entry.mask}: mask shape {mask.shape} differs from the scan {volume.shape} '
                      'after orientation')
  return Scan(volume=volume, spacing=spacing, scan_id=entry.scan_id, label=entry.label, mask=mask)


def make_source(data_config, split: str) -> CachedScanSource:
  """The entries of one split of the datalist at data.path."""
  path = data_config.path
  datalist = _read_datalist(path)
  key = SPLIT_KEYS[split]
  if key not in datalist and split == 'test' and 'validation' in datalist:
    logging.warning('%s has no "test" list; the test split uses "validation"', path)
    key = 'validation'
  if not isinstance(datalist.get(key), list):
    raise DataError(f'{path}: no "{key}" list for split {split!r} (keys: {sorted(datalist)})')
  base = os.path.dirname(os.path.abspath(path))
  items = [(f'{path} "{key}"[{i}]', record) for i, record in enumerate(datalist[key])]
  problems = []
  entries = keep_usable(items, functools.partial(_build, base=base, data_config=data_config),
                        data_config, 'datalist entries', problems)
  class_labels = [r.get('label') for lst in datalist.values() if isinstance(lst, list)
                  for r in lst if isinstance(r, dict) and type(r.get('label')) is int]
  num_classes = max(class_labels) + 1 if class_labels else 0
  sampled = entries[:2 * intensity.SAMPLE_SCANS]
  policy = intensity.resolve_policy(
      data_config, f'datalist {split}', _candidates(sampled, data_config),
      memo_key=('datalist', os.path.abspath(path), data_config.slice_axis,
                tuple(e.image for e in sampled)))
  data_config = intensity.with_policy(data_config, policy)
  return CachedScanSource(entries, functools.partial(load_entry, data_config=data_config),
                          [e.num_slices for e in entries], num_classes,
                          data_config.decoded_cache_scans, problems)
