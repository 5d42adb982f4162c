"""Full fine-tuning: the encoder and a linear head trained end to end on the labelled train scans.

One training example is a set of slices of one scan: evaluate.level 'slice' draws one random slice
(K = 1), 'scan' draws K = data.set_size distinct random slices whose features are averaged before
the head, matching the scan feature of dsset.evaluate.features (the mean of slice features), which
is what the fine-tuned model is evaluated on. BatchNorm trains on batch statistics; evaluation uses
the running averages. No augmentation: the comparison is about the starting encoder.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from data_pipelines import pipeline
from dsset.evaluate import features


class SetClassifier(nn.Module):
  """images [B, K, H, W, C] (normalised) -> logits [B, num_classes] from mean slice features."""

  backbone: nn.Module
  num_classes: int

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> jax.Array:
    b, k = images.shape[:2]
    h = self.backbone(images.reshape(b * k, *images.shape[2:]), train=train)
    return nn.Dense(self.num_classes, name='head')(h.reshape(b, k, -1).mean(axis=1))


def _train_scans(config) -> tuple[list[np.ndarray], np.ndarray]:
  """The uint8 slices and labels of the label-fraction subset of the labelled train scans."""
  scans = [s for s in pipeline.make_eval_dataset(config, 'train', 'scan') if s['label'] >= 0]
  labels = np.asarray([s['label'] for s in scans], np.int32)
  keep = features.stratified_scan_mask(labels, np.arange(len(scans)),
                                       float(config.evaluate.label_fraction), int(config.seed))
  return [s['slices'] for s, k in zip(scans, keep) if k], labels[keep]


def finetune(config, extractor: features.FeatureExtractor, num_classes: int):
  """Fine-tunes extractor's encoder; returns (tuned extractor, head {'kernel', 'bias'}, losses)."""
  ev = config.evaluate
  slices, labels = _train_scans(config)
  k = 1 if ev.level == 'slice' else int(config.data.set_size)
  model = SetClassifier(backbone=extractor.backbone, num_classes=num_classes)
  rng = jax.random.key(int(config.seed), impl='rbg')
  shape = (1, k, *slices[0].shape[1:])
  variables = jax.jit(lambda r: model.init(r, jnp.zeros(shape), train=False))(rng)
  # Start from the extractor's encoder (pretrained or random); only the head is new.
  params = {**variables['params'], 'backbone': extractor.variables['params']}
  batch_stats = {'backbone': extractor.variables['batch_stats']}
  tx = optax.adamw(float(ev.finetune_learning_rate), weight_decay=float(ev.finetune_weight_decay))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, batch_stats, opt_state, images, y):
    def loss_fn(p):
      logits, updates = model.apply({'params': p, 'batch_stats': batch_stats},
                                    features.normalise_images(images), train=True,
                                    mutable=['batch_stats'])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, updates['batch_stats']

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  sampler = np.random.default_rng(int(config.seed))
  batch_size = int(ev.finetune_batch_size)
  losses = []
  for _ in range(int(ev.finetune_steps)):
    picks = sampler.integers(len(slices), size=batch_size)
    images = np.stack([slices[i][_distinct(sampler, len(slices[i]), k)] for i in picks])
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, images,
                                                labels[picks])
    losses.append(float(loss))
  tuned = {'params': params['backbone'], 'batch_stats': batch_stats['backbone']}
  tuned = jax.device_get(tuned)
  return (features.FeatureExtractor(config, variables=tuned),
          jax.device_get(params['head']), np.asarray(losses))


def _distinct(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
  """k slice indices out of n, distinct when the scan has enough slices."""
  return rng.choice(n, size=k, replace=n < k)
