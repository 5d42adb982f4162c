"""The random-access scan source interface every format implements.

A source is a sequence of scans: len(source) and source[i] -> Scan. Grain reads it directly
(grain.MapDataset.source(source)), so a source must be picklable and cheap to index repeatedly
(formats that decode slowly cache decoded volumes).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Scan:
  """One 3D scan after orientation and intensity policy.

  volume: float32 [D, H, W] in [0, 1]; axis 0 is the slice axis chosen by data.slice_axis.
  spacing: voxel size in mm along (slice, row, column).
  scan_id: a stable, human-readable name (file or folder name) used in messages and outputs.
  label: integer class of the whole scan, or -1 when the source has no labels.
  mask: optional integer voxel mask [D, H, W] (0 = background) for segmentation.
  """

  volume: np.ndarray
  spacing: tuple[float, float, float]
  scan_id: str
  label: int = -1
  mask: np.ndarray | None = None

  @property
  def num_slices(self) -> int:
    return int(self.volume.shape[0])


@runtime_checkable
class ScanSource(Protocol):
  """What samplers and the pipeline need from a source."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> Scan:
    ...

  @property
  def num_classes(self) -> int:
    """Number of scan-level classes (0 when unlabelled)."""
    ...
