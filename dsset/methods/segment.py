"""Segmentation: a U-Net decoder on the encoder, trained end to end on voxel masks.

Training uses a seeded label fraction of the train scans (evaluate.label_fraction, by scan) and
batches of their slices; the loss is soft multi-class Dice + cross-entropy. The first
evaluate.segment_freeze_steps steps train the decoder alone (the encoder in eval mode, its weights
unchanged). No augmentation: the comparison is about the starting encoder. Hard Dice per class is
reported on the split evaluate.report_split names (test by default; val while settings are chosen,
when no test scan is read), with a grid of its slices (image, truth, prediction): over all its
pixels at once (dice_*), and per volume, each scan's slice predictions stacked into its volume
(volume_dice_*, dice_per_volume; dsset.evaluate.segment.volume_dice_result).
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import optax

from data_pipelines.errors import DataError
from data_pipelines.record_iterator import RecordIterator
from dsset.evaluate import features, plots, segment
from dsset.methods.base import StepOutput
from dsset.methods.downstream import DownstreamMethod
from dsset.models import make_backbone, unet

FROZEN_ENCODER = 'frozen encoder'
WHOLE_MODEL = 'whole model'


class SegmentMethod(DownstreamMethod):

  encoder_path = unet.ENCODER_PATH
  train_records = 'train slices'

  def make_train_iterator(self, process_index=0, process_count=1, batch_multiple=1):
    del batch_multiple
    # First: building the encoder reads backbone.json, so a missing export is named at once.
    backbone = make_backbone(self.model_config)
    images, masks = segment.read_split(self.config, 'train',
                                       float(self.config.evaluate.label_fraction))
    self.model = unet.SegmentationModel(backbone, segment.num_classes(self.config, int(masks.max())))
    self._image_shape = images.shape[1:]
    self._num_train = len(images)

    def make_batch(indices, positions):
      del positions
      return {'images': images[indices], 'mask': masks[indices]}

    return RecordIterator(len(images), int(self.config.train.batch_size), make_batch,
                          int(self.config.seed), process_index, process_count)

  def init(self, rng):
    return self.model.init(rng, jnp.zeros((1, *self._image_shape)), train=False)

  def phase(self, step):
    return FROZEN_ENCODER if step <= int(self.config.evaluate.segment_freeze_steps) else WHOLE_MODEL

  def frozen_paths(self, phase):
    return (self.encoder_path,) if phase == FROZEN_ENCODER else ()

  def loss(self, params, batch_stats, batch, rng, phase):
    del rng
    logits, updates = self.model.apply(
        {'params': params, 'batch_stats': batch_stats}, features.normalise_images(batch['images']),
        train=True, train_encoder=phase == WHOLE_MODEL, mutable=['batch_stats'])
    target = batch['mask']
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()
    dice_loss = segment.soft_dice_loss(logits, target, self.model.num_classes)
    return ce + dice_loss, StepOutput(updates['batch_stats'],
                                      {'cross_entropy': ce, 'soft_dice_loss': dice_loss})

  def finish(self, variables, workdir):
    num_classes = self.model.num_classes
    split = self.report_split
    reported = segment.read_volumes(self.config, split)
    images, masks = reported.images, reported.masks
    if int(masks.max()) >= num_classes:
      raise DataError(f'the {split} masks hold id {int(masks.max())}, beyond the {num_classes} '
                      'classes of the train masks; set evaluate.segment_num_classes')
    pred = segment.predict(self.model, variables, images, int(self.config.evaluate.batch_size))
    scores = segment.dice(pred, masks, num_classes)
    foreground = scores[1:][~np.isnan(scores[1:])]  # classes seen in the masks or predictions
    dice_mean = float(foreground.mean()) if foreground.size else float('nan')
    result = {
        'dice_mean': dice_mean,
        'dice_per_class': {str(c): float(scores[c]) for c in range(1, num_classes)},
        'dice_background': float(scores[0]),
        **segment.volume_dice_result(
            segment.volume_dice(pred, masks, reported.slice_counts, num_classes),
            reported.scan_ids),
        'num_classes': num_classes,
        **self.common_result(),
        'num_steps': int(self.config.train.num_steps),
        'segment_freeze_steps': int(self.config.evaluate.segment_freeze_steps),
        'num_examples': {'train': self._num_train, split: int(len(images))},
    }
    title = f'{result["method"]}, segment ({self.config.evaluate.label_fraction:g} labels)'
    curve = self.training_curve(workdir)
    if curve is not None:
      plots.training_curve(curve, os.path.join(workdir, segment.PLOT_FILES['curve']), title,
                           'training step (mini-batch of slices)')
    rows = segment.grid_rows(masks, min(segment.GRID_ROWS, len(masks)))
    plots.segmentation_grid(images[rows, :, :, 0], masks[rows], pred[rows], num_classes,
                            os.path.join(workdir, segment.PLOT_FILES['grid']),
                            f'{title}: {split} Dice {dice_mean:.3f}')
    self.write_result(workdir, result)
    return result
