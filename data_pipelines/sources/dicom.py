"""DICOM: a folder tree of files, grouped into series by SeriesInstanceUID, one scan per series.

Slices are ordered by their position projected on the slice normal (ImagePositionPatient, or the
per-frame positions of enhanced multi-frame files), never by file name or InstanceNumber, which many
exporters shuffle. The voxel-to-patient affine is built from ImageOrientationPatient, PixelSpacing
and the positions; DICOM patient space is LPS, so x and y are negated to get the RAS affine that
data_pipelines.orientation expects, and a scan stored as DICOM gives the same slices as in NIfTI.
Stored values go through RescaleSlope/RescaleIntercept (Hounsfield units for CT) before the
intensity policy.

Headers are read when the source is built (cheap: pixel data is not read); pixel data is decoded on
first access and kept in a per-process LRU (data.decoded_cache_scans).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os

import numpy as np

from data_pipelines import intensity
from data_pipelines.errors import DataError
from data_pipelines.intensity import normalise
from data_pipelines.orientation import canonical_geometry, canonical_slices, orientable
from data_pipelines.sources import labels as labels_lib
from data_pipelines.sources import folders, splits
from data_pipelines.sources.base import Scan
from data_pipelines.sources.cached import CachedScanSource, check_slice_count, keep_usable

try:
  import pydicom
  import pydicom.errors
  import pydicom.pixels
except ImportError as e:  # pragma: no cover - depends on the installation
  raise DataError('data.source=dicom needs pydicom: pip install "dsset[dicom]"') from e

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Orientation cosines and spacings of one series may differ by rounding in the last digits.
_TOLERANCE = 1e-4
# Slice gaps may vary this much (relative) before a series counts as unevenly sampled.
_GAP_TOLERANCE = 0.1


@dataclasses.dataclass(frozen=True)
class _FileHeader:
  """What grouping and ordering need from one file, read without its pixel data."""
  path: str
  series_uid: str
  orientation: tuple[float, ...]  # row cosine (3), column cosine (3), LPS
  pixel_spacing: tuple[float, float]  # between rows, between columns (mm)
  shape: tuple[int, int]  # rows, columns
  positions: tuple[tuple[float, float, float], ...]  # one per frame, LPS mm
  slice_gap: float  # SpacingBetweenSlices or SliceThickness; used only for one-slice series
  modality: str = ''  # Modality ('CT', 'MR', ...); data.intensity='auto' uses it
  # Why the pixel data cannot be used (truncated, no decoder); it makes the whole series bad, since
  # a series silently missing a slice would be a different scan.
  problem: str = ''


@dataclasses.dataclass(frozen=True)
class Series:
  """One scan: frames in slice order and the voxel-to-RAS affine of its [column, row, slice] array."""
  scan_id: str
  uid: str
  frames: tuple[tuple[str, int], ...]  # (file, frame index inside that file)
  affine: np.ndarray
  num_slices: int  # along data.slice_axis, after reorientation
  group: str  # what the hash split keys on: the top folder (patient), or the UID at the root
  label: int = -1
  modality: str = ''  # Modality of the series' first file ('' when absent)


def _functional(ds, sequence: str, attribute: str, frame: int):
  """Attribute of an enhanced multi-frame file (per-frame, then shared groups), else top level."""
  for groups, index in (('PerFrameFunctionalGroupsSequence', frame),
                        ('SharedFunctionalGroupsSequence', 0)):
    items = ds.get(groups)
    if items is not None and len(items) > index and sequence in items[index]:
      inner = items[index][sequence].value
      if len(inner) and attribute in inner[0]:
        return inner[0][attribute].value
  return ds.get(attribute)


def _decoder_problem(ds, path: str) -> str:
  """A message when the file's transfer syntax needs a decoder that is not installed."""
  syntax = getattr(ds, 'file_meta', {}).get('TransferSyntaxUID')
  if syntax is None or not syntax.is_compressed:
    return ''
  try:
    decoder = pydicom.pixels.get_decoder(syntax)
  except NotImplementedError:
    return f'{path}: transfer syntax {syntax.name} ({syntax}) has no pixel data decoder in pydicom'
  if decoder.is_available:
    return ''
  options = '; '.join(decoder.missing_dependencies)
  return (f'{path}: pixel data is compressed as {syntax.name} ({syntax}) and no installed package '
          f'decodes it; install one of: {options} (for example pip install pylibjpeg '
          'pylibjpeg-libjpeg pylibjpeg-openjpeg, or python-gdcm)')


