"""Voxel arrays with an affine -> slice-first volumes in a canonical orientation.

Every format that knows where its voxels sit in patient space (NIfTI, DICOM) goes through here, so
that the same scan stored two ways gives the same slices. The array is first brought to the closest
RAS+ orientation (nibabel's convention: +x right, +y anterior, +z superior), then the slice axis is
moved first and the in-plane axes ordered for radiological display.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np

SLICE_AXES = ('axial', 'coronal', 'sagittal')

# For each slice axis: the RAS axis order (slice, row, column) after reorientation, and which of the
# (row, column) axes are flipped so that the image shows anterior/superior at the top and the
# patient's right on the left of the screen (radiological convention).
_LAYOUT = {
    'axial': ((2, 1, 0), (True, True)),     # slices along S; rows A->P; columns R->L
    'coronal': ((1, 2, 0), (True, True)),   # slices along A; rows S->I; columns R->L
    'sagittal': ((0, 2, 1), (True, False)),  # slices along R; rows S->I; columns P->A
}


def orientable(affine: np.ndarray) -> bool:
  """Whether nibabel can name the RAS axis of every voxel axis of `affine`. A finite, invertible
  affine can still be too ill-conditioned for that (io_orientation gives NaN, e.g. for a 1e20
  shear), and reorientation cannot use it: sources refuse such scans by name."""
  return bool(np.all(np.isfinite(affine))
              and not np.isnan(nib.orientations.io_orientation(affine)).any())


def canonical_slices(array: np.ndarray, affine: np.ndarray, slice_axis: str):
  """Reorients a 3D array with its voxel-to-RAS affine; returns (volume [D, H, W], spacing (3,)).

  The spacing follows the returned axes (slice, row, column) in mm.
  """
  if slice_axis not in SLICE_AXES:
    raise ValueError(f'config key data.slice_axis={slice_axis!r} is not one of {SLICE_AXES}')
  if array.ndim != 3:
    raise ValueError(f'expected a 3D array, got shape {array.shape}')
  current = nib.orientations.io_orientation(affine)
  ras = nib.orientations.apply_orientation(array, current)
  zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
  zooms_ras = np.empty(3)
  zooms_ras[current[:, 0].astype(int)] = zooms
  order, (flip_rows, flip_cols) = _LAYOUT[slice_axis]
  volume = np.transpose(ras, order)
  if flip_rows:
    volume = volume[:, ::-1, :]
  if flip_cols:
    volume = volume[:, :, ::-1]
  spacing = tuple(float(zooms_ras[a]) for a in order)
  return np.ascontiguousarray(volume), spacing


def canonical_geometry(shape, affine: np.ndarray, slice_axis: str):
  """What canonical_slices would return as (shape (D, H, W), spacing), from a header alone.

  Lets sources count slices and check set sizes without decoding any voxel.
  """
  if slice_axis not in SLICE_AXES:
    raise ValueError(f'config key data.slice_axis={slice_axis!r} is not one of {SLICE_AXES}')
  ras_axis = nib.orientations.io_orientation(affine)[:, 0].astype(int)
  zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
  ras_shape, ras_zooms = np.empty(3, dtype=np.int64), np.empty(3)
  ras_shape[ras_axis] = tuple(shape)[:3]
  ras_zooms[ras_axis] = zooms
  order, _ = _LAYOUT[slice_axis]
  return (tuple(int(ras_shape[a]) for a in order), tuple(float(ras_zooms[a]) for a in order))


def canonical_mask(array: np.ndarray, affine: np.ndarray, slice_axis: str) -> np.ndarray:
  """A voxel mask through canonical_slices, rounded to integer ids (uint8 when they fit)."""
  mask, _ = canonical_slices(np.rint(array).astype(np.int32), affine, slice_axis)
  return mask.astype(np.uint8) if mask.size and mask.min() >= 0 and mask.max() < 256 else mask
