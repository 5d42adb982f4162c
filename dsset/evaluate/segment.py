"""Segmentation evaluation: a U-Net decoder on the encoder, trained end to end on voxel masks.

Examples are 2D slices with their mask slice (images resized bilinearly to data.image_size, masks
with nearest neighbour so that ids stay ids). Training uses a seeded label fraction of the train
scans (evaluate.label_fraction, by scan), the loss is soft multi-class Dice + cross-entropy, and the
optimiser AdamW; the first evaluate.segment_freeze_steps steps can keep the encoder frozen. No
augmentation: the comparison is about the starting encoder. Dice is reported on the test split.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from data_pipelines import samplers
from data_pipelines.errors import DataError
from data_pipelines.sources import make_source
from dsset import checkpointing
from dsset.config_validation import ConfigError
from dsset.evaluate import features, plots
from dsset.models import make_backbone, unet

PLOT_FILES = {'curve': 'segment_curve.png', 'grid': 'segmentation_grid.png'}
GRID_ROWS = 4  # test slices shown in the image / ground truth / prediction grid


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


def read_split(config, split: str, keep_fraction: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
  """uint8 images [N, S, S, C] and int32 masks [N, S, S] of every slice of the split's scans.

  keep_fraction keeps a seeded share of the scans (stratified by scan label when there is one).
  """
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
  return np.concatenate(images), np.concatenate(masks)


def _num_classes(config, train_masks: np.ndarray) -> int:
  configured = int(config.evaluate.segment_num_classes)
  if configured < 0 or configured == 1:
    raise ConfigError(f'config key evaluate.segment_num_classes={configured} is invalid: expected '
                      '0 (from the masks) or at least 2')
  largest = int(train_masks.max())
  if configured and largest >= configured:
    raise DataError(f'the train masks hold id {largest} but config key '
                    f'evaluate.segment_num_classes={configured}')
  return configured or max(2, largest + 1)


def initial_variables(config, model: unet.SegmentationModel, image_shape: tuple[int, ...]) -> dict:
  """Random decoder (seeded with config.seed); the encoder of config.init_from when given."""
  rng = jax.random.key(int(config.seed), impl='rbg')
  variables = jax.device_get(jax.jit(
      lambda r: model.init(r, jnp.zeros((1, *image_shape)), train=False))(rng))
  if config.init_from:
    encoder, _ = checkpointing.load_backbone(config.init_from)
    variables = checkpointing.insert_backbone(variables, encoder, unet.ENCODER_PATH,
                                              config.init_from)
  return variables


def train_segmenter(config, model: unet.SegmentationModel, variables: dict, images: np.ndarray,
                    masks: np.ndarray) -> tuple[dict, np.ndarray]:
  """Trains on random slices; returns ({'params', 'batch_stats'}, loss per step)."""
  ev = config.evaluate
  num_classes = model.num_classes
  tx = optax.adamw(float(ev.segment_learning_rate), weight_decay=float(ev.segment_weight_decay))
  params, batch_stats = variables['params'], variables['batch_stats']
  opt_state = tx.init(params)

  def step(params, batch_stats, opt_state, x, y, train_encoder):
    def loss_fn(p):
      logits, updates = model.apply({'params': p, 'batch_stats': batch_stats},
                                    features.normalise_images(x), train=True,
                                    train_encoder=train_encoder, mutable=['batch_stats'])
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return ce + soft_dice_loss(logits, y, num_classes), updates['batch_stats']

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    if not train_encoder:
      # AdamW's weight decay would still shrink a frozen encoder: keep its weights as they were.
      new_params = {**new_params, 'backbone': params['backbone']}
    return new_params, new_stats, opt_state, loss

  step = jax.jit(step, static_argnames='train_encoder')
  sampler = np.random.default_rng(int(config.seed))
  batch_size, freeze = int(ev.segment_batch_size), int(ev.segment_freeze_steps)
  losses = []
  for index in range(int(ev.segment_steps)):
    picks = sampler.integers(len(images), size=batch_size)
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, images[picks],
                                                masks[picks], train_encoder=index >= freeze)
    losses.append(float(loss))
  return jax.device_get({'params': params, 'batch_stats': batch_stats}), np.asarray(losses)


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


def _grid_rows(masks: np.ndarray, count: int) -> np.ndarray:
  """Indices of `count` test slices spread over those with the most foreground."""
  foreground = (masks > 0).sum(axis=(1, 2))
  candidates = np.argsort(-foreground, kind='stable')[:max(count, len(masks) // 2)]
  return np.sort(candidates[np.linspace(0, len(candidates) - 1, count).astype(int)])


def evaluate_segmentation(config, workdir: str) -> dict[str, Any]:
  """Trains and tests a segmenter as `config` says; writes its plots to workdir and returns the
  results (dsset.evaluate.run writes them to eval.json)."""
  ev = config.evaluate
  model_config = features.encoder_model_config(config)  # first: it names a missing export clearly
  method = features.pretraining_method(config.init_from)
  for key, low in (('segment_steps', 1), ('segment_batch_size', 1), ('segment_freeze_steps', 0)):
    if int(ev[key]) < low:
      raise ConfigError(f'config key evaluate.{key}={ev[key]} is invalid: expected an integer '
                        f'>= {low}')
  train_images, train_masks = read_split(config, 'train', float(ev.label_fraction))
  test_images, test_masks = read_split(config, 'test')
  num_classes = _num_classes(config, train_masks)
  if int(test_masks.max()) >= num_classes:
    raise DataError(f'the test masks hold id {int(test_masks.max())}, beyond the {num_classes} '
                    'classes of the train masks; set evaluate.segment_num_classes')
  model = unet.SegmentationModel(make_backbone(model_config), num_classes)
  variables = initial_variables(config, model, train_images.shape[1:])
  variables, losses = train_segmenter(config, model, variables, train_images, train_masks)
  pred = predict(model, variables, test_images, int(ev.batch_size))
  scores = dice(pred, test_masks, num_classes)
  foreground = scores[1:][~np.isnan(scores[1:])]  # classes seen in the masks or predictions
  dice_mean = float(foreground.mean()) if foreground.size else float('nan')
  result = {
      'dice_mean': dice_mean,
      'dice_per_class': {str(c): float(scores[c]) for c in range(1, num_classes)},
      'dice_background': float(scores[0]),
      'num_classes': num_classes,
      'method': method,
      'init_from': config.init_from,
      'kind': ev.kind,
      'label_fraction': float(ev.label_fraction),
      'seed': int(config.seed),
      'backbone': model_config.backbone,
      'segment_steps': int(ev.segment_steps),
      'segment_freeze_steps': int(ev.segment_freeze_steps),
      'num_examples': {'train': int(len(train_images)), 'test': int(len(test_images))},
  }
  title = f'{method}, segment ({ev.label_fraction:g} labels)'
  plots.training_curve(losses, os.path.join(workdir, PLOT_FILES['curve']), title,
                       'training step (mini-batch of slices)')
  rows = _grid_rows(test_masks, min(GRID_ROWS, len(test_masks)))
  plots.segmentation_grid(test_images[rows, :, :, 0], test_masks[rows], pred[rows], num_classes,
                          os.path.join(workdir, PLOT_FILES['grid']),
                          f'{title}: test Dice {dice_mean:.3f}')
  return result