def read_header(path: str) -> _FileHeader | None:
  """Reads one file's geometry; None for files that are not DICOM images (DICOMDIR, reports)."""
  folders.check_file(path)
  try:
    with open(path, 'rb') as f:
      ds = pydicom.dcmread(f, stop_before_pixels=True)
      header_end = f.tell()  # where the pixel data element starts, if there is one
  except pydicom.errors.InvalidDicomError:
    return None  # no DICM preamble: not a DICOM file
  except Exception as e:  # pydicom raises many types on damaged headers
    raise DataError(f'{path}: damaged DICOM header ({type(e).__name__}: {e})') from None
  sop_class = ds.get('SOPClassUID') or getattr(ds, 'file_meta', {}).get('MediaStorageSOPClassUID')
  if sop_class is None:
    raise DataError(f'{path}: damaged DICOM file (it names no SOP class)')
  if header_end >= os.path.getsize(path):
    # pydicom stops quietly at the end of a file; an image without pixel data was cut short.
    if 'Image Storage' in sop_class.name:
      raise DataError(f'{path}: file is truncated (it ends before the pixel data)')
    return None
  if 'Rows' not in ds or 'SeriesInstanceUID' not in ds:
    return None
  if int(ds.get('SamplesPerPixel', 1)) != 1:
    raise DataError(f'{path}: colour DICOM images (SamplesPerPixel={ds.SamplesPerPixel}) are not '
                    'supported; only greyscale scans')
  num_frames = int(ds.get('NumberOfFrames', 1) or 1)
  orientation = _functional(ds, 'PlaneOrientationSequence', 'ImageOrientationPatient', 0)
  spacing = _functional(ds, 'PixelMeasuresSequence', 'PixelSpacing', 0)
  if orientation is None or spacing is None:
    raise DataError(f'{path}: no ImageOrientationPatient/PixelSpacing, so the slice geometry is '
                    'unknown')
  gap = (_functional(ds, 'PixelMeasuresSequence', 'SpacingBetweenSlices', 0)
         or _functional(ds, 'PixelMeasuresSequence', 'SliceThickness', 0) or 1.0)
  if not all(np.isfinite(float(v)) and float(v) > 0 for v in spacing):
    raise DataError(f'{path}: PixelSpacing {list(spacing)} must be positive')
  orientation = tuple(float(v) for v in orientation)
  normal = np.cross(orientation[:3], orientation[3:])
  if 'PerFrameFunctionalGroupsSequence' in ds:
    positions = [_functional(ds, 'PlanePositionSequence', 'ImagePositionPatient', f)
                 for f in range(num_frames)]
  elif 'ImagePositionPatient' in ds:
    # Old-style multi-frame files give the first frame's position and a constant step.
    first = np.asarray(ds.ImagePositionPatient, dtype=float)
    positions = [first + f * float(gap) * normal for f in range(num_frames)]
  else:
    positions = [None]
  if any(p is None for p in positions):
    raise DataError(f'{path}: no ImagePositionPatient, so the slices cannot be ordered')
  shape = (int(ds.Rows), int(ds.Columns))
  return _FileHeader(
      path=path, series_uid=str(ds.SeriesInstanceUID), orientation=orientation,
      pixel_spacing=(float(spacing[0]), float(spacing[1])), shape=shape,
      positions=tuple(tuple(float(v) for v in p) for p in positions), slice_gap=float(gap),
      modality=str(ds.get('Modality', '') or '').strip().upper(),
      problem=_decoder_problem(ds, path) or _length_problem(ds, path, shape, num_frames,
                                                            header_end))


def _length_problem(ds, path: str, shape: tuple[int, int], num_frames: int,
                    header_end: int) -> str:
  """Uncompressed pixel data has a known size: a shorter file was truncated."""
  syntax = getattr(ds, 'file_meta', {}).get('TransferSyntaxUID')
  if syntax is not None and syntax.is_compressed:
    return ''
  bits = int(ds.get('BitsAllocated', 16))
  # 8 bytes: the shortest element header (tag and length, implicit VR).
  needed = header_end + 8 + (shape[0] * shape[1] * num_frames * bits + 7) // 8
  size = os.path.getsize(path)
  if size < needed:
    return f'{path}: file is truncated ({size} bytes, the pixel data needs at least {needed})'
  return ''


