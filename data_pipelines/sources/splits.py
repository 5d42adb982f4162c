"""Train/val/test splits for folder formats that do not carry their own (NIfTI, DICOM, PNG folders).

Either data.path holds train/, val/ and test/ subfolders (used as they are), or every scan group
(the top folder or file under data.path, see group_of) is assigned by a hash of its name, so the
split of a scan never changes when scans are added or removed.
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable, TypeVar

from data_pipelines.errors import DataError

SPLIT_FOLDERS = ('train', 'val', 'test')

Item = TypeVar('Item')


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


def group_of(relative_path: str) -> str:
  """The unit of the hash split: the first component of a path relative to data.path.

  Scans in one top folder (usually a patient) share a split; a file directly under data.path is its
  own group.
  """
  return relative_path.replace(os.sep, '/').split('/')[0]


def hash_split(group: str, data_config) -> str:
  """'train' | 'val' | 'test' for a scan group, from data.val_fraction and data.test_fraction.

  Groups (for example a patient folder) rather than single scans are hashed so that several series
  of one patient never end up on both sides of a split.
  """
  val, test = float(data_config.val_fraction), float(data_config.test_fraction)
  if val < 0 or test < 0 or val + test >= 1:
    raise DataError(f'config keys data.val_fraction={val} and data.test_fraction={test} must be '
                    '>= 0 and sum to less than 1')
  # surrogateescape: names that are not UTF-8 hash by their bytes instead of crashing the split.
  digest = hashlib.sha256(group.encode('utf-8', 'surrogateescape')).digest()
  u = int.from_bytes(digest[:8], 'big') / 2.0**64
  if u < test:
    return 'test'
  if u < test + val:
    return 'val'
  return 'train'


def find_in_split(data_config, split: str, find: Callable[[str], list[Item]],
                  group: Callable[[Item], str], what: str) -> list[Item]:
  """The items `find(folder)` lists for `split`, named `what` in the error when there are none.

  With split subfolders `find` runs on data.path/<split>; without, on data.path, keeping the items
  whose `group(item)` (see group_of) hashes to `split`.
  """
  root, hashed = split_root(data_config.path, split)
  items = find(root)
  if hashed:
    items = [item for item in items if hash_split(group(item), data_config) == split]
  if not items:
    where = '' if not hashed else ' (see data.val_fraction / data.test_fraction)'
    raise DataError(f'data.path: no {what} in {root} for split {split!r}{where}')
  return items
