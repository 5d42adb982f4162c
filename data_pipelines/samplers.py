"""Which slices make the two views of a pretraining example, as Grain maps (specified in
docs/data.md, "Samplers").

With n the slices of a scan and w = ceil(omega * n):
- simclr: a record is one (scan, slice) pair of a flat index over every slice of every scan, so each
  slice is equally likely however long its scan is; both views are that slice.
- perscan: i ~ U{0, ..., n - w - 1}; the views are slices i and i + w. A scan with n < 5 falls back
  to simclr: one slice of the scan, uniformly, twice.
- deepset: each view independently: i ~ U{0, ..., n - w - 1}, indices = floor(linspace(i, i + w, K)).

w is clamped to n - 1 (the window then covers the whole scan, i = 0) so that the range of i is never
empty; this only matters when omega * n rounds up to n. ceil ignores floating-point error below 1e-9
(0.1 * 30 is 3.0000000000000004 in floats, and means w = 3). With data.variable_set_size, a scan with
n < K gives sets of n slices padded to K with mask False (the padded images are zero).

Chosen slices are resized, whole, to a square of data.image_size (bilinear with Pillow's
antialiasing, aspect not kept), quantised to uint8 (round(x * 255)) and repeated to data.channels.
Randomness comes only from the generator Grain passes to random_map, which Grain derives from (seed,
position in the repeated stream), so a restored iterator reproduces the same batches.

Scans found bad only when first decoded (DataError from source[i] or its volume: NaN voxels, a
truncated .nii.gz, ...) follow data.on_bad_scan. 'stop' lets the DataError, which names the file,
stop the run. 'skip' replaces the example deterministically by the next scan that reads (records of
scans: scans i + 1, i + 2, ... mod the number of scans; simclr: the same slice position, modulo its
length, in the next scan), drawn with the generator in the state it had for the original record, so
the substitute depends only on the record, the seed and which scans are bad: a resumed run gets the
same batches. Each bad scan is logged once per process (one warning line) and remembered, so it is
not decoded again; every example carries replaced (int32, 1 for a substitute, else 0). No readable
scan at all is a DataError naming the bad files.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence

from absl import logging
import grain
import numpy as np
from PIL import Image

from data_pipelines.errors import DataError
from data_pipelines.sources.base import Scan, ScanSource

# PS-SimCLR needs this many slices for a pair; shorter scans fall back to simclr (docs/data.md).
PERSCAN_MIN_SLICES = 5

# data.on_bad_scan values: replace an example whose scan fails to decode, or stop the run.
ON_BAD_SCAN = ('skip', 'stop')
# Bad scans named in the DataError raised when no scan at all reads.
_NAMED_WHEN_NONE_READS = 3


def window_width(num_slices: int, omega: float) -> int:
  """w = ceil(omega * n), clamped to n - 1 so that a start index always exists."""
  width = math.ceil(round(omega * num_slices, 9))
  return max(0, min(width, num_slices - 1))


def perscan_indices(num_slices: int, omega: float, rng: np.random.Generator) -> tuple[int, int]:
  """The two slice indices of a PS-SimCLR pair (equal for scans shorter than 5 slices)."""
  if num_slices < PERSCAN_MIN_SLICES:
    index = int(rng.integers(num_slices))
    return index, index
  width = window_width(num_slices, omega)
  start = int(rng.integers(num_slices - width))
  return start, start + width


def set_indices(num_slices: int, omega: float, set_size: int,
                rng: np.random.Generator) -> np.ndarray:
  """Slice indices of one DS-SimCLR set: K evenly spaced slices of a random window.

  A scan shorter than K gives min(K, n) indices (the caller pads and masks the rest).
  """
  width = window_width(num_slices, omega)
  start = int(rng.integers(num_slices - width))
  size = min(set_size, num_slices)
  return np.floor(np.linspace(start, start + width, size)).astype(np.int64)


def slice_counts(source: ScanSource) -> np.ndarray:
  """Slices of every scan: from source.slice_counts when it has one, else by reading each scan."""
  counts = getattr(source, 'slice_counts', None)
  if counts is None:
    counts = [source[i].num_slices for i in range(len(source))]
  return np.asarray(counts, dtype=np.int64)


def resize_slice(image: np.ndarray, image_size: int, channels: int) -> np.ndarray:
  """float [H0, W0] in [0, 1] -> uint8 [image_size, image_size, channels]."""
  image = np.asarray(image, dtype=np.float32)
  if image.shape != (image_size, image_size):
    image = np.asarray(Image.fromarray(image).resize((image_size, image_size),
                                                     Image.Resampling.BILINEAR))
  quantised = np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
  return np.repeat(quantised[:, :, None], channels, axis=2)


class ViewSampler:
  """Reads chosen slices of a scan and lays out one example of the batch contract.

  Records are scan indices unless a subclass says otherwise (num_records, _candidates). Subclasses
  implement _draw(candidate, rng) and call _sample(record, rng), which applies data.on_bad_scan.
  """

  def __init__(self, source: ScanSource, image_size: int, channels: int, set_size: int,
               on_bad_scan: str = 'skip'):
    if on_bad_scan not in ON_BAD_SCAN:
      raise DataError(f'config key data.on_bad_scan={on_bad_scan!r} is not one of {ON_BAD_SCAN}')
    self._source = source
    self._image_size = image_size
    self._channels = channels
    self._set_size = set_size
    self._on_bad_scan = on_bad_scan
    # Scans of this process found bad at decode time: scan index -> the DataError's message.
    self._bad: dict[int, str] = {}
    self._lock = threading.Lock()  # Grain maps from several threads

  def __getstate__(self):
    # Grain worker processes get a copy: each process finds, names and remembers bad scans itself.
    state = dict(self.__dict__)
    state['_bad'] = {}
    del state['_lock']
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  @property
  def num_records(self) -> int:
    return len(self._source)

  @property
  def bad_scans(self) -> dict[int, str]:
    """Scans this process found unreadable so far (skip mode): index -> reason."""
    return dict(self._bad)

  def _candidates(self, record: int) -> Iterator[tuple[int, object]]:
    """(scan index, what _draw needs) for the record, then its substitutes in order of preference.

    Scan-level records: scans record, record + 1, ... mod the number of scans.
    """
    count = len(self._source)
    for step in range(count):
      scan_index = (record + step) % count
      yield scan_index, scan_index

  def _draw(self, candidate, rng: np.random.Generator | None) -> dict:
    raise NotImplementedError

  def _sample(self, record: int, rng: np.random.Generator | None = None) -> dict:
    """The record's example; under on_bad_scan='skip' its deterministic substitute if it fails."""
    # Each candidate draws from the generator as it was for the record: what a substitute gets
    # does not depend on where (or whether, in this process) an earlier candidate failed.
    state = None if rng is None else rng.bit_generator.state
    for step, (scan_index, candidate) in enumerate(self._candidates(record)):
      if scan_index in self._bad:
        continue
      if step and rng is not None:
        rng.bit_generator.state = state
      try:
        example = self._draw(candidate, rng)
      except DataError as e:
        if self._on_bad_scan == 'stop':
          raise
        self._mark_bad(scan_index, e)
        continue
      example['replaced'] = np.int32(step > 0)
      return example
    reasons = list(self._bad.values())
    named = '; '.join(reasons[:_NAMED_WHEN_NONE_READS])
    more = (f' (and {len(reasons) - _NAMED_WHEN_NONE_READS} more)'
            if len(reasons) > _NAMED_WHEN_NONE_READS else '')
    raise DataError(f'no training scan can be read: all {len(reasons)} failed to decode '
                    f'(data.on_bad_scan=skip): {named}{more}')

  def _mark_bad(self, scan_index: int, error: DataError) -> None:
    """Remembers a bad scan and names it in one warning, once per process."""
    reason = str(error)
    with self._lock:
      if scan_index in self._bad:
        return
      self._bad[scan_index] = reason
    name = self._scan_name(scan_index)
    prefix = '' if name is None or name in reason else f'{name}: '
    logging.warning('data.on_bad_scan=skip: skipping training scan %d, unreadable: %s%s; examples '
                    'that draw it get the next readable scan instead (replaced=1)', scan_index,
                    prefix, reason)

  def _scan_name(self, scan_index: int) -> str | None:
    """The scan's file or id when the source lists its entries (no decode), else None."""
    try:
      entry = self._source.entries[scan_index]
    except Exception:  # sources without entries, or entries without these fields
      return None
    name = getattr(entry, 'path', None) or getattr(entry, 'scan_id', None)
    return None if name is None else str(name)

  def _example(self, scan_index: int, scan: Scan, views: Sequence[np.ndarray]) -> dict:
    size, channels, k = self._image_size, self._channels, self._set_size
    images = np.zeros((2, k, size, size, channels), dtype=np.uint8)
    mask = np.zeros((2, k), dtype=bool)
    # One read of the distinct slices of both views: a memory-mapped volume reads only these.
    needed = np.unique(np.concatenate(views))
    slices = dict(zip(needed.tolist(), np.asarray(scan.volume[needed])))
    for v, indices in enumerate(views):
      for j, index in enumerate(indices.tolist()):
        images[v, j] = resize_slice(slices[index], size, channels)
      mask[v, :len(indices)] = True
    return {'views': images, 'mask': mask, 'scan_id': np.int32(scan_index),
            'label': np.int32(scan.label)}


