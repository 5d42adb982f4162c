"""Linear probe: multinomial logistic regression on frozen, standardised encoder features.

The encoder's features of train, val and the report split are computed once, before training.
One probe per value of evaluate.weight_decays is trained at the same time (their parameters are
stacked on a leading grid axis and the loss is their mean, so each gets its own gradient) by the
training loop, full batch while the labelled train examples fit in train.batch_size, from zero
weights. The L2 penalty (weights only) is part of each probe's loss; val chooses the weight decay;
the split evaluate.report_split names (test by default) is reported. Features are standardised
with the train statistics, so the grid means the same for every encoder.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from data_pipelines.record_iterator import RecordIterator
from dsset.config_validation import ConfigError
from dsset.evaluate import features, probes
from dsset.methods.base import StepOutput
from dsset.methods.downstream import ClassificationMethod


def weight_decay_metric(weight_decay: float) -> str:
  """The metrics.jsonl key of one probe's training loss."""
  return f'loss_weight_decay_{weight_decay:g}'


class LinearProbeMethod(ClassificationMethod):
  """The probe's variables are {'params': {'kernel': [G, D, C], 'bias': [G, C]}}."""

  encoder_path = None  # the probe trains no encoder; its features come from one
  train_records = 'labelled train examples'

  def __init__(self, config):
    super().__init__(config)
    self.weight_decays = [float(w) for w in config.evaluate.weight_decays]
    self._data = None

  def make_train_iterator(self, process_index=0, process_count=1, batch_multiple=1):
    # First: FeatureExtractor names a missing export before anything else is read.
    extractor = features.make_extractor(self.config)
    self._num_features = extractor.num_features
    self._batch_stats_settings = extractor.batch_stats_settings
    self._num_classes = self.num_classes()
    self._data = self.split_features(extractor)
    train = self._data['train']
    self._mean, self._scale = probes.standardiser(train.features)
    x = ((train.features - self._mean) / self._scale).astype(np.float32)
    y = train.labels.astype(np.int32)
    count = self._num_train = len(y)
    # Full batch when the train examples fit: padded to the device multiple with label -1 rows,
    # which the loss leaves out, so that every step sees each example exactly once.
    batch_size = min(int(self.config.train.batch_size),
                     math.ceil(count / batch_multiple) * batch_multiple)
    records = max(count, batch_size)

    def make_batch(indices, positions):
      del positions
      real = indices < count
      safe = np.where(real, indices, 0)
      return {'features': np.where(real[:, None], x[safe], 0.0).astype(np.float32),
              'label': np.where(real, y[safe], -1).astype(np.int32)}

    return RecordIterator(records, batch_size, make_batch, int(self.config.seed), process_index,
                          process_count)

  def images_per_example(self) -> int:
    return 0  # an example is a feature vector; the encoder ran before training

  def load_init_from(self, variables):
    return variables  # init_from's encoder made the features; the probe itself starts at zero

  def init(self, rng):
    del rng  # from zero weights, as logistic regression is usually started
    grid = len(self.weight_decays)
    return {'params': {'kernel': jnp.zeros((grid, self._num_features, self._num_classes)),
                       'bias': jnp.zeros((grid, self._num_classes))},
            'batch_stats': {}}

  def loss(self, params, batch_stats, batch, rng, phase):
    del rng, phase
    labels = batch['label']
    valid = (labels >= 0).astype(jnp.float32)
    logits = jnp.einsum('nd,gdc->gnc', batch['features'], params['kernel'])
    logits = logits + params['bias'][:, None, :]
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.broadcast_to(jnp.maximum(labels, 0), logits.shape[:2]))
    ce = jnp.sum(ce * valid, axis=1) / jnp.maximum(jnp.sum(valid), 1.0)
    decays = jnp.asarray(self.weight_decays, jnp.float32)
    per_probe = ce + 0.5 * decays * jnp.sum(params['kernel'] ** 2, axis=(1, 2))
    metrics = {weight_decay_metric(w): per_probe[i] for i, w in enumerate(self.weight_decays)}
    return jnp.mean(per_probe), StepOutput(batch_stats, metrics)

  def finish(self, variables, workdir):
    params = jax.device_get(variables['params'])
    val = self._data['val']
    curves = {w: self.training_curve(workdir, weight_decay_metric(w))
              for w in self.weight_decays}
    try:
      probe = probes.choose_on_val(np.asarray(params['kernel']), np.asarray(params['bias']),
                                   self.weight_decays, self._mean, self._scale, val.features,
                                   val.labels, curves)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    extra = {'weight_decay': probe.weight_decay,
             'val_accuracy_by_weight_decay': {str(k): v for k, v in probe.val_accuracy.items()},
             **self._batch_stats_settings}
    # With report_split='val' the weight decay is still chosen on val and then scored on val, so
    # the reported scores are the best of the grid and optimistic: fine for ranking the settings
    # under choice (every candidate gets the same advantage), not as a final result.
    reported = self._data[self.report_split]
    return self.report(workdir, self._data, probe.scores(reported.features), self._num_classes,
                       extra, probe.loss_curve, 'probe step (full batch)')
