"""SwAV (Caron et al., 2020) on slices: online clustering by swapped prediction.

Both augmented views go through the SimCLR encoder and projection head; the L2-normalised
projection is scored against K prototypes (a bias-free linear layer). Each view's codes come from
Sinkhorn-Knopp over the global batch (equal share per prototype), and each view's softmax scores /
temperature predict the other view's codes.

Prototype normalisation: SwAV's code re-normalises the prototypes at the start of every iteration,
outside the gradient; before_step does exactly that, so the loss and the update always start from
unit prototypes (the saved params hold the prototypes after the last update, not re-normalised;
only the encoder is exported). The prototypes are frozen (their update discarded) for the first
swav.freeze_prototypes_steps steps, through the loop's phase/frozen_paths.

Queue (swav.queue_length > 0): the unit projections of the last L examples of each view, kept in
the method state (checkpointed); once full, their scores against the current prototypes join the
batch in Sinkhorn, so small batches still get balanced codes. Multi-crop is not implemented: two
views of the SimCLR augmentations at data.image_size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsset import checkpointing, losses
from dsset.methods.base import StepOutput
from dsset.methods.clustering import (ClusteringMethod, cluster_usage, l2_normalize,
                                      non_negative_int, positive_int, positive_number,
                                      prototype_name)

_FROZEN = 'prototypes_frozen'


class SwavMethod(ClusteringMethod):
  """swav: config keys under config.swav (configs/swav.py)."""

  config_rules = {
      'swav.num_prototypes': (positive_int, 'an integer > 0'),
      'swav.temperature': (positive_number, 'a number > 0'),
      'swav.epsilon': (positive_number, 'a number > 0'),
      'swav.sinkhorn_iterations': (positive_int, 'an integer > 0'),
      'swav.freeze_prototypes_steps': (non_negative_int, 'an integer >= 0'),
      'swav.queue_length': (non_negative_int, 'an integer >= 0 (0 = no queue)'),
  }

  @classmethod
  def prototype_counts(cls, config):
    return (int(config.swav.num_prototypes),)

  def init_method_state(self, variables):
    return queue_state(int(self.config.swav.queue_length), int(self.config.model.head_out))

  def phase(self, step):
    return _FROZEN if step <= int(self.config.swav.freeze_prototypes_steps) else None

  def frozen_paths(self, phase):
    return self.prototype_paths() if phase == _FROZEN else ()

  def before_step(self, params, method_state, step, rng, phase):
    return unit_prototypes(params, prototype_name(0)), method_state

  def loss_with_state(self, params, batch_stats, method_state, batch, rng, phase):
    h, z, (scores,), labels, new_batch_stats = self.forward(params, batch_stats, batch, rng)
    loss, metrics, new_state = swav_loss(scores, z, params[prototype_name(0)]['kernel'],
                                         method_state, self.config.swav)
    return loss, StepOutput(new_batch_stats, {'swav_loss': loss, **metrics}, h, labels,
                            method_state=new_state)


def queue_state(queue_length: int, dim: int) -> dict:
  """A SwAV queue as method state ({} for queue_length 0): the unit projections [dim] of the last
  queue_length examples of each view, and how many of them are filled."""
  if not queue_length:
    return {}
  return {'queue': jnp.zeros((2, queue_length, dim), jnp.float32),
          'queue_filled': jnp.zeros((), jnp.int32)}


def unit_prototypes(params, name: str):
  """params with the prototype layer `name`'s kernel [D, K] (a prototype per column) scaled to
  unit columns."""
  path = (name, 'kernel')
  return checkpointing.replace_subtree(
      params, path, l2_normalize(checkpointing.subtree(params, path), axis=0))


def _codes(scores, queue_scores, use_queue, swav_config):
  """Sinkhorn codes of the batch's scores [B, K], with the queue's scores [L, K] in the
  transport problem when use_queue (traced)."""
  eps, iters = float(swav_config.epsilon), int(swav_config.sinkhorn_iterations)
  if queue_scores is None:
    return losses.sinkhorn(scores, eps, iters)
  return jax.lax.cond(
      use_queue,
      lambda: losses.sinkhorn(jnp.concatenate([queue_scores, scores]), eps, iters)[
          queue_scores.shape[0]:],
      lambda: losses.sinkhorn(scores, eps, iters))


def swav_loss(scores, z, prototypes, queue: dict, swav_config):
  """SwAV's swapped prediction between two views.

  scores [2B, K]: the prototype scores of the unit projections z [2B, D] (rows: all first views,
  then all second views) against prototypes [D, K]; queue: queue_state's dict ({}: none).
  swav_config: temperature, epsilon and sinkhorn_iterations.
  Returns (loss, metrics: cluster usage of the codes and, with a queue, whether it was in use,
  the new queue state or None without a queue).
  """
  scores_a, scores_b = jnp.split(scores, 2)
  z_a, z_b = jnp.split(jax.lax.stop_gradient(z), 2)
  detached = jax.lax.stop_gradient(scores)
  new_state = None
  if queue:
    past, filled = queue['queue'], queue['queue_filled']
    length = past.shape[1]
    # Scored against the prototypes of this step, as SwAV does.
    prototypes = jax.lax.stop_gradient(prototypes)
    queue_scores = [past[0] @ prototypes, past[1] @ prototypes]
    use_queue = filled >= length
    new_state = {'queue': jnp.stack([jnp.concatenate([z_a, past[0]])[:length],
                                     jnp.concatenate([z_b, past[1]])[:length]]),
                 'queue_filled': jnp.minimum(filled + z_a.shape[0], length)}
  else:
    queue_scores, use_queue = [None, None], None
  detached_a, detached_b = jnp.split(detached, 2)
  codes_a = _codes(detached_a, queue_scores[0], use_queue, swav_config)
  codes_b = _codes(detached_b, queue_scores[1], use_queue, swav_config)
  loss = losses.swapped_prediction(scores_a, scores_b, codes_a, codes_b,
                                   float(swav_config.temperature))
  metrics = cluster_usage(jnp.argmax(jnp.concatenate([codes_a, codes_b]), axis=-1),
                          scores.shape[-1])
  if queue:
    metrics['queue_in_use'] = use_queue.astype(jnp.float32)
  return loss, metrics, new_state
