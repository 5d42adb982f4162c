"""A size-capped folder of decoded volumes as .npy files, opened as read-only memory maps.

Decompressing a .nii.gz costs about as much as reading every voxel, so a sampler that wants three
slices would pay for the whole scan on every sample. Decoded (oriented, normalised) volumes are
written here once; later samples map the file and read only the slices they index.

Entries are named by a hash of everything that determines their content (the caller's key: file
path, size, modification time and the decoding settings), written to a temporary name and moved into
place with os.replace, so that a crash or two workers decoding the same scan never leave a partial
file. When the folder grows past its cap, the least recently opened entries are deleted (recency is
the file's modification time, refreshed on every open).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import uuid
from collections.abc import Callable

import numpy as np


class VolumeCache:
  """Decoded arrays keyed by JSON-serialisable key parts; see the module docstring."""

  def __init__(self, directory: str | os.PathLike, max_bytes: int):
    self.directory = pathlib.Path(directory)
    self.max_bytes = int(max_bytes)

  def path_for(self, key: object) -> pathlib.Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return self.directory / f'{digest}.npy'

  def load(self, key: object, build: Callable[[], np.ndarray]) -> np.ndarray:
    """The cached array for `key` as a read-only memory map, built and stored on a miss."""
    path = self.path_for(key)
    try:
      array = np.load(path, mmap_mode='r')
      os.utime(path)
      return array
    except (FileNotFoundError, ValueError, OSError):
      # Missing, or evicted/replaced by another process between the listing and the open.
      pass
    array = build()
    self.directory.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f'{path.stem}.{os.getpid()}.{uuid.uuid4().hex}.tmp')
    with open(temporary, 'wb') as f:
      np.save(f, array)
    os.replace(temporary, path)
    self._evict(keep=path)
    return np.load(path, mmap_mode='r')

  def _evict(self, keep: pathlib.Path) -> None:
    entries = []
    for entry in self.directory.glob('*.npy'):
      try:
        stat = entry.stat()
      except FileNotFoundError:
        continue  # removed by another process meanwhile
      entries.append((stat.st_mtime, stat.st_size, entry))
    total = sum(size for _, size, _ in entries)
    for _, size, entry in sorted(entries, key=lambda e: e[0]):
      if total <= self.max_bytes:
        break
      if entry == keep:
        continue  # the entry just written stays even when it alone exceeds the cap
      entry.unlink(missing_ok=True)
      total -= size
    if total > self.max_bytes:
      logging.warning('volume cache %s holds %.2f GB, above data.cache_max_gb (one volume is '
                      'larger than the cap)', self.directory, total / 1e9)
