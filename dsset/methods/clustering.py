"""What SwAV and DeepCluster-v2 share: the SimCLR encoder and projection head followed by
bias-free prototype layers on the L2-normalised projection, spherical k-means, cluster-usage
metrics, and a slice sampler that tells each example's record index (for memory banks).

Both methods are the SimCLR method (sampler, augmentations, online probe, export) with another
model and loss, so they subclass it; dsset.methods.swav and dsset.methods.deepcluster hold the
differences.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import samplers
from dsset import models
from dsset.methods.contrastive import SimclrMethod
# One unit-length helper for the 2D prototypes and the slice transformer's volume features.
from dsset.models.slice_transformer import l2_normalize


def prototype_name(head: int) -> str:
  return f'prototypes_{head}'


class ClusteringModel(nn.Module):
  """views [N, K, H, W, C] + mask [N, K] -> (representation h [N, D], unit projection z [N, out],
  prototype scores [[N, k_i] for each head i]).

  The encoder and head are the contrastive methods' (the same parameter paths, so export and
  init_from work alike); each head's prototypes are a bias-free Dense whose kernel columns are the
  prototypes.
  """

  backbone: nn.Module
  pooling: str
  rho: bool
  head_hidden: int
  head_out: int
  prototypes: tuple[int, ...]

  @nn.compact
  def __call__(self, views, mask, train: bool):
    h = models.SetEncoder(encoder=self.backbone, pooling=self.pooling, rho=self.rho,
                          name='set_encoder')(views, mask, train=train)
    z = models.ProjectionHead(hidden=self.head_hidden, out=self.head_out, name='head')(
        h, train=train)
    z = l2_normalize(z)
    scores = [nn.Dense(k, use_bias=False, name=prototype_name(i))(z)
              for i, k in enumerate(self.prototypes)]
    return h, z, scores


class IndexedSimclrSampler(samplers.SimclrSampler):
  """The SimCLR sampler plus 'index', the example's record (flat slice index): where its
  projections live in a memory bank. A substitute for an unreadable scan keeps the record's
  index, so every bank row is written each epoch."""

  def map(self, element: int) -> dict:
    example = super().map(element)
    example['index'] = np.int32(element)
    return example


class ClusteringMethod(SimclrMethod):
  """SimCLR's data, augmentations, probe and export with a prototype model; subclasses give the
  prototype counts and the loss."""

  def __init__(self, config):
    super().__init__(config)
    self.model = ClusteringModel(
        backbone=models.make_backbone(config.model),
        pooling=config.model.pooling,
        rho=config.model.rho,
        head_hidden=config.model.head_hidden,
        head_out=config.model.head_out,
        prototypes=self.prototype_counts(config),
    )

  @classmethod
  def prototype_counts(cls, config) -> tuple[int, ...]:
    raise NotImplementedError

  def prototype_paths(self) -> tuple[tuple[str, ...], ...]:
    return tuple((prototype_name(i),) for i in range(len(self.model.prototypes)))

  def loss(self, params, batch_stats, batch, rng, phase):
    raise NotImplementedError('clustering methods keep state: the loop calls loss_with_state')

  def forward(self, params, batch_stats, batch, rng):
    """Augments both views and runs the model: (h [2B, D], z [2B, out], scores per head
    [2B, k], labels [2B], new batch_stats). Rows: all first views, then all second views."""
    views, mask = self.augmented_inputs(batch, rng)
    (h, z, scores), new_batch_stats = self.apply_train(params, batch_stats, views, mask)
    labels = jnp.concatenate([batch['label'], batch['label']], axis=0)
    return h, z, scores, labels, new_batch_stats


def cluster_usage(assignments: jax.Array, num_clusters: int) -> dict[str, jax.Array]:
  """Non-empty clusters and the entropy (nats) of the histogram of hard assignments [N]: a
  collapse shows as few clusters and an entropy far below log(num_clusters)."""
  counts = jnp.zeros((num_clusters,), jnp.float32).at[assignments.reshape(-1)].add(1.0)
  p = counts / jnp.maximum(jnp.sum(counts), 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return {'clusters_used': jnp.sum(counts > 0).astype(jnp.float32), 'cluster_entropy': entropy}


def kmeans_iteration(x: jax.Array, centroids: jax.Array, reseed: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
  """One spherical k-means round: assign each unit row of x [N, D] to its most similar centroid
  [K, D] (dot product), move every centroid to the normalised mean of its rows; a centroid left
  without rows takes the matching row of reseed [K, D] instead (so no cluster stays dead).

  Returns (new unit centroids [K, D], the assignment [N] that produced them).
  """
  num_clusters = centroids.shape[0]
  assignment = jnp.argmax(x @ centroids.T, axis=1)
  counts = jax.ops.segment_sum(jnp.ones(x.shape[:1], x.dtype), assignment, num_clusters)
  sums = jax.ops.segment_sum(x, assignment, num_clusters)
  means = sums / jnp.maximum(counts, 1.0)[:, None]
  return l2_normalize(jnp.where((counts > 0)[:, None], means, reseed)), assignment


def spherical_kmeans(x: jax.Array, num_clusters: int, iterations: int, key: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
  """DeepCluster-v2's k-means on unit vectors x [N, D] (N >= num_clusters): centroids start at
  distinct random rows, then `iterations` rounds of kmeans_iteration with random rows as
  re-seeds; returns (unit centroids [K, D], final assignment [N]).

  Written over the whole array: under jit it is global whatever the sharding of x.
  """
  x = l2_normalize(x)
  init_key, reseed_key = jax.random.split(key)
  centroids = x[jax.random.permutation(init_key, x.shape[0])[:num_clusters]]

  def round_(i, centroids):
    rows = jax.random.randint(jax.random.fold_in(reseed_key, i), (num_clusters,), 0, x.shape[0])
    return kmeans_iteration(x, centroids, x[rows])[0]

  centroids = jax.lax.fori_loop(0, iterations, round_, centroids)
  return centroids, jnp.argmax(x @ centroids.T, axis=1).astype(jnp.int32)


def positive_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v > 0


def non_negative_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def positive_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
