"""The TFDS dataset that data_pipelines.prepare writes: one example per scan, stored as ArrayRecord.

The builder reads the per-scan files that prepare converted first
(<partial_dir>/<split>/<index>.npz) and needs neither TensorFlow nor network access. It lives in an importable module, not in a script,
because TFDS registers builders by class name and Grain workers re-import modules.
Examples keep the source's order (shuffling disabled): example keys are the source indices.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

NAME = 'dsset_scans'
VERSION = '1.0.0'


def read_partial(path: str) -> dict:
  """One converted scan as the example dict the builder writes."""
  with np.load(path, allow_pickle=False) as archive:
    example = {
        'volume': archive['volume'],
        'spacing': archive['spacing'],
        'scan_id': str(archive['scan_id']),
        'label': int(archive['label']),
    }
    if 'mask' in archive.files:
      example['mask'] = archive['mask']
  return example


class DssetScans(tfds.core.GeneratorBasedBuilder):
  """Prepared scans: volume float32 [D, H, W] in [0, 1], spacing (3,) mm, scan_id, label, mask?."""

  VERSION = tfds.core.Version(VERSION)

  def __init__(self, *, partial_dir: str, splits: list[str], has_mask: bool, num_classes: int,
               slice_counts: dict[str, list[int]], **kwargs):
    # Set before the base class runs, which builds the DatasetInfo from these.
    self._partial_dir = partial_dir
    self._splits = list(splits)
    self._has_mask = has_mask
    self._num_classes = num_classes
    self._slice_counts = slice_counts
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = {
        # zlib: volumes of [0, 1] values with flat background compress well.
        'volume': tfds.features.Tensor(shape=(None, None, None), dtype=np.float32, encoding='zlib'),
        'spacing': tfds.features.Tensor(shape=(3,), dtype=np.float64),
        'scan_id': tfds.features.Text(),
        'label': tfds.features.Scalar(dtype=np.int64),
    }
    if self._has_mask:
      features['mask'] = tfds.features.Tensor(shape=(None, None, None), dtype=np.uint8,
                                              encoding='zlib')
    return tfds.core.DatasetInfo(
        builder=self,
        description='3D scans converted by data_pipelines.prepare (dsset).',
        features=tfds.features.FeaturesDict(features),
        # Stored beside the records so that readers know scan lengths without decoding volumes.
        metadata=tfds.core.MetadataDict(num_classes=self._num_classes,
                                        slice_counts=self._slice_counts),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is local
    return {split: self._generate_examples(split) for split in self._splits}

  def _generate_examples(self, split: str):
    folder = os.path.join(self._partial_dir, split)
    for name in sorted(os.listdir(folder)):
      if name.endswith('.npz'):
        example = read_partial(os.path.join(folder, name))
        if not self._has_mask:
          example.pop('mask', None)
        yield int(name.split('.')[0]), example
