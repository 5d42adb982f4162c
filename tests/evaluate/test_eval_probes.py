"""The linear probe and the kNN on features given directly (no model)."""

import numpy as np

from dsset.evaluate import features, metrics, probes


def _separable(n, rng):
  """4 classes split by the signs of two of 16 features (with a margin of one standard deviation
  around zero), the rest noise, on very different scales."""
  x = rng.normal(size=(n, 16))
  x[:, [3, 7]] += np.sign(x[:, [3, 7]])
  x *= np.geomspace(0.01, 100, 16)
  y = (x[:, 3] > 0).astype(int) * 2 + (x[:, 7] > 0).astype(int)
  return x.astype(np.float32), y


def test_choose_on_val_keeps_the_best_weight_decay_and_breaks_ties_towards_more_decay():
  rng = np.random.default_rng(0)
  val_x, val_y = _separable(100, rng)
  mean, scale = probes.standardiser(val_x)
  right = np.zeros((16, 4))
  right[3, :] = [-1, -1, 1, 1]  # sign of feature 3 -> classes 2, 3
  right[7, :] = [-1, 1, -1, 1]  # sign of feature 7 -> classes 1, 3
  weights = np.stack([np.zeros((16, 4)), right, right])  # grid 0: always class 0
  bias = np.zeros((3, 4))
  probe = probes.choose_on_val(weights, bias, (0.0, 1e-3, 1e-2), mean, scale, val_x, val_y,
                               {1e-2: np.array([2.0, 1.0])})
  assert probe.weight_decay == 1e-2  # 1e-3 and 1e-2 tie on val: the simpler model wins
  assert probe.val_accuracy[1e-2] > 0.95 and probe.val_accuracy[0.0] < 0.5
  assert metrics.accuracy(val_y, probe.scores(val_x).argmax(1)) > 0.95
  np.testing.assert_array_equal(probe.loss_curve, [2.0, 1.0])


def test_knn_votes_for_the_nearest_cluster():
  bank_x = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [-1, 0]], np.float32)
  bank_y = np.array([0, 0, 1, 1, 2])
  query = np.array([[2, 0.1], [0.05, 3]], np.float32)  # cosine ignores the length
  scores = probes.knn_scores(bank_x, bank_y, query, num_classes=3, k=2)
  np.testing.assert_array_equal(scores.argmax(1), [0, 1])
  np.testing.assert_allclose(scores.sum(1), 1.0)
  # k larger than the bank uses the whole bank; the far class gets a tiny vote.
  scores_all = probes.knn_scores(bank_x, bank_y, query, num_classes=3, k=20)
  assert scores_all[0, 2] < 1e-6 < scores_all[0, 0]


def test_label_fraction_keeps_whole_scans_of_every_class():
  scan_ids = np.repeat(np.arange(40), 3)  # 40 scans of 3 slices
  labels = scan_ids % 4
  data = features.SplitFeatures(np.zeros((120, 2), np.float32), labels, scan_ids)
  subset = features.stratified_scan_subset(data, 0.3, seed=1)
  kept = np.unique(subset.scan_ids)
  assert len(kept) == 12  # 3 of the 10 scans of each class
  np.testing.assert_array_equal(np.bincount(subset.labels), [9, 9, 9, 9])
  assert set(np.bincount(subset.scan_ids)[kept]) == {3}
  tiny = features.stratified_scan_subset(data, 0.01, seed=1)
  np.testing.assert_array_equal(np.unique(tiny.labels), [0, 1, 2, 3])  # at least one per class
  again = features.stratified_scan_subset(data, 0.3, seed=1)
  np.testing.assert_array_equal(again.scan_ids, subset.scan_ids)
