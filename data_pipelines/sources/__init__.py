"""Registry of scan sources: data.source name -> module with make_source(data_config, split).

Modules are imported on first use so that optional dependencies (pydicom, tensorflow-datasets) are
needed only by the formats that use them.
"""

from __future__ import annotations

import importlib

from data_pipelines.errors import DataError
from data_pipelines.sources.base import Scan, ScanSource

SOURCES = {
    'phantom': 'data_pipelines.sources.phantom',
    'nifti': 'data_pipelines.sources.nifti',
    'dicom': 'data_pipelines.sources.dicom',
    'png': 'data_pipelines.sources.png_folder',
    'npz': 'data_pipelines.sources.npz',
    'datalist': 'data_pipelines.sources.datalist',
    'tfds': 'data_pipelines.sources.tfds_source',
}

SPLITS = ('train', 'val', 'test')


def make_source(data_config, split: str = 'train') -> ScanSource:
  """Builds the source named by data_config.source for one split ('train' | 'val' | 'test')."""
  if data_config.source not in SOURCES:
    raise DataError(
        f'config key data.source={data_config.source!r} is not one of {sorted(SOURCES)}')
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
  module = importlib.import_module(SOURCES[data_config.source])
  return module.make_source(data_config, split)


__all__ = ['DataError', 'SOURCES', 'SPLITS', 'Scan', 'ScanSource', 'make_source']
