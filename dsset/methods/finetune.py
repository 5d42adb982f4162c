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
from data_pipelines.record_iterator import RecordIterator
from dsset.config_validation import ConfigError
from dsset.evaluate import features
from dsset.methods.base import StepOutput
from dsset.methods.downstream import ClassificationMethod, softmax
from dsset.models import make_backbone


class SetClassifier(nn.Module):
  """images [B, K, H, W, C] (normalised) -> logits [B, num_classes] from mean slice features."""

  backbone: nn.Module
  num_classes: int

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> jax.Array:
    b, k = images.shape[:2]
    h = self.backbone(images.reshape(b * k, *images.shape[2:]), train=train)
    return nn.Dense(self.num_classes, name='head')(h.reshape(b, k, -1).mean(axis=1))


def distinct_slices(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
  """k slice indices out of n, distinct when the scan has enough slices."""
  return rng.choice(n, size=k, replace=n < k)


class FinetuneMethod(ClassificationMethod):

  @classmethod
  def check_config(cls, config):
    if config.evaluate.scan_features != 'mean':
      raise ConfigError(f'config key evaluate.scan_features={config.evaluate.scan_features!r} is '
                        "not supported with method='finetune': its head is trained on the mean of "
                        "slice features; use 'mean'")

  @property
  def set_size(self) -> int:
    return 1 if self.config.evaluate.level == 'slice' else int(self.config.data.set_size)

  def images_per_example(self) -> int:
    return self.set_size

  def _model(self) -> SetClassifier:
    return SetClassifier(backbone=self._backbone, num_classes=self._num_classes)

  def make_train_iterator(self, process_index=0, process_count=1, batch_multiple=1):
    del batch_multiple
    # First: building the encoder reads backbone.json, so a missing export is named at once.
    self._backbone = make_backbone(self.model_config)
    self._num_classes = self.num_classes()
    scans = [s for s in pipeline.make_eval_dataset(self.config, 'train', 'scan')
             if s['label'] >= 0]
    if not scans:
      raise ConfigError(f'the train split of data.source={self.config.data.source!r} has no '
                        'labelled scans to fine-tune on')
    labels = np.asarray([s['label'] for s in scans], np.int32)
    keep = features.stratified_scan_mask(labels, np.arange(len(scans)),
                                         float(self.config.evaluate.label_fraction),
                                         int(self.config.seed))
    slices = [s['slices'] for s, k in zip(scans, keep) if k]
    labels = labels[keep]
    self._num_train = len(slices)
    self._image_shape = slices[0].shape[1:]
    k, seed = self.set_size, int(self.config.seed)

    def make_batch(indices, positions):
      images = [slices[i][distinct_slices(np.random.default_rng([seed, int(p)]), len(slices[i]), k)]
                for i, p in zip(indices, positions)]
      return {'images': np.stack(images), 'label': labels[indices]}

    return RecordIterator(len(slices), int(self.config.train.batch_size), make_batch, seed,
                          process_index, process_count)

  def init(self, rng):
    return self._model().init(rng, jnp.zeros((1, self.set_size, *self._image_shape)), train=False)

  def loss(self, params, batch_stats, batch, rng, phase):
    del rng, phase
    logits, updates = self._model().apply(
        {'params': params, 'batch_stats': batch_stats}, features.normalise_images(batch['images']),
        train=True, mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
    return loss, StepOutput(updates['batch_stats'], {})

  def finish(self, variables, workdir):
    tuned = {'params': variables['params']['backbone'],
             'batch_stats': variables['batch_stats']['backbone']}
    data = self.split_features(features.FeatureExtractor(self.config, variables=tuned))
    head = variables['params']['head']
    reported = data[self.report_split]
    scores = softmax(reported.features @ np.asarray(head['kernel']) + np.asarray(head['bias']))
    return self.report(workdir, data, scores, self._num_classes, {}, self.training_curve(workdir),
                       'fine-tuning step (mini-batch)')
