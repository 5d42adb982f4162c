"""What every downstream method shares: the encoder under evaluation and the results it writes.

The encoder comes from config.init_from (a pretraining workdir: its backbone.json fixes the
architecture, this config only the runtime dtype and CPU fast path) or, with an empty init_from, is
the random-init baseline built from config.model and config.seed. Each run writes eval.json (the
metrics and the settings that produced them) and PNG plots into its workdir; train (optionally a
stratified label fraction of it) fits, val chooses settings, and every reported metric is on test.
"""

from __future__ import annotations

import json
import os
from typing import Any, ClassVar

import ml_collections
import numpy as np

from data_pipelines.sources import make_source
from dsset import reporting
from dsset.config_validation import ConfigError
from dsset.evaluate import features, metrics, plots
from dsset.methods.base import Method

EVAL_FILE = 'eval.json'
CLASSIFICATION_PLOTS = {'confusion': 'confusion_matrix.png', 'curve': 'probe_curve.png',
                        'embedding': 'test_embedding_pca.png'}


class DownstreamMethod(Method):
  """An evaluation of one encoder; subclasses train a head (or nothing) and report on test."""

  encoder_path = ('backbone',)
  # What the train records of one epoch (train.num_epochs) are; make_train_iterator counts them.
  train_records: ClassVar[str] = 'labelled train scans'

  def __init__(self, config):
    super().__init__(config)
    self._model_config = None
    self._num_train = 0

  def epoch_records(self) -> tuple[int, str]:
    return self._num_train, self.train_records

  @property
  def model_config(self) -> ml_collections.ConfigDict:
    if self._model_config is None:
      self._model_config = features.encoder_model_config(self.config)
    return self._model_config

  @property
  def pretraining_method(self) -> str:
    return features.pretraining_method(self.config.init_from)

  def num_classes(self) -> int:
    """The source's class count, not the largest label seen: small splits can miss a class."""
    return make_source(self.config.data, 'train').num_classes

  def common_result(self) -> dict[str, Any]:
    """The settings every eval.json records."""
    return {
        'method': self.pretraining_method,
        'init_from': self.config.init_from,
        'kind': self.config.method,
        'label_fraction': float(self.config.evaluate.label_fraction),
        'seed': int(self.config.seed),
        'backbone': self.model_config.backbone,
    }

  @staticmethod
  def write_result(workdir: str, result: dict[str, Any]) -> None:
    path = os.path.join(workdir, EVAL_FILE)
    with open(path + '.tmp', 'w') as f:
      json.dump(result, f, indent=2, sort_keys=True)
    os.replace(path + '.tmp', path)

  @staticmethod
  def training_curve(workdir: str, key: str = 'loss') -> np.ndarray | None:
    """The logged training curve of this run (metrics.jsonl), or None before any logged step."""
    steps, values = reporting.read_metric(workdir, key)
    return values if len(steps) else None

  def summary(self, result, workdir) -> str:
    if 'dice_mean' in result:
      scores = f'test Dice (mean over foreground classes) {result["dice_mean"]:.4f}'
    else:
      scores = (f'({result["level"]}): accuracy {result["accuracy"]:.4f}, balanced accuracy '
                f'{result["balanced_accuracy"]:.4f}, AUC {result["auc"]:.4f}')
    return (f'{result["method"]} / {result["kind"]} {scores} on {result["num_examples"]["test"]} '
            f'test examples; results in {workdir}')


class ClassificationMethod(DownstreamMethod):
  """Scan or slice classification (evaluate.level): linear probe, kNN and fine-tuning."""

  def split_features(self, extractor: features.FeatureExtractor
                     ) -> dict[str, features.SplitFeatures]:
    """Labelled features of train (the label fraction), val and test at evaluate.level."""
    ev = self.config.evaluate
    data = {split: features.extract_split(self.config, extractor, split, ev.level)
            for split in ('train', 'val', 'test')}
    for split in ('train', 'test'):
      if len(data[split].labels) == 0:
        raise ConfigError(f'the {split} split of data.source={self.config.data.source!r} has no '
                          'labelled scans to evaluate on')
    data['train'] = features.stratified_scan_subset(data['train'], float(ev.label_fraction),
                                                    int(self.config.seed))
    return data

  def report(self, workdir: str, data: dict[str, features.SplitFeatures], scores: np.ndarray,
             num_classes: int, extra: dict[str, Any], curve: np.ndarray | None,
             curve_label: str = '') -> dict[str, Any]:
    """Test metrics of `scores` [N, C] -> eval.json and the plots; returns eval.json's content."""
    ev = self.config.evaluate
    test = data['test']
    result = {
        **metrics.classification_metrics(test.labels, scores),
        **self.common_result(),
        'level': ev.level,
        'scan_features': ev.scan_features,
        'num_features': int(test.features.shape[1]),
        'num_classes': int(num_classes),
        'num_examples': {split: int(len(d.labels)) for split, d in data.items()},
        **extra,
    }
    method = result['method']
    title = f'{method}, {result["kind"]} ({ev.level}, {ev.label_fraction:g} labels)'
    counts = metrics.confusion_matrix(test.labels, np.argmax(scores, axis=1), num_classes)
    plots.confusion_matrix(counts, os.path.join(workdir, CLASSIFICATION_PLOTS['confusion']), title)
    plots.embedding_map(test.features, test.labels,
                        os.path.join(workdir, CLASSIFICATION_PLOTS['embedding']),
                        f'test embeddings (PCA): {method}')
    if curve is not None:
      plots.training_curve(curve, os.path.join(workdir, CLASSIFICATION_PLOTS['curve']), title,
                           curve_label)
    self.write_result(workdir, result)
    return result


def softmax(logits: np.ndarray) -> np.ndarray:
  """Row-wise softmax [N, C] of numpy logits."""
  logits = logits - logits.max(axis=1, keepdims=True)
  p = np.exp(logits)
  return p / p.sum(axis=1, keepdims=True)
