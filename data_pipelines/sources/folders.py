"""Walking a data folder and vetting its files: shared by the folder sources (NIfTI, DICOM, PNG).

Folder trees come from users and may hold anything: links that loop, folders and files nobody may
read, empty files, names that are not UTF-8. walk() lists a tree without hanging or crashing on any
of these, and check_file() turns a bad file into one DataError naming it, so that the sources can
skip it (data.on_bad_scan).
"""

from __future__ import annotations

import os
import stat

from absl import logging

from data_pipelines.errors import DataError


def printable(path: str) -> str:
  """`path` as text that can always be printed: names that are not UTF-8 appear escaped."""
  try:
    path.encode('utf-8')
    return path
  except UnicodeEncodeError:
    return ascii(path)


def walk(root: str) -> list[tuple[str, list[str]]]:
  """(folder, sorted file names) for `root` and every folder below it, in sorted order.

  Hidden files and folders (names starting with '.', such as the volume cache) are left out. Links
  to folders are followed once: a folder already visited (a link loop, or two links to one folder)
  is not entered again. Folders that cannot be listed are logged and left out.
  """
  found, visited = [], set()

  def unreadable(error: OSError) -> None:
    logging.warning('cannot list folder %s (%s); it is left out', printable(str(error.filename)),
                    error.strerror)

  for folder, subfolders, names in os.walk(root, onerror=unreadable, followlinks=True):
    identity = os.stat(folder)
    visited.add((identity.st_dev, identity.st_ino))
    kept = []
    for name in sorted(subfolders):
      if name.startswith('.'):
        continue
      try:
        info = os.stat(os.path.join(folder, name))
      except OSError:
        continue  # vanished meanwhile
      if (info.st_dev, info.st_ino) not in visited:
        visited.add((info.st_dev, info.st_ino))
        kept.append(name)
    subfolders[:] = kept
    found.append((folder, sorted(n for n in names if not n.startswith('.'))))
  return found


def check_file(path: str) -> None:
  """Raises DataError naming `path` unless it is a readable, non-empty regular file, UTF-8 named.

  Names that are not UTF-8 are refused because scan ids end up in logs, JSON and TFDS features,
  which all need text.
  """
  name = printable(path)
  if name != path:
    raise DataError(f'{name}: the file name is not valid UTF-8; rename the file')
  try:
    info = os.stat(path)
  except OSError as e:  # a dangling link, a link loop (ELOOP), a file removed meanwhile
    raise DataError(f'{path}: cannot be opened ({e.strerror})') from None
  if not stat.S_ISREG(info.st_mode):
    raise DataError(f'{path}: is not a regular file')
  if info.st_size == 0:
    raise DataError(f'{path}: the file is empty')
  if not os.access(path, os.R_OK):
    raise DataError(f'{path}: permission denied (the file is not readable by this user)')
