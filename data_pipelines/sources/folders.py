"""Walking a data folder: the one file-tree listing of the folder sources (NIfTI, DICOM, PNG)."""

from __future__ import annotations

import os


def walk(root: str) -> list[tuple[str, list[str]]]:
  """(folder, sorted file names) for `root` and every folder below it, in sorted order.

  Hidden files and folders (names starting with '.', such as the volume cache) are left out.
  """
  found = []
  for folder, subfolders, names in os.walk(root):
    subfolders[:] = sorted(d for d in subfolders if not d.startswith('.'))
    found.append((folder, sorted(n for n in names if not n.startswith('.'))))
  return found
