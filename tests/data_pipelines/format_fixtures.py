"""Tiny scans written with each format's own library (pydicom, nibabel, PIL, numpy) for the tests.

Imported by the format tests as a plain module (pytest puts this folder on sys.path).
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (CTImageStorage, EnhancedCTImageStorage, ExplicitVRLittleEndian,
                         JPEGLSLossless, generate_uid)

# An oblique-free but non-trivial geometry: x flipped, anisotropic voxels, an offset origin.
AFFINE = np.array([[-0.8, 0.0, 0.0, 40.0],
                   [0.0, 0.7, 0.0, -12.0],
                   [0.0, 0.0, 2.5, 30.0],
                   [0.0, 0.0, 0.0, 1.0]])


def stored_values(shape=(16, 12, 6), seed=0) -> np.ndarray:
  """int16 values spread over the CT range, [X, Y, Z] like a NIfTI array."""
  return np.random.default_rng(seed).integers(0, 2000, size=shape).astype(np.int16)


def _geometry(affine: np.ndarray):
  lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
  column_step, row_step = lps[:3, 0], lps[:3, 1]
  orientation = [*(column_step / np.linalg.norm(column_step)),
                 *(row_step / np.linalg.norm(row_step))]
  spacing = [float(np.linalg.norm(row_step)), float(np.linalg.norm(column_step))]
  return lps, [float(v) for v in orientation], spacing


def _image_dataset(sop_class, data: np.ndarray, series_uid: str,
                   transfer_syntax=ExplicitVRLittleEndian):
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = sop_class
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = transfer_syntax
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = sop_class
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.Modality = 'CT'
  ds.PatientID = 'phantom'
  ds.StudyInstanceUID = generate_uid()
  ds.SeriesInstanceUID = series_uid
  ds.Rows, ds.Columns = data.shape[1], data.shape[0]
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = 'MONOCHROME2'
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
  return ds


def write_dicom_series(folder: str, data: np.ndarray, affine: np.ndarray = AFFINE, slope=1.0,
                       intercept=-1024.0, seed=0, series_uid=None) -> list[str]:
  """One file per slice of `data` [X, Y, Z] (stored); shuffled names, descending InstanceNumber."""
  os.makedirs(folder, exist_ok=True)
  lps, orientation, spacing = _geometry(affine)
  series_uid = series_uid or generate_uid()
  num_slices = data.shape[2]
  names = np.random.default_rng(seed).permutation(num_slices)
  paths = []
  for k in range(num_slices):
    ds = _image_dataset(CTImageStorage, data, series_uid)
    ds.InstanceNumber = num_slices - k
    ds.ImageOrientationPatient = orientation
    ds.ImagePositionPatient = [float(v) for v in lps @ np.array([0.0, 0.0, k, 1.0])][:3]
    ds.PixelSpacing = spacing
    ds.SliceThickness = float(np.linalg.norm(lps[:3, 2]))
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = np.ascontiguousarray(data[:, :, k].T).astype('<i2').tobytes()
    path = os.path.join(folder, f'img{seed}_{names[k]:03d}.dcm')
    ds.save_as(path, enforce_file_format=True)
    paths.append(path)
  return paths


def write_dicom_multiframe(path: str, data: np.ndarray, affine: np.ndarray = AFFINE, slope=1.0,
                           intercept=-1024.0) -> None:
  """An enhanced multi-frame file with the frames stored in reverse slice order."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  lps, orientation, spacing = _geometry(affine)
  ds = _image_dataset(EnhancedCTImageStorage, data, generate_uid())
  order = list(range(data.shape[2]))[::-1]
  ds.NumberOfFrames = len(order)
  shared = Dataset()
  plane = Dataset()
  plane.ImageOrientationPatient = orientation
  measures = Dataset()
  measures.PixelSpacing = spacing
  measures.SliceThickness = float(np.linalg.norm(lps[:3, 2]))
  shared.PlaneOrientationSequence = Sequence([plane])
  shared.PixelMeasuresSequence = Sequence([measures])
  ds.SharedFunctionalGroupsSequence = Sequence([shared])
  frames = []
  for k in order:
    item, position, rescale = Dataset(), Dataset(), Dataset()
    position.ImagePositionPatient = [float(v) for v in lps @ np.array([0.0, 0.0, k, 1.0])][:3]
    rescale.RescaleSlope, rescale.RescaleIntercept = slope, intercept
    item.PlanePositionSequence = Sequence([position])
    item.PixelValueTransformationSequence = Sequence([rescale])
    frames.append(item)
  ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
  ds.PixelData = np.stack([data[:, :, k].T for k in order]).astype('<i2').tobytes()
  ds.save_as(path, enforce_file_format=True)


def write_dicom_jpeg_ls(path: str, data: np.ndarray) -> None:
  """A single slice whose transfer syntax is JPEG-LS (the bytes are not a real codestream)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  lps, orientation, spacing = _geometry(AFFINE)
  ds = _image_dataset(CTImageStorage, data, generate_uid(), JPEGLSLossless)
  ds.ImageOrientationPatient = orientation
  ds.ImagePositionPatient = [float(v) for v in lps[:3, 3]]
  ds.PixelSpacing = spacing
  ds.PixelData = encapsulate([b'\xff\xd8\xff\xf7' + bytes(16)])
  ds['PixelData'].VR = 'OB'
  ds.save_as(path, enforce_file_format=True)


def write_nifti(path: str, data: np.ndarray, affine: np.ndarray = AFFINE, slope=1.0,
                intercept=-1024.0) -> None:
  """The same stored values and geometry as write_dicom_series, as NIfTI with scl_slope/inter."""
  image = nib.Nifti1Image(data, affine)
  image.header.set_slope_inter(slope, intercept)
  nib.save(image, path)


def truncate(path: str, keep_fraction: float = 0.5) -> None:
  with open(path, 'rb') as f:
    content = f.read()
  with open(path, 'wb') as f:
    f.write(content[:int(len(content) * keep_fraction)])


def read_dicom(path: str) -> pydicom.Dataset:
  return pydicom.dcmread(path)


def write_png_folder(folder: str, volume: np.ndarray, prefix: str = 'slice', order_seed=0) -> None:
  """Slices of a uint8/uint16 [D, H, W] volume as <prefix>-<index>.png, written shuffled."""
  from PIL import Image
  os.makedirs(folder, exist_ok=True)
  for k in np.random.default_rng(order_seed).permutation(volume.shape[0]):
    Image.fromarray(volume[k]).save(os.path.join(folder, f'{prefix}-{k}.png'))


def data_config(root, source: str = 'nifti', **keys):
  """configs/base.py's data section for a folder under test: every scan in train, a cache beside
  the folder, and the given keys."""
  from configs import base  # pylint: disable=import-outside-toplevel
  config = base.get_config().data
  config.source, config.path = source, str(root)
  config.cache_dir = str(root) + '_cache'
  config.val_fraction = config.test_fraction = 0.0
  config.update(keys)
  return config
