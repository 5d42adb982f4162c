"""3D segmentation fine-tuning: the 3D U-Net encoder (pretrained or random) with its decoder, trained
on random cubes of the labelled train scans and scored on whole scans of the split
evaluate.report_split names (test by default; val while settings are chosen, when no test scan is
read).

Training uses a seeded, stratified share of the train scans (evaluate.label_fraction, by scan, as
the 2D runs; dsset.evaluate.features.stratified_scan_mask) and batches of random cubes of them with
their masks (data_pipelines.volumes). The loss is cross-entropy + soft Dice, the Dice averaged over
the classes present in the batch with equal weight, so a small organ counts as much as the body.
The first evaluate.segment_freeze_steps steps train the decoder alone (the encoder in eval mode, its
weights unchanged). augment3d.* applies to volume and mask together (configs/segment3d.py turns it
off, as the 2D downstream runs: the comparison is about the starting encoder).

Evaluation covers every voxel of each reported scan: non-overlapping cubes tile the scan on the
cube's voxel grid (data.voxel_mm), each cube is predicted, and the tiles are put back together; hard
Dice per class over all its voxels goes to eval.json, with a PNG of orthogonal slices (image, truth,
prediction) through one of its scans.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from data_pipelines import pipeline, volumes
from data_pipelines.errors import DataError
from data_pipelines.sources import make_source
from dsset import augment3d
from dsset.config_validation import ConfigError
from dsset.evaluate import features, plots, segment
from dsset.methods.base import StepOutput
from dsset.methods.downstream import DownstreamMethod
from dsset.methods.segment import FROZEN_ENCODER, WHOLE_MODEL
from dsset.models import unet3d

PLOT_FILES = {'curve': 'segment_curve.png', 'slices': 'segmentation_slices.png'}


def labelled_subset(source, fraction: float, seed: int) -> np.ndarray:
  """Indices of the train scans a label fraction keeps (stratified by scan label when there is
  one, seeded)."""
  labels = np.asarray([source[i].label for i in range(len(source))], np.int32)
  keep = features.stratified_scan_mask(labels, np.arange(len(labels)), fraction, seed)
  return np.flatnonzero(keep)


def largest_mask_id(source, indices) -> int:
  """The largest voxel id of the masks of the scans `indices` (DataError for a scan without)."""
  largest = 0
  for index in indices:
    scan = source[int(index)]
    if scan.mask is None:
      raise DataError(f'scan {scan.scan_id} has no voxel mask: 3D segmentation needs masks for '
                      'every scan (data.masks_path, or mask paths in a datalist)')
    largest = max(largest, int(np.max(scan.mask)))
  return largest


def orthogonal_slices(volume: np.ndarray, truth: np.ndarray, pred: np.ndarray):
  """Axial, coronal and sagittal slices through the centre of the truth's foreground (or of the
  volume): lists of 2D arrays (image as uint8, truth, prediction) for plots.segmentation_grid."""
  foreground = np.argwhere(truth > 0)
  centre = (foreground.mean(axis=0) if len(foreground) else np.asarray(truth.shape) / 2)
  centre = np.clip(centre.astype(int), 0, np.asarray(truth.shape) - 1)
  image = np.rint(np.clip(volume, 0, 1) * 255).astype(np.uint8)
  rows = ([], [], [])
  for axis in range(3):
    for out, array in zip(rows, (image, truth, pred)):
      out.append(np.take(array, centre[axis], axis=axis))
  return rows


class Segment3DMethod(DownstreamMethod):
  """The variables are the Segmentation3DModel's: the encoder under unet3d.ENCODER_PATH."""

  encoder_path = unet3d.ENCODER_PATH
  train_records = 'train scans'

  @classmethod
  def check_config(cls, config):
    if not config.init_from and config.model.backbone != unet3d.BACKBONE:
      raise ConfigError(f'config key model.backbone={config.model.backbone!r}: method='
                        f'{config.method!r} fine-tunes the 3D encoder; set model.backbone='
                        f'{unet3d.BACKBONE!r} (configs/segment3d.py does)')

  def _encoder(self):
    if self.model_config.backbone != unet3d.BACKBONE:
      raise ConfigError(f'config key init_from={self.config.init_from!r} holds a '
                        f'{self.model_config.backbone} encoder; method={self.config.method!r} '
                        'needs a 3D encoder (pretrained with e.g. configs/rotation3d.py)')
    return unet3d.make_unet3d(self.model_config)

  def make_train_iterator(self, process_index=0, process_count=1, batch_multiple=1):
    del batch_multiple
    encoder = self._encoder()  # first: a missing or 2D export is named before data is read
    d = self.config.data
    source = make_source(d, 'train')
    kept = labelled_subset(source, float(self.config.evaluate.label_fraction),
                           int(self.config.seed))
    self._num_classes = segment.num_classes(self.config, largest_mask_id(source, kept))
    self.model = unet3d.Segmentation3DModel(encoder, self._num_classes)
    self._num_train = len(kept)
    sampler = volumes.VolumeSampler(volumes.SubsetSource(source, kept), int(d.volume_size),
                                    float(d.voxel_mm), with_masks=True,
                                    on_bad_scan=str(d.on_bad_scan))
    return pipeline.make_train_iterator(self.config, sampler, process_index=process_index,
                                        process_count=process_count)

  def init(self, rng):
    size = int(self.config.data.volume_size)
    return self.model.init(rng, jnp.zeros((1, size, size, size, 1)), train=False)

  def phase(self, step):
    return FROZEN_ENCODER if step <= int(self.config.evaluate.segment_freeze_steps) else WHOLE_MODEL

  def frozen_paths(self, phase):
    return (self.encoder_path,) if phase == FROZEN_ENCODER else ()

  def loss(self, params, batch_stats, batch, rng, phase):
    augment_key, dropout_key = jax.random.split(rng)
    views, target = augment3d.augment_volumes(augment_key, batch['volume'], self.config.augment3d,
                                              batch['mask'].astype(jnp.int32))
    logits, updates = self.model.apply(
        {'params': params, 'batch_stats': batch_stats}, augment3d.normalise(views), train=True,
        train_encoder=phase == WHOLE_MODEL, mutable=['batch_stats'],
        rngs={'dropout': dropout_key})
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()
    dice_loss = segment.soft_dice_loss(logits, target, self._num_classes)
    return ce + dice_loss, StepOutput(updates['batch_stats'],
                                      {'cross_entropy': ce, 'soft_dice_loss': dice_loss})

  def _predictor(self, variables):
    apply = jax.jit(lambda v, x: jnp.argmax(
        self.model.apply(v, augment3d.normalise(x), train=False), axis=-1).astype(jnp.uint8))
    batch_size = int(self.config.evaluate.batch_size)

    def predict(tiles: np.ndarray) -> np.ndarray:
      """uint8 tiles [T, S, S, S, 1] -> class ids [T, S, S, S], fixed batches: one compile."""
      out = []
      for start in range(0, len(tiles), batch_size):
        chunk = tiles[start:start + batch_size]
        pad = batch_size - len(chunk)
        chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(apply(variables, chunk))[:batch_size - pad])
      return np.concatenate(out)
    return predict

  def finish(self, variables, workdir):
    d = self.config.data
    cube, voxel_mm = int(d.volume_size), float(d.voxel_mm)
    split = self.report_split
    source = make_source(d, split)
    if not len(source):
      raise DataError(f'the {split} split of data.source={d.source!r} has no scans to segment')
    predict = self._predictor(variables)
    preds, truths, shown = [], [], None
    for index in range(len(source)):
      scan = source[index]
      if scan.mask is None:
        raise DataError(f'{split} scan {scan.scan_id} has no voxel mask')
      steps = volumes.axis_steps(scan.spacing, voxel_mm)
      volume, mask = np.asarray(scan.volume), np.asarray(scan.mask)
      starts = volumes.tile_starts(volume.shape, cube, steps)
      tiles = np.stack([volumes.to_uint8(volumes.cut_cube(volume, s, steps, cube))
                        for s in starts])
      truth_tiles = np.stack([volumes.cut_cube(mask, s, steps, cube, nearest=True)
                              for s in starts])
      pred = volumes.assemble_tiles(predict(tiles), starts, steps)
      truth = volumes.assemble_tiles(truth_tiles, starts, steps)
      if int(truth.max()) >= self._num_classes:
        raise DataError(f'{split} scan {scan.scan_id} holds mask id {int(truth.max())}, beyond the '
                        f'{self._num_classes} classes of the train masks; set '
                        'evaluate.segment_num_classes')
      preds.append(pred.ravel())
      truths.append(truth.ravel())
      if shown is None:
        image = volumes.assemble_tiles(tiles[..., 0], starts, steps) / 255.0
        shown = orthogonal_slices(image, truth, pred)
    scores = segment.dice(np.concatenate(preds), np.concatenate(truths), self._num_classes)
    foreground = scores[1:][~np.isnan(scores[1:])]
    dice_mean = float(foreground.mean()) if foreground.size else float('nan')
    result = {
        'dice_mean': dice_mean,
        'dice_per_class': {str(c): float(scores[c]) for c in range(1, self._num_classes)},
        'dice_background': float(scores[0]),
        'num_classes': self._num_classes,
        **self.common_result(),
        'num_steps': int(self.config.train.num_steps),
        'segment_freeze_steps': int(self.config.evaluate.segment_freeze_steps),
        'volume_size': cube,
        'voxel_mm': voxel_mm,
        'num_examples': {'train': self._num_train, split: len(source)},
    }
    title = (f'{result["method"]}, segment3d ({100 * self.config.evaluate.label_fraction:g} % of '
             'the labels)')
    curve = self.training_curve(workdir)
    if curve is not None:
      plots.training_curve(curve, os.path.join(workdir, PLOT_FILES['curve']), title,
                           'training step (mini-batch of cubes)')
    plots.segmentation_grid(*shown, self._num_classes, os.path.join(workdir, PLOT_FILES['slices']),
                            f'{title}: {split} Dice {dice_mean:.3f} (axial, coronal, sagittal)')
    self.write_result(workdir, result)
    return result