def _series_affine(headers: list[_FileHeader], frames: list[tuple[np.ndarray, str, int]],
                   name: str) -> np.ndarray:
  """Voxel-to-RAS affine for the array indexed [column, row, slice] of frames in slice order."""
  first = headers[0]
  for h in headers[1:]:
    if (not np.allclose(h.orientation, first.orientation, atol=_TOLERANCE) or
        not np.allclose(h.pixel_spacing, first.pixel_spacing, rtol=_TOLERANCE) or
        h.shape != first.shape):
      raise DataError(f'{name}: files {first.path} and {h.path} differ in orientation, pixel '
                      'spacing or size, so they do not form one volume')
  row_cosine = np.asarray(first.orientation[:3])
  column_cosine = np.asarray(first.orientation[3:])
  normal = np.cross(row_cosine, column_cosine)
  positions = np.stack([p for p, _, _ in frames])
  if len(frames) > 1:
    gaps = np.diff(positions @ normal)
    if np.min(gaps) <= _TOLERANCE:
      raise DataError(f'{name}: two slices share the position {positions[np.argmin(gaps)]} mm')
    median = float(np.median(gaps))
    if np.max(np.abs(gaps - median)) > _GAP_TOLERANCE * median:
      raise DataError(f'{name}: slice gaps vary from {np.min(gaps):g} to {np.max(gaps):g} mm '
                      '(missing or extra slices?)')
    step = (positions[-1] - positions[0]) / (len(frames) - 1)
  else:
    step = normal * first.slice_gap
  row_spacing, column_spacing = first.pixel_spacing
  lps = np.eye(4)
  lps[:3, 0] = row_cosine * column_spacing  # moving along a row = to the next column
  lps[:3, 1] = column_cosine * row_spacing
  lps[:3, 2] = step
  lps[:3, 3] = positions[0]
  if not orientable(lps):
    raise DataError(f'{name}: the voxel-to-patient affine from ImageOrientationPatient, '
                    'PixelSpacing and the slice positions is too ill-conditioned to orient the scan')
  return _LPS_TO_RAS @ lps


def _build_series(group: tuple[str, str, str, list[_FileHeader]], labels: labels_lib.Labels,
                  data_config) -> Series:
  scan_id, uid, split_group, headers = group
  for h in headers:
    if h.problem:
      raise DataError(f'DICOM series {scan_id}: {h.problem}')
  frames = [(np.asarray(p), h.path, f) for h in headers for f, p in enumerate(h.positions)]
  normal = np.cross(headers[0].orientation[:3], headers[0].orientation[3:])
  frames.sort(key=lambda item: float(item[0] @ normal))
  affine = _series_affine(headers, frames, f'DICOM series {scan_id}')
  shape = (headers[0].shape[1], headers[0].shape[0], len(frames))  # [column, row, slice]
  # Refused before decoding: a damaged header can declare more pixels than memory holds.
  if int(np.prod(shape, dtype=np.float64)) > int(data_config.max_voxels):
    raise DataError(f'DICOM series {scan_id}: {shape} voxels are more than '
                    f'data.max_voxels={int(data_config.max_voxels)}')
  (num_slices, _, _), _ = canonical_geometry(shape, affine, data_config.slice_axis)
  check_slice_count(num_slices, data_config, f'DICOM series {scan_id}')
  folder = scan_id.split('#')[0]
  return Series(scan_id=scan_id, uid=uid, frames=tuple((path, f) for _, path, f in frames),
                affine=affine, num_slices=num_slices, group=split_group,
                label=labels.label_for(scan_id, folder, uid), modality=headers[0].modality)


def _decode_file(path: str) -> np.ndarray:
  """Stored values of every frame of one file -> float64 [frames, rows, columns], rescaled."""
  try:
    ds = pydicom.dcmread(path)
  except Exception as e:
    raise DataError(f'{path}: unreadable DICOM file ({type(e).__name__}: {e})') from None
  problem = _decoder_problem(ds, path)
  if problem:
    raise DataError(problem)
  try:
    pixels = ds.pixel_array
  except Exception as e:
    raise DataError(f'{path}: cannot decode the pixel data ({type(e).__name__}: {e})') from None
  num_frames = int(ds.get('NumberOfFrames', 1) or 1)
  pixels = np.asarray(pixels, dtype=np.float64).reshape(num_frames, int(ds.Rows), int(ds.Columns))
  for f in range(num_frames):
    slope = _functional(ds, 'PixelValueTransformationSequence', 'RescaleSlope', f)
    intercept = _functional(ds, 'PixelValueTransformationSequence', 'RescaleIntercept', f)
    pixels[f] = pixels[f] * float(1.0 if slope is None else slope) + float(intercept or 0.0)
  if ds.get('PhotometricInterpretation') == 'MONOCHROME1':
    pixels = -pixels  # MONOCHROME1 shows low values bright; negate so bright means high everywhere
  return pixels


