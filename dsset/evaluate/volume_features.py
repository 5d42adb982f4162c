"""Frozen 3D-encoder features of whole scans, for the linear probe, kNN and embeddings of a 3D
encoder (configs/linear_eval3d.py).

A scan's feature is the mean, over the cubes that tile it (data_pipelines.volumes.tile_starts, on
the data.voxel_mm grid with data.volume_size cubes), of the encoder's pooled bottleneck features:
the 3D counterpart of the 2D path's mean of slice features. Only the scan level exists in 3D.
"""

from __future__ import annotations

import numpy as np

from data_pipelines import volumes
from data_pipelines.sources import make_source
from dsset import augment3d
from dsset.config_validation import ConfigError
from dsset.evaluate.features import FeatureExtractor, SplitFeatures
from dsset.models import unet3d


class VolumeFeatureExtractor(FeatureExtractor):
  """Jitted, batched 3D encoder: uint8 cubes [N, S, S, S, 1] -> float32 features [N, F]."""

  def __init__(self, config, variables: dict | None = None):
    if config.evaluate.scan_features != 'mean':
      raise ConfigError(f'config key evaluate.scan_features={config.evaluate.scan_features!r}: a '
                        "3D encoder's scan feature is the mean over the scan's cubes; use 'mean'")
    self._cube = int(config.data.volume_size)
    self._voxel_mm = float(config.data.voxel_mm)
    super().__init__(config, variables)

  def make_encoder(self, model_config):
    return unet3d.make_unet3d(model_config)

  def example_input(self, config):
    return np.zeros((1, self._cube, self._cube, self._cube, 1), np.float32)

  def normalise(self, cubes):
    return augment3d.normalise(cubes)

  def scan_tiles(self, scan) -> np.ndarray:
    """uint8 cubes [T, S, S, S, 1] tiling the whole scan."""
    steps = volumes.axis_steps(scan.spacing, self._voxel_mm)
    volume = np.asarray(scan.volume)
    return np.stack([volumes.to_uint8(volumes.cut_cube(volume, start, steps, self._cube))
                     for start in volumes.tile_starts(volume.shape, self._cube, steps)])

  def scan_inputs(self, config, split, labelled_only):
    """3D: the cubes tiling each scan."""
    source = make_source(config.data, split)
    for index in range(len(source)):
      scan = source[index]
      if not labelled_only or scan.label >= 0:
        yield self.scan_tiles(scan), scan.label, index

  def extract_levels(self, config, split, labelled_only=True):
    scan_features, labels, scan_ids = [], [], []
    for tiles, label, index in self.scan_inputs(config, split, labelled_only):
      scan_features.append(self(tiles).mean(axis=0, dtype=np.float64))
      labels.append(label)
      scan_ids.append(index)
    feats = (np.stack(scan_features).astype(np.float32) if scan_features
             else np.zeros((0, self.num_features), np.float32))
    return {'scan': SplitFeatures(feats, np.asarray(labels, np.int32),
                                  np.asarray(scan_ids, np.int32))}
