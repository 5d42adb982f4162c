"""DeepCluster-v2 (Caron et al., 2020) on slices: k-means pseudo-labels from a memory bank.

Method state (checkpointed with the rest, so a resumed run continues the epoch exactly):
  bank         [2, M, D] unit projections of every train record (flat slice index), per view,
               overwritten as the records come by (the batch carries 'index');
  assignments  [H, 2, M] the cluster of each record's view under head h's centroids;
  rounds       number of k-means rounds done (0 while the bank is first filled).
Bank and assignments are split by rows over the devices (method_state_specs), so each device
holds 1/devices of them. M is the N train records rounded up to a multiple of train.batch_size
(which every device count must divide), so the layout, and a checkpoint, fit any device count the
batch allows; rows N..M-1 are never written nor clustered.

Epochs: an epoch is ceil(N / train.batch_size) steps. The first epoch only fills the bank (the
reference code's init_memory pass, made of the loop's own batches): the loss is reported as 0 and
the update is held back (StepOutput.apply_update). Before the first step of every later epoch,
before_step runs spherical k-means (deepcluster.kmeans_iterations rounds, dot-product assignment,
empty clusters re-seeded with random bank rows) for each head on the bank of view h % 2, on the
device under lax.cond, assigns both views' bank rows to those centroids, and sets head h's
prototypes to them. The loss is the cross-entropy of each view's prototype scores / temperature
against the assignment of the same record's other view, averaged over heads and views.

The prototypes are frozen between k-means rounds unless deepcluster.train_prototypes (the released
DeepCluster-v2 scripts freeze them for far longer than the run). Multi-crop is not implemented.
k-means runs under jit over the whole (sharded) bank: XLA splits its matrix products and sums by
rows and reduces the centroid sums across devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from dsset import checkpointing, losses, optim, parallel
from dsset.config_validation import ConfigError
from dsset.methods.base import StepOutput
from dsset.methods.clustering import (ClusteringMethod, IndexedSimclrSampler, cluster_usage,
                                      positive_int, positive_number, prototype_name,
                                      spherical_kmeans)


def _prototype_list(v) -> bool:
  return isinstance(v, (tuple, list)) and len(v) > 0 and all(positive_int(k) for k in v)


class DeepClusterMethod(ClusteringMethod):
  """deepcluster_v2: config keys under config.deepcluster (configs/deepcluster_v2.py)."""

  config_rules = {
      'deepcluster.num_prototypes': (_prototype_list,
                                     'a non-empty list of integers > 0 (clusters per head)'),
      'deepcluster.temperature': (positive_number, 'a number > 0'),
      'deepcluster.kmeans_iterations': (positive_int, 'an integer > 0'),
      'deepcluster.train_prototypes': ((lambda v: isinstance(v, bool)), 'True or False'),
  }

  def __init__(self, config):
    super().__init__(config)
    self._num_records = 0

  @classmethod
  def prototype_counts(cls, config):
    return tuple(int(k) for k in config.deepcluster.num_prototypes)

  def make_sampler(self, source):
    d = self.config.data
    sampler = IndexedSimclrSampler(source, int(d.image_size), int(d.channels),
                                   on_bad_scan=str(d.on_bad_scan),
                                   crop_source_size=int(self.config.augment.crop_source_size))
    self._num_records = sampler.num_records
    largest = max(self.model.prototypes)
    if 0 < self._num_records < largest:
      raise ConfigError(
          f'config key deepcluster.num_prototypes={tuple(self.model.prototypes)}: k-means needs '
          f'at least as many train slices as clusters, and data.source={d.source!r} has '
          f'{self._num_records}; use fewer clusters or more data')
    return sampler

  @property
  def steps_per_epoch(self) -> int:
    """Steps that see every record at least once (valid after make_train_iterator)."""
    return optim.steps_per_epoch(self._num_records, int(self.config.train.batch_size))

  def init_method_state(self, variables):
    if not self._num_records:
      raise RuntimeError('init_method_state before make_train_iterator: the bank size is unknown')
    dim, heads = int(self.config.model.head_out), len(self.model.prototypes)
    rows = self.bank_rows
    return {'bank': jnp.zeros((2, rows, dim), jnp.float32),
            'assignments': jnp.zeros((heads, 2, rows), jnp.int32),
            'rounds': jnp.zeros((), jnp.int32)}

  @property
  def bank_rows(self) -> int:
    """M: the train records rounded up to a multiple of the global batch, so the rows split
    evenly over any device count the batch size allows."""
    batch = int(self.config.train.batch_size)
    return -(-self._num_records // batch) * batch

  def method_state_specs(self, method_state):
    rows = PartitionSpec(None, parallel.DATA_AXIS)
    return {'bank': rows, 'assignments': PartitionSpec(None, None, parallel.DATA_AXIS),
            'rounds': PartitionSpec()}

  def frozen_paths(self, phase):
    return () if self.config.deepcluster.train_prototypes else self.prototype_paths()

  def cluster(self, params, method_state, rng):
    """k-means for every head on the bank: new prototypes and assignments."""
    n = self._num_records
    bank = method_state['bank'][:, :n]
    assignments = method_state['assignments']
    iterations = int(self.config.deepcluster.kmeans_iterations)
    for head, k in enumerate(self.model.prototypes):
      view = head % 2
      centroids, own = spherical_kmeans(bank[view], k, iterations, jax.random.fold_in(rng, head))
      other = jnp.argmax(bank[1 - view] @ centroids.T, axis=1).astype(jnp.int32)
      assignments = (assignments.at[head, view, :n].set(own)
                     .at[head, 1 - view, :n].set(other))
      params = checkpointing.replace_subtree(params, (prototype_name(head), 'kernel'),
                                             centroids.T)
    return params, dict(method_state, assignments=assignments,
                        rounds=method_state['rounds'] + 1)

  def before_step(self, params, method_state, step, rng, phase):
    epoch_start = (step >= self.steps_per_epoch) & (step % self.steps_per_epoch == 0)
    return jax.lax.cond(epoch_start, lambda: self.cluster(params, method_state, rng),
                        lambda: (params, method_state))

  def loss_with_state(self, params, batch_stats, method_state, batch, rng, phase):
    h, z, scores, labels, new_batch_stats = self.forward(params, batch_stats, batch, rng)
    index = batch['index']
    assignments = method_state['assignments']
    temperature = float(self.config.deepcluster.temperature)
    head_losses = []
    for head, head_scores in enumerate(scores):
      scores_a, scores_b = jnp.split(head_scores, 2)
      # Each view learns the cluster of the record's other view.
      head_losses.append(0.5 * (
          losses.cluster_cross_entropy(scores_a, assignments[head, 1, index], temperature) +
          losses.cluster_cross_entropy(scores_b, assignments[head, 0, index], temperature)))
    trained = method_state['rounds'] > 0
    loss = jnp.where(trained, jnp.mean(jnp.stack(head_losses)), 0.0)

    # A record can come twice in one batch only across an epoch boundary; the later copy wins,
    # so the result does not depend on the scatter order of a device.
    rows = jnp.arange(index.shape[0])
    later_twin = jnp.any((index[None, :] == index[:, None]) & (rows[None, :] > rows[:, None]),
                         axis=1)
    past_the_end = method_state['bank'].shape[1]
    target = jnp.where(later_twin, past_the_end, index)
    z = jax.lax.stop_gradient(z)
    bank = method_state['bank'].at[:, target].set(jnp.stack(jnp.split(z, 2)), mode='drop')

    usage = [cluster_usage(assignments[head, :, :self._num_records], k)
             for head, k in enumerate(self.model.prototypes)]
    metrics = {'deepcluster_loss': loss, 'kmeans_rounds': method_state['rounds'].astype(jnp.float32),
               **{key: jnp.mean(jnp.stack([u[key] for u in usage])) for key in usage[0]}}
    return loss, StepOutput(new_batch_stats, metrics, h, labels,
                            method_state=dict(method_state, bank=bank), apply_update=trained)
