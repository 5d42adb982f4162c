"""Scan-level labels from data.labels_csv, the one label format of every folder source.

The CSV has two columns, `name,label`, and an optional header row (a first row whose second cell is
`label`). `name` is a scan id (a path relative to the split folder), a bare file or folder name, or
either without its NIfTI extension (.nii.gz / .nii). Labels are either all integers >= 0 (class ids
as written) or all class names, numbered 0, 1, ... in sorted name order. Scans not listed get -1.
"""

from __future__ import annotations

import csv
import dataclasses
import os

from data_pipelines.errors import DataError

# Stripped from CSV names and scan names alike, so `case1`, `case1.nii` and `case1.nii.gz` match.
_STRIPPED_EXTENSIONS = ('.nii.gz', '.nii')


def _key(name: str) -> str:
  name = name.strip()
  for extension in _STRIPPED_EXTENSIONS:
    if name.endswith(extension):
      return name[:-len(extension)]
  return name


@dataclasses.dataclass(frozen=True)
class Labels:
  """Labels by name (extension stripped) and the class names when the CSV used names."""

  by_name: dict[str, int] = dataclasses.field(default_factory=dict)
  class_names: tuple[str, ...] = ()

  @property
  def num_classes(self) -> int:
    """Classes are 0..max label, counted over the whole CSV so that every split agrees."""
    return max(self.by_name.values()) + 1 if self.by_name else 0

  def label_for(self, *names: str) -> int:
    """The label of the first of `names` in the CSV (scan id first, then looser names), else -1."""
    for name in names:
      label = self.by_name.get(_key(name))
      if label is not None:
        return label
    return -1


def _rows(path: str) -> list[tuple[int, str, str]]:
  """(line number, name, label text) of every non-blank row, header left out."""
  try:
    with open(path, newline='', encoding='utf-8') as f:
      rows = list(enumerate(csv.reader(f), start=1))
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise DataError(f'data.labels_csv: {path} cannot be read ({type(e).__name__}: {e})') from None
  out = []
  rows = [(line, row) for line, row in rows if ''.join(row).strip()]
  for index, (line, row) in enumerate(rows):
    if len(row) != 2 or not row[0].strip() or not row[1].strip():
      raise DataError(f'{path}:{line}: expected two non-empty cells "name,label", got {row!r}')
    if index == 0 and row[1].strip().lower() == 'label':
      continue  # the optional header row
    out.append((line, row[0], row[1].strip()))
  return out


def _as_integer(text: str) -> int | None:
  try:
    return int(text)
  except ValueError:
    return None


def read_labels_csv(path: str) -> Labels:
  """Reads data.labels_csv (format in the module docstring); DataError names the file and line."""
  if not os.path.isfile(path):
    raise DataError(f'data.labels_csv: {path} is not a file')
  rows = _rows(path)
  if not rows:
    raise DataError(f'data.labels_csv: {path} holds no "name,label" rows')
  integers = _as_integer(rows[0][2]) is not None
  for line, _, text in rows:
    if (_as_integer(text) is not None) != integers:
      kind = 'integers' if integers else 'class names'
      raise DataError(f'{path}:{line}: label {text!r} is not like the first row\'s; labels must be '
                      f'all {kind}')
    if integers and int(text) < 0:
      raise DataError(f'{path}:{line}: label {text} is negative')
  class_names = () if integers else tuple(sorted({text for _, _, text in rows}))
  by_name, first_line = {}, {}
  for line, name, text in rows:
    key = _key(name)
    if key in by_name:
      raise DataError(f'{path}:{line}: {name.strip()!r} is listed again (first on line '
                      f'{first_line[key]})')
    by_name[key] = int(text) if integers else class_names.index(text)
    first_line[key] = line
  return Labels(by_name=by_name, class_names=class_names)


def labels_from_config(data_config) -> Labels:
  """The labels named by data.labels_csv (no labels when the key is empty)."""
  return read_labels_csv(data_config.labels_csv) if data_config.labels_csv else Labels()
