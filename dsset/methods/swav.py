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
batch in Sinkhorn, so small batches still get balanced codes.

Multi-crop (swav.num_small_crops = N > 0; off by default): besides the two large views at
data.image_size, N small views at swav.small_crop_size, all cut on the device from the same
shipped slice by the SimCLR augmentations, the large ones with area range swav.large_crop_scale
instead of augment.crop_scale, the small ones with swav.small_crop_scale. As in SwAV's code, the
views of each resolution go through the model in one call (two calls a step, BatchNorm running
averages updated by both), codes come from the large views only and every other view predicts each
large view's codes (losses.swapped_prediction). The online probe and the queue see the large views
only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from dsset import checkpointing, losses
from dsset.config_validation import ConfigError, _range
from dsset.methods.base import StepOutput
from dsset.methods.clustering import (ClusteringMethod, cluster_usage, l2_normalize,
                                      non_negative_int, positive_int, positive_number,
                                      prototype_name)
from dsset.methods.contrastive import normalised_views

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
      'swav.num_small_crops': (non_negative_int, 'an integer >= 0 (0 = no multi-crop)'),
      'swav.small_crop_size': (positive_int, 'an integer > 0 (pixels)'),
      # Area ranges of random resized crops, checked as augment.crop_scale is.
      'swav.small_crop_scale': _range(1e-6, 1.0),
      'swav.large_crop_scale': _range(1e-6, 1.0),
  }

  @classmethod
  def check_config(cls, config):
    super().check_config(config)
    s = config.swav
    if not s.num_small_crops:
      return  # the small views' keys are unused
    if s.small_crop_size > config.data.image_size:
      raise ConfigError(f'config key swav.small_crop_size={s.small_crop_size} must be <= '
                        f'data.image_size={config.data.image_size}: the small views are the '
                        'low-resolution crops of multi-crop')
    if config.model.batch_norm_views != 'joint':
      # apply_train's 'separate' path combines the BatchNorm updates of exactly two views.
      raise ConfigError(f'config key model.batch_norm_views={config.model.batch_norm_views!r} '
                        f"must be 'joint' when swav.num_small_crops={s.num_small_crops} > 0: "
                        "multi-crop runs each resolution's views through the model in one call, "
                        "as SwAV's code does")

  def images_per_example(self) -> int:
    # A small view counts as a whole image, though it costs about (small / large)^2 of one.
    return super().images_per_example() + int(self.config.swav.num_small_crops)

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

  def augmented_inputs(self, batch, rng):
    if not self.config.swav.num_small_crops:
      return super().augmented_inputs(batch, rng)
    # SwAV splits the area range: the large crops take the upper part (0.14 to 1 of the slice),
    # the small ones the lower.
    views = self._crops(batch['views'], rng, self.config.swav.large_crop_scale,
                        int(self.config.data.image_size))
    return views, jnp.moveaxis(batch['mask'], 1, 0)

  def small_views(self, batch, rng):
    """swav.num_small_crops (N) small views of every example, each from its own key: normalised
    views [N, B, 1, s, s, C] (s = swav.small_crop_size) and their mask [N, B, 1]."""
    n = int(self.config.swav.num_small_crops)
    # The sampler ships the example's one slice as both views: the small crops come from the first.
    shipped = jnp.repeat(batch['views'][:, :1], n, axis=1)
    views = self._crops(shipped, rng, self.config.swav.small_crop_scale,
                        int(self.config.swav.small_crop_size))
    return views, jnp.moveaxis(jnp.repeat(batch['mask'][:, :1], n, axis=1), 1, 0)

  def _crops(self, shipped, rng, crop_scale, size):
    """The SimCLR method's augmented_inputs (the augment section's pipeline, normalised, view
    first) with crop_scale as the random resized crop's area range and size as its output side:
    shipped slices [B, V, 1, H, W, C] -> [V, B, 1, size, size, C]."""
    aug_config = ml_collections.ConfigDict({**self.config.augment,
                                            'crop_scale': tuple(crop_scale)})
    return normalised_views(rng, shipped, aug_config, size)

  def loss_with_state(self, params, batch_stats, method_state, batch, rng, phase):
    num_small = int(self.config.swav.num_small_crops)
    # Without small views the large ones get rng itself: the same augmentations (and numbers) as
    # before multi-crop existed.
    large_key, small_key = jax.random.split(rng) if num_small else (rng, None)
    h, z, (scores,), labels, new_batch_stats = self.forward(params, batch_stats, batch, large_key)
    small_scores = []
    if num_small:
      # SwAV's code groups the views by resolution: one more call, for all the small views.
      views, mask = self.small_views(batch, small_key)
      (_, _, (small,)), new_batch_stats = self.apply_train(params, new_batch_stats, views, mask)
      small_scores = jnp.split(small, num_small)
    loss, metrics, new_state = swav_loss(scores, z, params[prototype_name(0)]['kernel'],
                                         method_state, self.config.swav, small_scores)
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


def swav_loss(scores, z, prototypes, queue: dict, swav_config, small_scores=()):
  """SwAV's swapped prediction between two views (and multi-crop's small views).

  scores [2B, K]: the prototype scores of the unit projections z [2B, D] (rows: all first views,
  then all second views) against prototypes [D, K]; queue: queue_state's dict ({}: none).
  swav_config: temperature, epsilon and sinkhorn_iterations. small_scores: the scores [B, K] of
  each small view, which have no codes of their own and predict both views' codes.
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
                                   float(swav_config.temperature), small_scores)
  metrics = cluster_usage(jnp.argmax(jnp.concatenate([codes_a, codes_b]), axis=-1),
                          scores.shape[-1])
  if queue:
    metrics['queue_in_use'] = use_queue.astype(jnp.float32)
  return loss, metrics, new_state
