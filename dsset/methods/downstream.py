"""What every downstream method shares: the encoder under evaluation and the results it writes.

The encoder comes from config.init_from (a pretraining workdir: its backbone.json fixes the
architecture, this config only the runtime dtype and CPU fast path) or, with an empty init_from, is
the random-init baseline built from config.model and config.seed. Each run writes eval.json (the
metrics and the settings that produced them) and PNG plots into its workdir; train (optionally a
stratified label fraction of it) fits, val chooses settings, and every reported metric is on the
split evaluate.report_split names: test by default, or val while settings are being chosen, when
the test split is never read (no scan of it is generated, loaded or passed through the encoder).
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


def classification_plots(split: str) -> dict[str, str]:
  """The PNG files of a classification run reporting on `split` (evaluate.report_split): the
  embedding map is named after the split it shows, so a val run never leaves a test_*.png."""
  return {'confusion': 'confusion_matrix.png', 'curve': 'probe_curve.png',
          'embedding': f'{split}_embedding_pca.png'}


class DownstreamMethod(Method):
  """An evaluation of one encoder; subclasses train a head (or nothing) and report on
  evaluate.report_split."""

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
  def report_split(self) -> str:
    """The split every reported metric is computed on (evaluate.report_split: 'test' | 'val')."""
    return str(self.config.evaluate.report_split)

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
        # Val scores were used to choose settings: dsset.compare never pools them with test ones.
        'report_split': self.report_split,
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
    split = result['report_split']
    if 'dice_mean' in result:
      scores = f'{split} Dice (mean over foreground classes) {result["dice_mean"]:.4f}'
    else:
      scores = (f'({result["level"]}): accuracy {result["accuracy"]:.4f}, balanced accuracy '
                f'{result["balanced_accuracy"]:.4f}, AUC {result["auc"]:.4f}')
    return (f'{result["method"]} / {result["kind"]} {scores} on {result["num_examples"][split]} '
            f'{split} examples; results in {workdir}')


class ClassificationMethod(DownstreamMethod):
  """Scan or slice classification (evaluate.level): linear probe, kNN and fine-tuning."""

  def split_features(self, extractor: features.FeatureExtractor
                     ) -> dict[str, features.SplitFeatures]:
    """Labelled features of train (the label fraction), val and the report split at
    evaluate.level: train and val only when the report split is val (test is never read)."""
    ev = self.config.evaluate
    splits = dict.fromkeys(('train', 'val', self.report_split))  # ordered, without a repeat
    data = {split: features.extract_split(self.config, extractor, split, ev.level)
            for split in splits}
    for split in ('train', self.report_split):
      if len(data[split].labels) == 0:
        raise ConfigError(f'the {split} split of data.source={self.config.data.source!r} has no '
                          'labelled scans to evaluate on')
    data['train'] = features.stratified_scan_subset(data['train'], float(ev.label_fraction),
                                                    int(self.config.seed))
    return data

  def report(self, workdir: str, data: dict[str, features.SplitFeatures], scores: np.ndarray,
             num_classes: int, extra: dict[str, Any], curve: np.ndarray | None,
             curve_label: str = '') -> dict[str, Any]:
    """Metrics of `scores` [N, C] of the report split's examples -> eval.json and the plots;
    returns eval.json's content."""
    ev = self.config.evaluate
    split = self.report_split
    reported = data[split]
    result = {
        **metrics.classification_metrics(reported.labels, scores),
        **self.common_result(),
        'level': ev.level,
        'scan_features': ev.scan_features,
        'num_features': int(reported.features.shape[1]),
        'num_classes': int(num_classes),
        'num_examples': {name: int(len(d.labels)) for name, d in data.items()},
        **extra,
    }
    method = result['method']
    title = f'{method}, {result["kind"]} ({ev.level}, {ev.label_fraction:g} labels)'
    files = classification_plots(split)
    counts = metrics.confusion_matrix(reported.labels, np.argmax(scores, axis=1), num_classes)
    plots.confusion_matrix(counts, os.path.join(workdir, files['confusion']),
                           f'{title}, {split} split')
    plots.embedding_map(reported.features, reported.labels,
                        os.path.join(workdir, files['embedding']),
                        f'{split} embeddings (PCA): {method}')
    if curve is not None:
      plots.training_curve(curve, os.path.join(workdir, files['curve']), title, curve_label)
    self.write_result(workdir, result)
    return result


def softmax(logits: np.ndarray) -> np.ndarray:
  """Row-wise softmax [N, C] of numpy logits."""
  logits = logits - logits.max(axis=1, keepdims=True)
  p = np.exp(logits)
  return p / p.sum(axis=1, keepdims=True)