class SimclrSampler(ViewSampler, grain.transforms.Map):
  """simclr: record = flat slice index over all scans; both views are that slice.

  A slice of a bad scan is replaced by the same slice position (modulo its length) of the next scan.
  """

  def __init__(self, source: ScanSource, image_size: int, channels: int,
               on_bad_scan: str = 'skip'):
    super().__init__(source, image_size, channels, set_size=1, on_bad_scan=on_bad_scan)
    # offsets[s] = index of the first slice of scan s in the flat record space.
    self._offsets = np.concatenate([[0], np.cumsum(slice_counts(source))])

  @property
  def num_records(self) -> int:
    return int(self._offsets[-1])

  def locate(self, record: int) -> tuple[int, int]:
    """Flat record -> (scan index, slice index)."""
    scan_index = int(np.searchsorted(self._offsets, record, side='right')) - 1
    return scan_index, int(record - self._offsets[scan_index])

  def _candidates(self, record: int) -> Iterator[tuple[int, object]]:
    scan_index, slice_index = self.locate(record)
    count = len(self._offsets) - 1
    for step in range(count):
      scan = (scan_index + step) % count
      length = int(self._offsets[scan + 1] - self._offsets[scan])
      if length:
        yield scan, (scan, slice_index % length)

  def _draw(self, candidate, rng) -> dict:
    del rng
    scan_index, slice_index = candidate
    view = np.array([slice_index])
    return self._example(scan_index, self._source[scan_index], (view, view))

  def map(self, element: int) -> dict:
    return self._sample(int(element))


