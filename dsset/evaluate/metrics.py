"""Classification metrics in NumPy: accuracy, balanced accuracy, macro one-vs-rest AUC, confusion.

Written out rather than imported so that evaluation needs no scikit-learn, and so that classes
absent from a (small, label-fraction) test set are handled the same way everywhere.
"""

from __future__ import annotations

import numpy as np


def accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
  labels, predictions = np.asarray(labels), np.asarray(predictions)
  if labels.size == 0:
    return float('nan')
  return float(np.mean(labels == predictions))


def balanced_accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
  """Mean over the classes present in `labels` of the recall of that class."""
  labels, predictions = np.asarray(labels), np.asarray(predictions)
  present = np.unique(labels)
  if present.size == 0:
    return float('nan')
  return float(np.mean([np.mean(predictions[labels == c] == c) for c in present]))


def _average_ranks(values: np.ndarray) -> np.ndarray:
  """1-based ranks of `values`, ties sharing the mean of the ranks they span."""
  order = np.argsort(values, kind='mergesort')
  sorted_values = values[order]
  ranks = np.empty(len(values), dtype=np.float64)
  # Boundaries of runs of equal values in sorted order.
  starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
  ends = np.r_[starts[1:], len(values)]
  for start, end in zip(starts, ends):
    ranks[order[start:end]] = (start + 1 + end) / 2.0
  return ranks


def binary_auc(is_positive: np.ndarray, scores: np.ndarray) -> float:
  """Area under the ROC curve via the Mann-Whitney U statistic; nan without both classes."""
  is_positive = np.asarray(is_positive, dtype=bool)
  num_pos = int(is_positive.sum())
  num_neg = is_positive.size - num_pos
  if num_pos == 0 or num_neg == 0:
    return float('nan')
  ranks = _average_ranks(np.asarray(scores, dtype=np.float64))
  u = ranks[is_positive].sum() - num_pos * (num_pos + 1) / 2.0
  return float(u / (num_pos * num_neg))


def macro_auc(labels: np.ndarray, scores: np.ndarray) -> float:
  """Mean one-vs-rest AUC over classes that have positives and negatives in `labels`.

  scores: [N, num_classes] (probabilities or any per-class scores). A class absent from `labels`
  has no defined AUC and is left out of the mean; nan when no class qualifies.
  """
  labels = np.asarray(labels)
  scores = np.asarray(scores)
  aucs = [binary_auc(labels == c, scores[:, c]) for c in range(scores.shape[1])]
  aucs = [a for a in aucs if not np.isnan(a)]
  return float(np.mean(aucs)) if aucs else float('nan')


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """counts[i, j] = examples of true class i predicted as class j."""
  counts = np.zeros((num_classes, num_classes), dtype=np.int64)
  np.add.at(counts, (np.asarray(labels), np.asarray(predictions)), 1)
  return counts


def classification_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
  """accuracy, balanced_accuracy and auc of per-class scores [N, num_classes] (argmax predicts)."""
  predictions = np.argmax(scores, axis=1)
  return {
      'accuracy': accuracy(labels, predictions),
      'balanced_accuracy': balanced_accuracy(labels, predictions),
      'auc': macro_auc(labels, scores),
  }
