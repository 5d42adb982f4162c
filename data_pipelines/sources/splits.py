"""Train/val/test splits for folder formats that do not carry their own (DICOM trees, PNG folders).

Either data.path holds train/, val/ and test/ subfolders (used as they are), or every scan group is
assigned by a hash of its name, so the split of a scan never changes when
scans are added or removed.
"""

from __future__ import annotations

import hashlib
import os

from data_pipelines.errors import DataError

SPLIT_FOLDERS = ('train', 'val', 'test')


def split_root(path: str, split: str) -> tuple[str, bool]:
  """Returns (folder to scan for `split`, whether the hash split still has to be applied).

  When any of train/, val/, test/ exists under `path` the layout is taken as explicit.
  """
  if not os.path.isdir(path):
    raise DataError(f'data.path: {path} is not a folder')
  if any(os.path.isdir(os.path.join(path, name)) for name in SPLIT_FOLDERS):
    root = os.path.join(path, split)
    if not os.path.isdir(root):
      raise DataError(f'data.path: {path} has split subfolders but no {split}/ folder')
    return root, False
  return path, True


def hash_split(group: str, data_config) -> str:
  """'train' | 'val' | 'test' for a scan group, from data.val_fraction and data.test_fraction.

  Groups (for example a patient folder) rather than single scans are hashed so that several series
  of one patient never end up on both sides of a split.
  """
  val, test = float(data_config.val_fraction), float(data_config.test_fraction)
  if val < 0 or test < 0 or val + test >= 1:
    raise DataError(f'config keys data.val_fraction={val} and data.test_fraction={test} must be '
                    '>= 0 and sum to less than 1')
  digest = hashlib.sha256(group.encode('utf-8')).digest()
  u = int.from_bytes(digest[:8], 'big') / 2.0**64
  if u < test:
    return 'test'
  if u < test + val:
    return 'val'
  return 'train'
