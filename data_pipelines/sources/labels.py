"""Scan-level labels from a CSV file: one `name,label` row per scan (an optional header row)."""

from __future__ import annotations

import csv
import os

from data_pipelines.errors import DataError


def read_labels_csv(path: str) -> dict[str, int]:
  """Reads `name,label` rows into {name: int}; a first row without an integer label is a header.

  Names are matched against scan ids by the sources (see label_for), so they are kept as written,
  minus surrounding spaces.
  """
  if not os.path.isfile(path):
    raise DataError(f'data.labels_csv: {path} is not a file')
  labels = {}
  with open(path, newline='', encoding='utf-8') as f:
    for line_number, row in enumerate(csv.reader(f), start=1):
      if not row or not ''.join(row).strip():
        continue
      if len(row) < 2:
        raise DataError(f'{path}:{line_number}: expected "name,label", got {row!r}')
      name, value = row[0].strip(), row[1].strip()
      try:
        label = int(value)
      except ValueError:
        if line_number == 1:
          continue  # header row
        raise DataError(f'{path}:{line_number}: label {value!r} is not an integer') from None
      if label < 0:
        raise DataError(f'{path}:{line_number}: label {label} is negative')
      if name in labels and labels[name] != label:
        raise DataError(f'{path}:{line_number}: {name!r} is listed twice with different labels')
      labels[name] = label
  return labels


def labels_from_config(data_config) -> dict[str, int]:
  """The labels named by data.labels_csv, or {} when the key is empty."""
  return read_labels_csv(data_config.labels_csv) if data_config.labels_csv else {}


def label_for(labels: dict[str, int], *names: str) -> int:
  """The label of the first of `names` found in `labels` (scan id, then looser names), else -1."""
  for name in names:
    if name in labels:
      return labels[name]
  return -1


def num_classes(labels: dict[str, int]) -> int:
  """Classes are 0..max label, counted over the whole CSV so that every split agrees."""
  return max(labels.values()) + 1 if labels else 0
