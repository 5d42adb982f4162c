"""PNG/JPEG slice folders (the DeepSet SimCLR reference layout): one folder per scan.

Slice files are named <anything>-<int>.png (or .jpg/.jpeg) and ordered by that integer, so
slice-10 follows slice-9. Image files have no patient geometry: slices stay in file order and the
spacing is data.default_spacing.

Intensity: 8-bit images already hold display values, so they are scaled by 1/255 whatever
data.intensity says (the reference code did the same); 16-bit and 32-bit images hold raw values and
go through data.intensity ('auto': 'ct' when they look like Hounsfield units, else 'minmax', since
image files carry no unit). Colour images are converted to grey (PIL's 'L' luminance).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re

import numpy as np
from PIL import Image

from data_pipelines import intensity
from data_pipelines.errors import DataError
from data_pipelines.intensity import normalise, scale_8bit
from data_pipelines.sources import labels as labels_lib
from data_pipelines.sources import folders, splits
from data_pipelines.sources.base import Scan
from data_pipelines.sources.cached import CachedScanSource, check_slice_count, keep_usable

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')
_SLICE_NAME = re.compile(r'^.*-(\d+)\.[A-Za-z]+$')
# PIL modes kept as they are; every other mode (RGB, RGBA, P, LA, 1, ...) is converted to 'L'.
_GREY_MODES = ('L', 'I;16', 'I;16B', 'I;16L', 'I', 'F')


@dataclasses.dataclass(frozen=True)
class SliceFolder:
  """One scan: its slice files in slice order."""
  scan_id: str
  files: tuple[str, ...]
  label: int = -1


def _order_slices(folder: str, names: list[str]) -> tuple[str, ...]:
  numbered = {}
  for name in names:
    match = _SLICE_NAME.match(name)
    if not match:
      raise DataError(f'{os.path.join(folder, name)}: slice files must be named <anything>-<int>'
                      f'{os.path.splitext(name)[1]} so that they can be ordered')
    number = int(match.group(1))
    if number in numbered:
      raise DataError(f'{folder}: {numbered[number]} and {name} have the same slice number '
                      f'{number}')
    numbered[number] = name
  return tuple(os.path.join(folder, numbered[n]) for n in sorted(numbered))


def _read_slice(path: str) -> np.ndarray:
  try:
    with Image.open(path) as image:
      image.load()
      if image.mode not in _GREY_MODES:
        image = image.convert('L')
      return np.asarray(image)
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise DataError(f'{path}: unreadable image ({e})') from None


def read_values(folder: SliceFolder) -> np.ndarray:
  """The slice files' values stacked [D, H, W] as stored (uint8 for 8-bit images)."""
  slices = [_read_slice(path) for path in folder.files]
  for path, image in zip(folder.files, slices):
    if image.shape != slices[0].shape:
      raise DataError(f'{path}: image size {image.shape} differs from {folder.files[0]} '
                      f'{slices[0].shape}')
  return np.stack(slices)


def load_slice_folder(folder: SliceFolder, data_config) -> Scan:
  """Decodes every slice file and stacks them into a Scan."""
  values = read_values(folder)
  if values.dtype == np.uint8:
    volume = scale_8bit(values, f'slice folder {folder.scan_id}')
  else:
    volume = normalise(values, data_config, f'slice folder {folder.scan_id}')
  spacing = tuple(float(v) for v in data_config.default_spacing)
  return Scan(volume=volume, spacing=spacing, scan_id=folder.scan_id, label=folder.label)


def find_slice_folders(root: str) -> list[tuple[str, str, list[str]]]:
  """(scan_id, folder, image file names) for every folder under root that holds image files."""
  found = []
  for folder, names in folders.walk(root):
    images = [n for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
    if images:
      rel = os.path.relpath(folder, root)
      scan_id = os.path.basename(os.path.abspath(root)) if rel == '.' else rel
      found.append((scan_id, folder, images))
  return found


def _build(candidate: tuple[str, str, list[str]], labels: labels_lib.Labels,
           data_config) -> SliceFolder:
  scan_id, folder, names = candidate
  check_slice_count(len(names), data_config, f'slice folder {folder}')
  for name in names:
    folders.check_file(os.path.join(folder, name))
  return SliceFolder(scan_id=scan_id, files=_order_slices(folder, names),
                     label=labels.label_for(scan_id, os.path.basename(scan_id)))


def make_source(data_config, split: str) -> CachedScanSource:
  """Slice folders under data.path for one split (train/val/test subfolders, else a hash split)."""
  labels = labels_lib.labels_from_config(data_config)
  candidates = splits.find_in_split(data_config, split, find_slice_folders,
                                    lambda c: splits.group_of(c[0]),
                                    f'folders of {IMAGE_SUFFIXES} slices')
  problems = []
  build = functools.partial(_build, labels=labels, data_config=data_config)
  scans = keep_usable(candidates, build, data_config, 'slice folders', problems)
  # Image files have no physical unit: 'auto' is 'ct' only for HU-like values, else 'minmax'.
  sampled = scans[:2 * intensity.SAMPLE_SCANS]
  policy = intensity.resolve_policy(
      data_config, f'PNG {split}',
      (intensity.Candidate(f'slice folder {f.scan_id}', functools.partial(read_values, f))
       for f in sampled),
      physical_units=False, memo_key=('png', tuple(f.files for f in sampled)))
  data_config = intensity.with_policy(data_config, policy)
  return CachedScanSource(scans, functools.partial(load_slice_folder, data_config=data_config),
                          [len(f.files) for f in scans], labels.num_classes,
                          data_config.decoded_cache_scans,
                          problems)