class PerScanSampler(ViewSampler, grain.transforms.RandomMap):
  """perscan: record = scan index; views are slices i and i + w (simclr under 5 slices)."""

  def __init__(self, source: ScanSource, image_size: int, channels: int, omega: float,
               on_bad_scan: str = 'skip'):
    super().__init__(source, image_size, channels, set_size=1, on_bad_scan=on_bad_scan)
    self._omega = omega

  def _draw(self, candidate, rng) -> dict:
    scan = self._source[candidate]
    first, second = perscan_indices(scan.num_slices, self._omega, rng)
    return self._example(candidate, scan, (np.array([first]), np.array([second])))

  def random_map(self, element: int, rng: np.random.Generator) -> dict:
    return self._sample(int(element), rng)


class DeepSetSampler(ViewSampler, grain.transforms.RandomMap):
  """deepset: record = scan index; two independent windows of K evenly spaced slices."""

  def __init__(self, source: ScanSource, image_size: int, channels: int, omega: float,
               set_size: int, variable_set_size: bool, on_bad_scan: str = 'skip'):
    super().__init__(source, image_size, channels, set_size=set_size, on_bad_scan=on_bad_scan)
    self._omega = omega
    self._variable_set_size = variable_set_size

  def _draw(self, candidate, rng) -> dict:
    scan = self._source[candidate]
    if scan.num_slices < self._set_size and not self._variable_set_size:
      # Sources drop such scans when they are built; this guards sources that cannot know.
      raise DataError(f'{scan.scan_id}: {scan.num_slices} slices, fewer than data.set_size='
                      f'{self._set_size} (set data.variable_set_size=True to pad)')
    views = [set_indices(scan.num_slices, self._omega, self._set_size, rng) for _ in range(2)]
    return self._example(candidate, scan, views)

  def random_map(self, element: int, rng: np.random.Generator) -> dict:
    return self._sample(int(element), rng)


def scan_slices(scan: Scan, image_size: int, channels: int) -> np.ndarray:
  """Every slice of a scan, resized: uint8 [n, image_size, image_size, channels]."""
  volume = np.asarray(scan.volume)
  return np.stack([resize_slice(image, image_size, channels) for image in volume])


def labelled_slices(scan: Scan, image_size: int, channels: int) -> Iterator[np.ndarray]:
  """Each slice of a labelled scan, resized, one at a time (the scan's label applies to each)."""
  for index in range(scan.num_slices):
    yield resize_slice(scan.volume[index], image_size, channels)
