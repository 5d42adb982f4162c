"""Segmentation pieces: slices with their masks, Dice (hard, for the report; soft, for the loss),
batched prediction, and which reported slices to show. The method that trains and reports is
dsset.methods.segment.

Examples are 2D slices with their mask slice (images resized bilinearly to data.image_size, masks
with nearest neighbour so that ids stay ids).

Dice is reported two ways, both on the image_size grid the slices are predicted on (a scan's
masks resized as its images, not its native voxel grid), on the split evaluate.report_split names:
over every pixel of it at once (`dice` of all slices: large volumes weigh more, and a class counts
wherever it occurs), and per volume (`volume_dice`: a scan's predicted slices stacked into its
volume, Dice per class of that volume, then each class's mean over the volumes), the usual figure
for 3D segmentation benchmarks.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import samplers
from data_pipelines.errors import DataError
from data_pipelines.sources import make_source
from dsset.config_validation import ConfigError
from dsset.evaluate import features
from dsset.models import unet

PLOT_FILES = {'curve': 'segment_curve.png', 'grid': 'segmentation_grid.png'}
GRID_ROWS = 4  # reported slices shown in the image / ground truth / prediction grid


def dice(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
  """Hard Dice 2|P & T| / (|P| + |T|) of every class id 0..num_classes-1 over all pixels given.

  A class absent from both the prediction and the target has no defined Dice: nan (left out of
  means with np.nanmean), rather than 1, so that absent classes do not inflate the mean.
  """
  pred, target = np.asarray(pred).ravel(), np.asarray(target).ravel()
  classes = np.arange(num_classes)[:, None]
  is_pred, is_target = pred[None] == classes, target[None] == classes
  overlap = np.sum(is_pred & is_target, axis=1)
  total = is_pred.sum(axis=1) + is_target.sum(axis=1)
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(total > 0, 2.0 * overlap / total, np.nan)


def volume_dice(pred: np.ndarray, target: np.ndarray, slice_counts: np.ndarray,
                num_classes: int) -> np.ndarray:
  """Hard Dice [V, num_classes] of each volume: its slices (consecutive runs of slice_counts [V]
  rows of pred and target [N, H, W]) stacked into one volume, `dice` over its voxels (nan for a
  class in neither the volume's prediction nor its truth)."""
  if int(np.sum(slice_counts)) != len(pred) or len(pred) != len(target):
    raise ValueError(f'{len(pred)} predicted and {len(target)} true slices for volumes of '
                     f'{int(np.sum(slice_counts))} slices in all')
  bounds = np.cumsum(slice_counts)[:-1]
  return np.stack([dice(p, t, num_classes)
                   for p, t in zip(np.split(pred, bounds), np.split(target, bounds))])


def volume_dice_result(per_volume: np.ndarray, scan_ids: list[str]) -> dict:
  """eval.json's per-volume keys from volume_dice's [V, C]:
    volume_dice_per_class   each foreground class's mean over the volumes where it is defined;
    volume_dice_mean        the mean of those over the classes (nan when none is defined);
    volume_dice_background  class 0's mean over the volumes;
    dice_per_volume         {scan_id, dice_per_class} per volume, null where undefined.
  """
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', RuntimeWarning)  # a class defined in no volume: nan
    per_class = np.nanmean(per_volume, axis=0)
  foreground = per_class[1:][~np.isnan(per_class[1:])]
  num_classes = per_volume.shape[1]
  return {
      'volume_dice_mean': float(foreground.mean()) if foreground.size else float('nan'),
      'volume_dice_per_class': {str(c): float(per_class[c]) for c in range(1, num_classes)},
      'volume_dice_background': float(per_class[0]),
      'dice_per_volume': [
          {'scan_id': scan_id,
           'dice_per_class': {str(c): None if np.isnan(row[c]) else float(row[c])
                              for c in range(1, num_classes)}}
          for scan_id, row in zip(scan_ids, per_volume)],
  }


def soft_dice_loss(logits: jax.Array, target: jax.Array, num_classes: int) -> jax.Array:
  """1 - mean soft Dice over the classes present in the batch's target (probabilities vs one-hot).

  Classes absent from the target are left out: their Dice would only reward predicting nothing.
  """
  probs = jax.nn.softmax(logits, axis=-1)
  one_hot = jax.nn.one_hot(target, num_classes, dtype=probs.dtype)
  axes = tuple(range(probs.ndim - 1))
  overlap = jnp.sum(probs * one_hot, axis=axes)
  total = jnp.sum(probs, axis=axes) + jnp.sum(one_hot, axis=axes)
  present = jnp.sum(one_hot, axis=axes) > 0
  per_class = 2.0 * overlap / jnp.maximum(total, 1e-6)
  return 1.0 - jnp.sum(jnp.where(present, per_class, 0.0)) / jnp.maximum(jnp.sum(present), 1)


def resize_mask(mask: np.ndarray, image_size: int) -> np.ndarray:
  """Nearest-neighbour resize of an integer mask [h, w] -> int32 [image_size, image_size]."""
  rows = (np.arange(image_size) + 0.5) * mask.shape[0] / image_size
  cols = (np.arange(image_size) + 0.5) * mask.shape[1] / image_size
  return np.asarray(mask, np.int32)[rows.astype(int)[:, None], cols.astype(int)[None, :]]


@dataclasses.dataclass
class Volumes:
  """Every slice of a split's scans, scan after scan, each scan's slices in order."""

  images: np.ndarray  # uint8 [N, S, S, C]
  masks: np.ndarray  # int32 [N, S, S]
  slice_counts: np.ndarray  # int64 [V]: the scans' slices are consecutive runs of these lengths
  scan_ids: list[str]  # [V], the source's names of the scans


def read_split(config, split: str, keep_fraction: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
  """uint8 images [N, S, S, C] and int32 masks [N, S, S] of every slice of the split's scans.

  keep_fraction keeps a seeded share of the scans (stratified by scan label when there is one).
  """
  volumes = read_volumes(config, split, keep_fraction)
  return volumes.images, volumes.masks


def read_volumes(config, split: str, keep_fraction: float = 1.0) -> Volumes:
  """read_split, and which slices belong to which scan."""
  source = make_source(config.data, split)
  size, channels = int(config.data.image_size), int(config.data.channels)
  scans = [source[i] for i in range(len(source))]
  labels = np.asarray([s.label for s in scans], np.int32)
  keep = features.stratified_scan_mask(labels, np.arange(len(scans)), keep_fraction,
                                       int(config.seed))
  scans = [s for s, k in zip(scans, keep) if k]
  if not scans:
    raise DataError(f'the {split} split of data.source={config.data.source!r} has no scans to '
                    'segment')
  images, masks = [], []
  for scan in scans:
    if scan.mask is None:
      raise DataError(f'scan {scan.scan_id} of data.source={config.data.source!r} has no voxel '
                      'mask: segmentation needs masks for every scan (data.masks_path, or '
                      'mask paths as the labels of a datalist)')
    images.append(samplers.scan_slices(scan, size, channels))
    masks.append(np.stack([resize_mask(m, size) for m in np.asarray(scan.mask)]))
  return Volumes(np.concatenate(images), np.concatenate(masks),
                 np.asarray([len(m) for m in masks], np.int64), [str(s.scan_id) for s in scans])


def num_classes(config, largest: int) -> int:
  """Classes of a segmentation run: evaluate.segment_num_classes, or the train masks' largest id
  (`largest`) + 1 when that key is 0."""
  configured = int(config.evaluate.segment_num_classes)
  if configured < 0 or configured == 1:
    raise ConfigError(f'config key evaluate.segment_num_classes={configured} is invalid: expected '
                      '0 (from the masks) or at least 2')
  if configured and largest >= configured:
    raise DataError(f'the train masks hold id {largest} but config key '
                    f'evaluate.segment_num_classes={configured}')
  return configured or max(2, largest + 1)


def predict(model: unet.SegmentationModel, variables: dict, images: np.ndarray,
            batch_size: int) -> np.ndarray:
  """Hard predictions int32 [N, H, W], in fixed-size batches (the last padded): one compile."""
  apply = jax.jit(lambda v, x: jnp.argmax(
      model.apply(v, features.normalise_images(x), train=False), axis=-1))
  out = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    pad = batch_size - len(chunk)
    chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
    out.append(np.asarray(apply(variables, chunk), np.int32)[:batch_size - pad])
  return np.concatenate(out)


def grid_rows(masks: np.ndarray, count: int) -> np.ndarray:
  """Indices of `count` reported slices (test or val) spread over those with the most foreground."""
  foreground = (masks > 0).sum(axis=(1, 2))
  candidates = np.argsort(-foreground, kind='stable')[:max(count, len(masks) // 2)]
  return np.sort(candidates[np.linspace(0, len(candidates) - 1, count).astype(int)])
