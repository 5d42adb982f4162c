"""A random-access source over scans that are slow to decode, and the bad-scan policy at build time.

DICOM series and PNG folders cost tens of milliseconds per scan to decode, and samplers come back to
the same scan often, so each process keeps the last data.decoded_cache_scans decoded scans in memory
(a bounded LRU). The cache is per process and not pickled: Grain workers start with an empty one.
"""

from __future__ import annotations

import collections
from typing import Callable, Generic, Sequence, TypeVar

from absl import logging
import numpy as np

from data_pipelines.errors import DataError
from data_pipelines.sources.base import Scan

Entry = TypeVar('Entry')

ON_BAD_SCAN = ('skip', 'stop')


class CachedScanSource(Generic[Entry]):
  """len/getitem over `entries`, decoding each with `load(entry) -> Scan` (a picklable callable)."""

  def __init__(self, entries: Sequence[Entry], load: Callable[[Entry], Scan],
               slice_counts: Sequence[int], num_classes: int, cache_scans: int,
               skipped: Sequence[str] = ()):
    if cache_scans < 0:
      raise DataError(f'config key data.decoded_cache_scans={cache_scans} must be >= 0')
    self._entries = list(entries)
    self._load = load
    self._slice_counts = np.asarray(slice_counts, dtype=np.int64)
    self._num_classes = int(num_classes)
    self._skipped = list(skipped)
    self._cache_scans = int(cache_scans)
    self._cache: collections.OrderedDict[int, Scan] = collections.OrderedDict()

  def __len__(self) -> int:
    return len(self._entries)

  def __getitem__(self, index: int) -> Scan:
    index = int(index)
    if not 0 <= index < len(self._entries):
      raise IndexError(f'scan index {index} out of range for {len(self._entries)} scans')
    if index in self._cache:
      self._cache.move_to_end(index)
      return self._cache[index]
    scan = self._load(self._entries[index])
    if self._cache_scans:
      self._cache[index] = scan
      if len(self._cache) > self._cache_scans:
        self._cache.popitem(last=False)
    return scan

  @property
  def num_classes(self) -> int:
    return self._num_classes

  @property
  def slice_counts(self) -> np.ndarray:
    """Slices of every scan, known from headers (samplers need them without decoding)."""
    return self._slice_counts.copy()

  @property
  def entries(self) -> list[Entry]:
    return list(self._entries)

  @property
  def skipped(self) -> list[str]:
    """Why each input left out when the source was built was bad (for prepare's summary)."""
    return list(self._skipped)

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_cache'] = collections.OrderedDict()
    return state


def keep_usable(candidates: Sequence, build: Callable[..., Entry], data_config, what: str,
                problems: list[str]) -> list[Entry]:
  """Builds an entry from every candidate (`build` raises DataError) and applies data.on_bad_scan.

  'skip' logs each bad scan and a summary, appends the messages to `problems` and keeps the rest;
  'stop' raises the first error. Nothing usable at all is an error naming data.path.
  """
  if data_config.on_bad_scan not in ON_BAD_SCAN:
    raise DataError(f'config key data.on_bad_scan={data_config.on_bad_scan!r} is not one of '
                    f'{ON_BAD_SCAN}')
  usable, bad = [], []
  for candidate in candidates:
    try:
      entry = build(candidate)
    except DataError as e:
      if data_config.on_bad_scan == 'stop':
        raise
      logging.warning('skipping a bad scan: %s', e)
      bad.append(str(e))
      continue
    usable.append(entry)
  problems.extend(bad)
  if bad:
    logging.warning('%d of %d %s skipped (data.on_bad_scan=skip); first: %s', len(bad),
                    len(candidates), what, bad[0])
  if not usable:
    detail = f'; {len(bad)} bad, first: {bad[0]}' if bad else ''
    raise DataError(f'data.path: no usable {what} in {data_config.path}{detail}')
  return usable


def check_slice_count(num_slices: int, data_config, name: str) -> None:
  """A scan with fewer than data.min_slices slices is left out.

  Every source applies it whatever the method, so that with data.min_slices = K SimCLR and
  PS-SimCLR (K = 1) leave out the scans DS-SimCLR could not fill a set from, and a comparison trains
  every method on the same scans.
  """
  needed = int(data_config.min_slices)
  if num_slices < needed:
    raise DataError(f'{name}: has {num_slices} {data_config.slice_axis} slices, fewer than '
                    f'data.min_slices={needed}')
