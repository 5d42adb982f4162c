"""Which slices make the two views of a pretraining example, as Grain maps (specified in
docs/data.md, "Samplers").

With n the slices of a scan and w = ceil(omega * n):
- simclr: a record is one (scan, slice) pair of a flat index over every slice of every scan, so each
  slice is equally likely however long its scan is; both views are that slice.
- perscan: i ~ U{0, ..., n - w - 1}; the views are slices i and i + w. A scan with n < 5 falls back
  to simclr: one slice of the scan, uniformly, twice.
- deepset: each view independently: i ~ U{0, ..., n - w - 1}, indices = floor(linspace(i, i + w, K)).
  A scan with n < K follows data.short_scans: 'repeat' (default) keeps these K indices, some of them
  repeated, as the reference code does, so every set holds K real slices; 'pad' takes min(n, K)
  indices by the same rule and pads the set to K with mask False (the padded images are zero).
  Leaving short scans out is the sources' job (data.min_slices), so that every method leaves out
  the same scans.

w is clamped to n - 1 (the window then covers the whole scan, i = 0) so that the range of i is never
empty; this only matters when omega * n rounds up to n (the reference code then puts every index of
a set on slice 0). ceil ignores floating-point error below 1e-9 (0.1 * 30 is 3.0000000000000004 in
floats, and means w = 3; the reference's ceil gives 4). With omega = 0.5, the reference's value,
neither difference can occur and the sets are the reference's for every n.

Chosen slices are resized, whole, to a square of the ship size S (ship_size: data.image_size, or
larger up to augment.crop_source_size, so that the device cuts its random crop from a sharper
slice), bilinear with Pillow's antialiasing, aspect not kept, quantised to uint8 (round(x * 255))
and repeated to data.channels. Evaluation slices (scan_slices, labelled_slices) are resized to
data.image_size.
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
# data.short_scans values: how a DS-SimCLR set is made from a scan with fewer than K slices.
SHORT_SCANS = ('repeat', 'pad')
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


def set_indices(num_slices: int, omega: float, size: int,
                rng: np.random.Generator) -> np.ndarray:
  """Slice indices of one DS-SimCLR set: `size` evenly spaced slices of a random window.

  Rounded down like the reference code (DavidTorpey/deepset-simclr, src/data/dataset.py, which
  truncates linspace over its window to integers), so a window of fewer than `size` slices repeats
  some of them: K = 3 on a 2-slice scan gives slices 0, 0, 1.
  """
  width = window_width(num_slices, omega)
  start = int(rng.integers(num_slices - width))
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


def ship_size(source: ScanSource, image_size: int, crop_source_size: int) -> int:
  """S, the side of the square every pretraining slice of the run is shipped at.

  S = max(image_size, min(crop_source_size, E)), E = source.max_slice_edge (the largest row or
  column count of its slices) where the source knows it without decoding a scan, else no limit.
  One S for the whole run, since a batch has one shape; the cap bounds host memory and transfer;
  E keeps S from upsampling slices beyond their native size, which would only add cost (the device
  interpolates the crop anyway). crop_source_size <= image_size ships at image_size.
  """
  edge = getattr(source, 'max_slice_edge', None)
  cap = crop_source_size if edge is None else min(crop_source_size, int(edge))
  return max(image_size, cap)


class ViewSampler:
  """Reads chosen slices of a scan and lays out one example of the batch contract.

  Records are scan indices unless a subclass says otherwise (num_records, _candidates). Subclasses
  implement _draw(candidate, rng) and call _sample(record, rng), which applies data.on_bad_scan.
  Slices are shipped at ship_size(source, image_size, crop_source_size); the default 0 ships them
  at image_size.
  """

  def __init__(self, source: ScanSource, image_size: int, channels: int, set_size: int,
               on_bad_scan: str = 'skip', crop_source_size: int = 0):
    if on_bad_scan not in ON_BAD_SCAN:
      raise DataError(f'config key data.on_bad_scan={on_bad_scan!r} is not one of {ON_BAD_SCAN}')
    self._source = source
    self._ship_size = ship_size(source, image_size, crop_source_size)
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
  def ship_size(self) -> int:
    """Side of the square slices of every example (ship_size)."""
    return self._ship_size

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
    size, channels, k = self._ship_size, self._channels, self._set_size
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
               on_bad_scan: str = 'skip', crop_source_size: int = 0):
    super().__init__(source, image_size, channels, set_size=1, on_bad_scan=on_bad_scan,
                     crop_source_size=crop_source_size)
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
               on_bad_scan: str = 'skip', crop_source_size: int = 0):
    super().__init__(source, image_size, channels, set_size=1, on_bad_scan=on_bad_scan,
                     crop_source_size=crop_source_size)
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
               set_size: int, short_scans: str = 'repeat', on_bad_scan: str = 'skip',
               crop_source_size: int = 0):
    super().__init__(source, image_size, channels, set_size=set_size, on_bad_scan=on_bad_scan,
                     crop_source_size=crop_source_size)
    if short_scans not in SHORT_SCANS:
      raise DataError(f'config key data.short_scans={short_scans!r} is not one of {SHORT_SCANS}')
    self._omega = omega
    self._short_scans = short_scans

  def _draw(self, candidate, rng) -> dict:
    scan = self._source[candidate]
    size = self._set_size
    if self._short_scans == 'pad':
      size = min(size, scan.num_slices)  # _example masks the rest of the set
    views = [set_indices(scan.num_slices, self._omega, size, rng) for _ in range(2)]
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
