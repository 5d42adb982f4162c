"""Scans prepared by data_pipelines.prepare, read back through TFDS's ArrayRecord random access.

No TensorFlow is needed: tfds.builder_from_directory(...).as_data_source(split) reads the records
directly, and Grain indexes the resulting source like any other. Volumes were oriented, normalised
and resampled when they were prepared, so they are returned as stored.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.errors import DataError
from data_pipelines.sources.base import Scan
from data_pipelines.sources.cached import check_slice_count, keep_usable
from data_pipelines.tfds_builder import NAME


def dataset_dir(path: str) -> str:
  """The versioned dataset folder: `path` itself, or the one prepare wrote under it."""
  if os.path.isfile(os.path.join(path, 'dataset_info.json')):
    return path
  found = sorted(glob.glob(os.path.join(path, NAME, '*', 'dataset_info.json')))
  if not found:
    raise DataError(f'data.path: {path} holds no prepared dataset (no dataset_info.json); '
                    'create one with python -m data_pipelines.prepare')
  return os.path.dirname(found[-1])  # the newest version


class TfdsScanSource:
  """One split of a prepared dataset, without the scans shorter than one set (see below)."""

  def __init__(self, directory: str, split: str, data_config):
    try:
      builder = tfds.builder_from_directory(directory)
    except Exception as e:  # TFDS raises several types on damaged metadata
      raise DataError(
          f'{directory}: unreadable prepared dataset ({type(e).__name__}: {e})') from None
    if split not in builder.info.splits:
      raise DataError(f'{directory}: the prepared dataset has no split {split!r} '
                      f'(it has {sorted(builder.info.splits.keys())})')
    self._records = builder.as_data_source(split=split)
    self._num_classes = int(builder.info.metadata.get('num_classes', 0))
    counts = builder.info.metadata.get('slice_counts', {}).get(split)
    if counts is None or len(counts) != len(self._records):
      raise DataError(f'{directory}: slice counts of split {split!r} are missing from '
                      'metadata.json; prepare the dataset again')
    # prepare keeps every scan; which are too short for a set is decided now, like other sources.
    problems = []
    self._indices = keep_usable(
        range(len(counts)),
        lambda i: _checked(i, counts[i], data_config, f'{directory} {split}[{i}]'),
        data_config, 'prepared scans', problems)
    self._slice_counts = np.asarray([counts[i] for i in self._indices], dtype=np.int64)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> Scan:
    example = self._records[self._indices[int(index)]]
    scan_id = example['scan_id']
    mask = example.get('mask')
    return Scan(
        volume=np.asarray(example['volume'], dtype=np.float32),
        spacing=tuple(float(v) for v in example['spacing']),
        scan_id=scan_id.decode('utf-8') if isinstance(scan_id, bytes) else str(scan_id),
        label=int(example['label']),
        mask=None if mask is None else np.asarray(mask))

  @property
  def num_classes(self) -> int:
    return self._num_classes

  @property
  def slice_counts(self) -> np.ndarray:
    return self._slice_counts.copy()


def _checked(index: int, num_slices: int, data_config, name: str) -> int:
  check_slice_count(num_slices, data_config, name)
  return index


def make_source(data_config, split: str) -> TfdsScanSource:
  """The `split` of the dataset prepared at data.path (the --out folder of prepare)."""
  return TfdsScanSource(dataset_dir(data_config.path), split, data_config)
