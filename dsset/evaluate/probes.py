"""Classifiers on frozen features: choosing a trained linear probe on val, and a weighted kNN.

(The probes themselves are trained by the training loop: dsset.methods.linear_probe.) Both take
plain arrays (features [N, D], integer labels [N]) so they can be tested without a model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from dsset.evaluate import metrics


@dataclasses.dataclass
class LinearProbe:
  """A fitted probe: standardisation statistics, weights, and how it was chosen."""

  mean: np.ndarray  # [D] train feature mean
  scale: np.ndarray  # [D] train feature std (1 where a feature is constant)
  weights: np.ndarray  # [D, C]
  bias: np.ndarray  # [C]
  weight_decay: float  # the grid value chosen on the validation split
  val_accuracy: dict[float, float]  # grid value -> validation accuracy
  loss_curve: np.ndarray | None  # training loss of the chosen weight decay by logged step

  def scores(self, features: np.ndarray) -> np.ndarray:
    """Softmax class probabilities [N, C]."""
    logits = ((features - self.mean) / self.scale) @ self.weights + self.bias
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def standardiser(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  mean = features.mean(axis=0)
  scale = features.std(axis=0)
  return mean, np.where(scale > 1e-8, scale, 1.0)


def choose_on_val(weights: np.ndarray, bias: np.ndarray, weight_decays: Sequence[float],
                  mean: np.ndarray, scale: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                  loss_curves: dict[float, np.ndarray]) -> LinearProbe:
  """Keeps, of probes trained one per weight decay (weights [G, D, C], bias [G, C] on features
  standardised with mean/scale), the one with the best val accuracy.

  Ties go to the larger weight decay (the simpler model).
  """
  if len(val_y) == 0:
    raise ValueError('the val split has no labelled examples to choose the weight decay on; '
                     'raise data.val_fraction')
  grid = [float(w) for w in weight_decays]
  val_std = (val_x - mean) / scale
  val_acc = {wd: metrics.accuracy(val_y, np.argmax(val_std @ weights[i] + bias[i], axis=1))
             for i, wd in enumerate(grid)}
  best = max(range(len(grid)), key=lambda i: (val_acc[grid[i]], grid[i]))
  return LinearProbe(mean=mean, scale=scale, weights=np.asarray(weights[best]),
                     bias=np.asarray(bias[best]), weight_decay=grid[best], val_accuracy=val_acc,
                     loss_curve=loss_curves.get(grid[best]))


def knn_scores(bank_x: np.ndarray, bank_y: np.ndarray, query_x: np.ndarray, num_classes: int,
               k: int = 20, temperature: float = 0.07) -> np.ndarray:
  """Weighted kNN votes [Q, C] (rows sum to 1), as in InstDisc (Wu et al. 2018) and DINO.

  Cosine similarity to the memory bank; each of the k nearest neighbours votes for its label with
  weight exp(similarity / temperature).
  """
  def unit(v):
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

  similarity = unit(query_x) @ unit(bank_x).T  # [Q, N]
  k = min(k, bank_x.shape[0])
  nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
  sims = np.take_along_axis(similarity, nearest, axis=1)
  # Subtracting the row max keeps exp() finite at small temperatures; the votes are renormalised.
  weights = np.exp((sims - sims.max(axis=1, keepdims=True)) / temperature)
  votes = np.zeros((query_x.shape[0], num_classes))
  np.add.at(votes, (np.arange(query_x.shape[0])[:, None], bank_y[nearest]), weights)
  return votes / votes.sum(axis=1, keepdims=True)
