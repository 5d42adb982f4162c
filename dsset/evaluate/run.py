"""One evaluation run: a linear probe or a kNN on frozen features, full fine-tuning, or
segmentation (dsset.evaluate.segment); writes eval.json and PNG plots.

train (optionally a stratified label fraction of it) fits the classifier (or fine-tunes the
encoder and a head), val chooses the probe's weight decay, and every reported metric is on test.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from data_pipelines.sources import make_source
from dsset import config_validation, train
from dsset.config_validation import ConfigError
from dsset.evaluate import features, finetune, metrics, plots, probes, segment

KINDS = ('linear', 'knn', 'finetune', 'segment')
EVAL_FILE = 'eval.json'
PLOT_FILES = {'confusion': 'confusion_matrix.png', 'curve': 'probe_curve.png',
              'embedding': 'test_embedding_pca.png'}


def _check(config) -> None:
  ev = config.evaluate
  if ev.kind not in KINDS:
    raise ConfigError(f'config key evaluate.kind={ev.kind!r} is invalid: expected one of {KINDS}')
  if ev.level not in features.LEVELS:
    raise ConfigError(f'config key evaluate.level={ev.level!r} is invalid: expected one of '
                      f'{features.LEVELS}')
  if not isinstance(ev.knn_k, int) or ev.knn_k < 1:
    raise ConfigError(f'config key evaluate.knn_k={ev.knn_k!r} is invalid: expected an integer > 0')
  if ev.kind == 'finetune' and ev.scan_features != 'mean':
    raise ConfigError(f'config key evaluate.scan_features={ev.scan_features!r} is not supported '
                      "with evaluate.kind='finetune': its head is trained on the mean of slice "
                      "features; use 'mean'")
  if not ev.weight_decays:
    raise ConfigError('config key evaluate.weight_decays is empty: give at least one value')


def _classify(config, data: dict[str, features.SplitFeatures], num_classes: int,
              head: dict | None) -> tuple[np.ndarray, dict[str, Any], np.ndarray | None]:
  """Test scores [N, C], extra summary entries, and the probe's loss curve (None for kNN).

  head: the fine-tuned linear head (kind 'finetune'), applied to the fine-tuned features.
  """
  ev = config.evaluate
  tr, te = data['train'], data['test']
  if ev.kind == 'finetune':
    logits = te.features @ head['kernel'] + head['bias']
    scores = np.exp(logits - logits.max(axis=1, keepdims=True))
    return scores / scores.sum(axis=1, keepdims=True), {}, None
  if ev.kind == 'knn':
    scores = probes.knn_scores(tr.features, tr.labels, te.features, num_classes,
                               k=int(ev.knn_k), temperature=float(ev.knn_temperature))
    return scores, {'knn_k': int(ev.knn_k), 'knn_temperature': float(ev.knn_temperature)}, None
  try:
    probe = probes.fit_linear_probe(
        tr.features, tr.labels, data['val'].features, data['val'].labels, num_classes,
        ev.weight_decays, steps=int(ev.probe_steps),
        learning_rate=float(ev.probe_learning_rate))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  extra = {'weight_decay': probe.weight_decay,
           'val_accuracy_by_weight_decay': {str(k): v for k, v in probe.val_accuracy.items()}}
  return probe.scores(te.features), extra, probe.loss_curve


def evaluate(config, workdir: str) -> dict[str, Any]:
  """Runs the evaluation `config` describes, writes its results and plots to `workdir`; returns
  the content of eval.json."""
  config_validation.validate(config)
  _check(config)
  workdir = train.prepare_workdir(workdir, config)
  train.enable_compilation_cache()
  if config.evaluate.kind == 'segment':
    result = segment.evaluate_segmentation(config, workdir)
  else:
    result = _evaluate_classification(config, workdir)
  path = os.path.join(workdir, EVAL_FILE)
  with open(path + '.tmp', 'w') as f:
    json.dump(result, f, indent=2, sort_keys=True)
  os.replace(path + '.tmp', path)
  return result


def _evaluate_classification(config, workdir: str) -> dict[str, Any]:
  """A linear probe, kNN or fine-tuning run; writes its plots and returns eval.json's content.

  The split features are computed once; the classifier sees only the features.
  """
  ev = config.evaluate
  extractor = features.FeatureExtractor(config)  # first: it names a missing export clearly
  method = features.pretraining_method(config.init_from)
  # The source's class count, not the largest label seen: a class may be missing from small splits.
  num_classes = make_source(config.data, 'train').num_classes
  head, finetune_curve = None, None
  if ev.kind == 'finetune':
    extractor, head, finetune_curve = finetune.finetune(config, extractor, num_classes)
  data = {split: features.extract_split(config, extractor, split, ev.level)
          for split in ('train', 'val', 'test')}
  for split in ('train', 'test'):
    if len(data[split].labels) == 0:
      raise ConfigError(f'the {split} split of data.source={config.data.source!r} has no labelled '
                        'scans to evaluate on')
  data['train'] = features.stratified_scan_subset(data['train'], float(ev.label_fraction),
                                                  int(config.seed))
  scores, extra, curve = _classify(config, data, num_classes, head)
  curve = finetune_curve if curve is None else curve
  test = data['test']
  result = {
      **metrics.classification_metrics(test.labels, scores),
      'method': method,
      'init_from': config.init_from,
      'kind': ev.kind,
      'level': ev.level,
      'scan_features': ev.scan_features,
      'label_fraction': float(ev.label_fraction),
      'seed': int(config.seed),
      'backbone': extractor.model_config.backbone,
      'num_features': extractor.num_features,
      'num_examples': {split: int(len(d.labels)) for split, d in data.items()},
      **extra,
  }
  title = f'{method}, {ev.kind} ({ev.level}, {ev.label_fraction:g} labels)'
  counts = metrics.confusion_matrix(test.labels, np.argmax(scores, axis=1), num_classes)
  plots.confusion_matrix(counts, os.path.join(workdir, PLOT_FILES['confusion']), title)
  plots.embedding_map(test.features, test.labels, os.path.join(workdir, PLOT_FILES['embedding']),
                      f'test embeddings (PCA): {method}')
  if curve is not None:
    xlabel = ('fine-tuning step (mini-batch)' if ev.kind == 'finetune'
              else 'probe step (full batch)')
    plots.training_curve(curve, os.path.join(workdir, PLOT_FILES['curve']), title, xlabel)
  return result
