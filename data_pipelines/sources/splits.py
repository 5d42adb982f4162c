"""Train/val/test splits for folder formats that do not carry their own (NIfTI, DICOM, PNG folders).

Either data.path holds train/, val/ and test/ subfolders (used as they are), or every scan group
(the top folder or file under data.path, see group_of) is assigned by a hash of its name, so the
split of a scan does not change when other scans are added or removed. Train is never left empty
(see assign_splits): a folder of fewer than MIN_HASHED_GROUPS groups is all train, and when the hash
puts no group of a larger folder in train, the group whose hash lies nearest train moves there.
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable, TypeVar

from data_pipelines.errors import DataError

SPLIT_FOLDERS = ('train', 'val', 'test')

# A folder with fewer scan groups than this has all of them in train: one or two scans cannot make a
# useful val or test set, and training needs at least one train scan.
MIN_HASHED_GROUPS = 3

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


def _fractions(data_config) -> tuple[float, float]:
  val, test = float(data_config.val_fraction), float(data_config.test_fraction)
  if val < 0 or test < 0 or val + test >= 1:
    raise DataError(f'config keys data.val_fraction={val} and data.test_fraction={test} must be '
                    '>= 0 and sum to less than 1')
  return val, test


def _position(group: str) -> float:
  """The group's stable point in [0, 1): [0, test) is test, [test, test + val) val, then train."""
  # surrogateescape: names that are not UTF-8 hash by their bytes instead of crashing the split.
  digest = hashlib.sha256(group.encode('utf-8', 'surrogateescape')).digest()
  return int.from_bytes(digest[:8], 'big') / 2.0**64


def hash_split(group: str, data_config) -> str:
  """'train' | 'val' | 'test' for a scan group, from data.val_fraction and data.test_fraction.

  Groups (for example a patient folder) rather than single scans are hashed so that several series
  of one patient never end up on both sides of a split. This is the rule for one group on its own;
  assign_splits applies it to a whole folder and keeps train non-empty.
  """
  val, test = _fractions(data_config)
  u = _position(group)
  if u < test:
    return 'test'
  if u < test + val:
    return 'val'
  return 'train'


def assign_splits(groups, data_config) -> dict[str, str]:
  """{group: 'train' | 'val' | 'test'} for all scan groups of a folder without split subfolders.

  Every group gets its hash_split, except that train is never left empty:
  - fewer than MIN_HASHED_GROUPS distinct groups: all of them are train;
  - otherwise, when no group hashes to train, the group with the largest hash position (the one
    nearest the train range) is moved to train; the others keep their hashed split.
  A folder of at least MIN_HASHED_GROUPS groups of which some hash to train keeps exactly the hash
  assignment, so there adding or removing scans moves no other scan between splits.
  """
  _fractions(data_config)  # checks the fractions even when the folder is small
  groups = sorted(set(groups))
  if len(groups) < MIN_HASHED_GROUPS:
    return {g: 'train' for g in groups}
  assigned = {g: hash_split(g, data_config) for g in groups}
  if 'train' not in assigned.values():
    assigned[max(groups, key=lambda g: (_position(g), g))] = 'train'
  return assigned


def find_in_split(data_config, split: str, find: Callable[[str], list[Item]],
                  group: Callable[[Item], str], what: str) -> list[Item]:
  """The items `find(folder)` lists for `split`, named `what` in the error when there are none.

  With split subfolders `find` runs on data.path/<split>; without, on data.path, keeping the items
  whose `group(item)` (see group_of) is assigned to `split` by assign_splits.
  """
  root, hashed = split_root(data_config.path, split)
  items = find(root)
  if hashed:
    assigned = assign_splits([group(item) for item in items], data_config)
    items = [item for item in items if assigned[group(item)] == split]
  if not items:
    where = ('' if not hashed else
             f' (scans are split by a hash of their top folder or file name, see '
             f'data.val_fraction / data.test_fraction; folders of fewer than {MIN_HASHED_GROUPS} '
             'scan groups are all train; give data.path train/ val/ test/ subfolders to choose)')
    raise DataError(f'data.path: no {what} in {root} for split {split!r}{where}')
  return items
