"""Metrics against small cases worked out by hand."""

import numpy as np
import pytest

from dsset.evaluate import metrics


def test_balanced_accuracy_weights_classes_equally():
  labels = np.array([0, 0, 0, 0, 1])
  predictions = np.array([0, 0, 0, 0, 0])
  assert metrics.accuracy(labels, predictions) == pytest.approx(0.8)
  # recall class 0 = 1, class 1 = 0.
  assert metrics.balanced_accuracy(labels, predictions) == pytest.approx(0.5)


def test_binary_auc_by_hand():
  # Positives score 0.8, 0.4; negatives 0.6, 0.2: of the 4 (pos, neg) pairs 3 are ordered right.
  assert metrics.binary_auc([1, 1, 0, 0], [0.8, 0.4, 0.6, 0.2]) == pytest.approx(0.75)
  # A tie between a positive and a negative counts one half: pairs (0.5 vs 0.5) = 0.5, (0.5 vs 0.1)
  # = 1 -> 0.75.
  assert metrics.binary_auc([1, 0, 0], [0.5, 0.5, 0.1]) == pytest.approx(0.75)
  assert np.isnan(metrics.binary_auc([1, 1], [0.2, 0.3]))


def test_macro_auc_skips_absent_classes():
  labels = np.array([0, 0, 1, 1])
  scores = np.array([[0.9, 0.1, 0.0],
                     [0.6, 0.4, 0.0],
                     [0.7, 0.3, 0.0],  # ranks class 1 below one class-0 example
                     [0.2, 0.8, 0.0]])
  # class 0: pos {0.9, 0.6} vs neg {0.7, 0.2} -> 3/4; class 1: pos {0.3, 0.8} vs neg {0.1, 0.4}
  # -> 3/4; class 2 never occurs and is left out of the mean.
  assert metrics.macro_auc(labels, scores) == pytest.approx(0.75)
  perfect = np.eye(3)[[0, 1, 2, 1]]
  assert metrics.macro_auc([0, 1, 2, 1], perfect) == pytest.approx(1.0)


def test_confusion_matrix_counts():
  counts = metrics.confusion_matrix([0, 1, 1, 2], [0, 2, 1, 2], num_classes=3)
  np.testing.assert_array_equal(counts, [[1, 0, 0], [0, 1, 1], [0, 0, 1]])
