"""Classifiers on frozen features: a logistic-regression linear probe and a weighted kNN.

Both take plain arrays (features [N, D], integer labels [N]) so they can be tested without a model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

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
  loss_curve: np.ndarray  # [steps] training loss of the chosen weight decay

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


def _fit_many(x: jax.Array, y: jax.Array, num_classes: int, weight_decays: jax.Array,
              steps: int, learning_rate: float):
  """Full-batch multinomial logistic regression, one model per weight decay (vmapped).

  Returns (weights [G, D, C], bias [G, C], loss curves [G, steps]). The L2 penalty (on weights
  only) is part of the loss; Adam on the full batch converges in a few hundred steps on
  standardised features.
  """
  tx = optax.adam(learning_rate)

  def fit_one(weight_decay):
    params = {'w': jnp.zeros((x.shape[1], num_classes)), 'b': jnp.zeros((num_classes,))}

    def loss_fn(p):
      logits = x @ p['w'] + p['b']
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return ce + 0.5 * weight_decay * jnp.sum(p['w'] ** 2)

    def step(carry, _):
      p, opt_state = carry
      loss, grads = jax.value_and_grad(loss_fn)(p)
      updates, opt_state = tx.update(grads, opt_state, p)
      return (optax.apply_updates(p, updates), opt_state), loss

    (params, _), curve = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return params['w'], params['b'], curve

  return jax.vmap(fit_one)(weight_decays)


_fit_many_jit = jax.jit(_fit_many, static_argnums=(2, 4, 5))


def fit_linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray,
                     val_y: np.ndarray, num_classes: int, weight_decays: Sequence[float],
                     steps: int = 500, learning_rate: float = 0.05) -> LinearProbe:
  """Fits one probe per weight decay on train; keeps the one with the best val accuracy.

  Ties go to the larger weight decay (the simpler model). Features are standardised with the train
  statistics, so the weight-decay grid means the same thing for every encoder.
  """
  if len(val_y) == 0:
    raise ValueError('the val split has no labelled examples to choose the weight decay on; '
                     'raise data.val_fraction')
  mean, scale = standardiser(train_x)
  x = jnp.asarray((train_x - mean) / scale, jnp.float32)
  grid = [float(w) for w in weight_decays]
  w, b, curves = jax.device_get(_fit_many_jit(
      x, jnp.asarray(train_y, jnp.int32), num_classes, jnp.asarray(grid, jnp.float32),
      int(steps), float(learning_rate)))
  val_std = (val_x - mean) / scale
  val_acc = {wd: metrics.accuracy(val_y, np.argmax(val_std @ w[i] + b[i], axis=1))
             for i, wd in enumerate(grid)}
  best = max(range(len(grid)), key=lambda i: (val_acc[grid[i]], grid[i]))
  return LinearProbe(mean=mean, scale=scale, weights=np.asarray(w[best]),
                     bias=np.asarray(b[best]), weight_decay=grid[best], val_accuracy=val_acc,
                     loss_curve=np.asarray(curves[best]))


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