def series_array(series: Series) -> tuple[np.ndarray, np.ndarray]:
  """(values float32 [columns, rows, slices] after rescale, voxel-to-RAS affine) of one series."""
  decoded = {}
  slices = []
  for path, frame in series.frames:
    if path not in decoded:
      decoded[path] = _decode_file(path)
    if frame >= decoded[path].shape[0]:
      raise DataError(f'{path}: has {decoded[path].shape[0]} frames, the header lists more')
    slices.append(decoded[path][frame])
  array = np.stack(slices).transpose(2, 1, 0).astype(np.float32)
  return array, series.affine


def raw_values(series: Series, data_config) -> np.ndarray:
  """Values of one series after rescale and canonical orientation, before the intensity policy."""
  array, affine = series_array(series)
  return canonical_slices(array, affine, data_config.slice_axis)[0]


def candidate(series: Series, data_config) -> intensity.Candidate:
  """The series as a scan data.intensity='auto' may sample (its Modality known from headers)."""
  return intensity.Candidate(f'DICOM series {series.scan_id}',
                             functools.partial(raw_values, series, data_config), series.modality)


def warn_mixed_modalities(series: list[Series], policy: str, where: str) -> None:
  """One policy serves a whole source: say so when its series are CT and MR mixed."""
  counts = collections.Counter(s.modality for s in series if s.modality in ('CT', 'MR'))
  if len(counts) == 2:
    intensity.tell(f'warning: the {where} scans mix {counts["CT"]} CT and {counts["MR"]} MR '
                   f'series, and every one uses data.intensity={policy!r}; put CT and MR under '
                   'separate data.path folders or set data.intensity')


def load_series(series: Series, data_config) -> Scan:
  """Decodes one series into a Scan: canonical orientation, then data.intensity."""
  array, affine = series_array(series)
  volume, spacing = canonical_slices(array, affine, data_config.slice_axis)
  volume = normalise(volume, data_config, f'DICOM series {series.scan_id}')
  return Scan(volume=volume, spacing=spacing, scan_id=series.scan_id, label=series.label)


def find_series(root: str, data_config, labels: labels_lib.Labels,
                problems: list[str]) -> list[Series]:
  """Every usable series under `root`, named by folder relative to root (plus UID if shared).

  Messages about skipped files and series are appended to `problems`.
  """
  files = [os.path.join(folder, n) for folder, names in folders.walk(root) for n in names]
  headers = [h for h in keep_usable(files, read_header, data_config, 'DICOM files', problems)
             if h is not None]
  by_uid: dict[str, list[_FileHeader]] = {}
  for h in headers:
    by_uid.setdefault(h.series_uid, []).append(h)
  folder_of, split_group_of = {}, {}
  for uid, members in by_uid.items():
    common = os.path.commonpath([os.path.dirname(h.path) for h in members])
    rel = os.path.relpath(common, root)
    folder_of[uid] = os.path.basename(os.path.abspath(root)) if rel == '.' else rel
    # The top folder (usually the patient) decides the split, so a patient's series stay together.
    split_group_of[uid] = uid if rel == '.' else splits.group_of(rel)
  groups = []
  for uid, members in sorted(by_uid.items(), key=lambda item: (folder_of[item[0]], item[0])):
    shared = sum(1 for other in folder_of.values() if other == folder_of[uid]) > 1
    scan_id = f'{folder_of[uid]}#{uid}' if shared else folder_of[uid]
    groups.append((scan_id, uid, split_group_of[uid], members))
  if not groups:
    raise DataError(f'data.path: no DICOM images under {root}')
  build = functools.partial(_build_series, labels=labels, data_config=data_config)
  return keep_usable(groups, build, data_config,
                     'DICOM series', problems)


def make_source(data_config, split: str) -> CachedScanSource:
  """DICOM series under data.path for one split (train/val/test subfolders, else a hash split)."""
  labels = labels_lib.labels_from_config(data_config)
  problems = []
  series = splits.find_in_split(
      data_config, split, lambda root: find_series(root, data_config, labels, problems),
      lambda s: s.group, 'DICOM series')
  sampled = series[:2 * intensity.SAMPLE_SCANS]
  policy = intensity.resolve_policy(
      data_config, f'DICOM {split}', (candidate(s, data_config) for s in sampled),
      memo_key=('dicom', os.path.abspath(data_config.path), data_config.slice_axis,
                tuple((s.uid, s.frames) for s in sampled)))
  warn_mixed_modalities(series, policy, f'DICOM {split}')
  data_config = intensity.with_policy(data_config, policy)
  return CachedScanSource(series, functools.partial(load_series, data_config=data_config),
                          [s.num_slices for s in series], labels.num_classes,
                          data_config.decoded_cache_scans,
                          problems)
