"""The SimCLR family of Torpey & Klein: set encoder -> projection head -> NT-Xent over the global
batch.

SimCLR, PS-SimCLR and DS-SimCLR share this model and loss and differ only in how the host sampler
draws the two views: each is a subclass that names its sampler. With K = 1 slice per view the set
encoder is the plain 2D encoder (SimCLR, PS-SimCLR); with K > 1 it is the Deep Set of DS-SimCLR.
Augmentation runs inside the jitted step, from one key per (example, view), so the host only ships
uint8 slices.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from data_pipelines import samplers
from dsset import augment, losses, models
from dsset.config_validation import ConfigError
from dsset.methods.base import StepOutput
from dsset.methods.pretraining import PretrainingMethod
from dsset.models import layers

# uint8 slices are scaled to [0, 1] by the augmentation, then centred so the stem sees zero-mean
# inputs; BatchNorm after the stem makes the exact constants unimportant.
INPUT_MEAN = 0.5
INPUT_STD = 0.25


def normalised_views(rng, shipped, augment_config, size: int):
  """The augment section's pipeline on shipped uint8 views [B, V, K, H, W, C] at output side
  `size`, normalised and view first: float [V, B, K, size, size, C]."""
  views = augment.augment_views(rng, shipped, augment_config, size)
  return jnp.moveaxis((views - INPUT_MEAN) / INPUT_STD, 1, 0)


class ContrastiveModel(nn.Module):
  """views [N, K, H, W, C] + mask [N, K] -> (representation h [N, D], projection z [N, out])."""

  backbone: nn.Module
  pooling: str
  rho: bool
  head_hidden: int
  head_out: int

  @nn.compact
  def __call__(self, views, mask, train: bool):
    h = models.SetEncoder(encoder=self.backbone, pooling=self.pooling, rho=self.rho,
                          name='set_encoder')(views, mask, train=train)
    z = models.ProjectionHead(hidden=self.head_hidden, out=self.head_out, name='head')(
        h, train=train)
    return h, z


class ContrastiveMethod(PretrainingMethod):
  """The shared part; subclasses choose the sampler (make_sampler) and K (set_size)."""

  # Linen names a module passed as an attribute after the first parent attribute that holds it.
  encoder_path = ('backbone',)
  # The set encoder's own layers (rho), exported for scan-level evaluation.
  set_encoder_path = ('set_encoder',)

  def __init__(self, config):
    super().__init__(config)
    self.model = ContrastiveModel(
        backbone=models.make_backbone(config.model),
        pooling=config.model.pooling,
        rho=config.model.rho,
        head_hidden=config.model.head_hidden,
        head_out=config.model.head_out,
    )

  @property
  def set_size(self) -> int:
    """K, slices per view."""
    return 1

  def images_per_example(self) -> int:
    """Slices one example sends through the encoder (two views of K slices)."""
    return 2 * self.set_size

  def epoch_records(self) -> tuple[int, str]:
    """The reference's epoch, for every 2D slice method: one example per train slice (its dataset
    has one item per slice file, though each item draws a scan), whatever the sampler's records."""
    return int(samplers.slice_counts(self._train_source).sum()), 'slices'

  def init(self, rng: jax.Array) -> dict:
    d = self.config.data
    views = jnp.zeros((1, self.set_size, d.image_size, d.image_size, d.channels), jnp.float32)
    mask = jnp.ones((1, self.set_size), bool)
    return self.model.init(rng, views, mask, train=False)

  def augmented_inputs(self, batch, rng):
    """uint8 views [B, 2, K, H, W, C] -> normalised float views [2, B, K, H, W, C] and mask
    [2, B, K], view first (each view's B rows keep the batch's sharding)."""
    views = normalised_views(rng, batch['views'], self.config.augment,
                             int(self.config.data.image_size))
    return views, jnp.moveaxis(batch['mask'], 1, 0)

  def apply_train(self, params, batch_stats, views, mask):
    """The model in train mode on both views of augmented_inputs: (its outputs over 2B rows, all
    first views then all second views, so z[:B] and z[B:] are the pairs; the new batch_stats).

    model.batch_norm_views='separate' (the reference code, which calls the model once per view):
    each view's B rows are a batch of their own, so every BatchNorm normalises a view with that
    view's statistics, and the running averages end as the reference's two calls leave them: the
    first view's update, then the second's. 'joint': one call on all 2B rows, whose statistics mix
    both views.
    """
    def run(view_rows, mask_rows):
      out, updates = self.model.apply({'params': params, 'batch_stats': batch_stats}, view_rows,
                                      mask_rows, train=True, mutable=['batch_stats'])
      return out, updates['batch_stats']

    if self.config.model.batch_norm_views == 'joint':
      return run(views.reshape(-1, *views.shape[2:]), mask.reshape(-1, *mask.shape[2:]))
    # vmap over the views: the convolutions still run as one batch of 2B rows and the model is
    # traced once (two calls in a row compile slower, a scan over the views runs slower), while
    # each BatchNorm reduces over its own view. Both updates then start from the same running
    # averages r: with momentum m, u = m r + (1 - m) s for a view's batch statistic s, and
    # m u_first + u_second - m r is the first update followed by the second.
    momentum = {}

    def note_momentum(call, args, kwargs, context):
      if isinstance(context.module, layers.BATCH_NORMS):
        momentum[context.module.path] = context.module.momentum
      return call(*args, **kwargs)

    with nn.intercept_methods(note_momentum):
      out, updates = jax.vmap(run)(views, mask)
    flat = traverse_util.flatten_dict(updates)
    start = traverse_util.flatten_dict(batch_stats)
    stats = {key: momentum[key[:-1]] * (u[0] - start[key]) + u[1] for key, u in flat.items()}
    return (jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), out),
            traverse_util.unflatten_dict(stats))

  def loss(self, params, batch_stats, batch, rng, phase):
    del phase
    views, mask = self.augmented_inputs(batch, rng)
    (h, z), new_batch_stats = self.apply_train(params, batch_stats, views, mask)
    z_a, z_b = jnp.split(z, 2, axis=0)
    ids = batch['scan_id'] if self.config.loss.same_scan_positives else None
    loss = losses.nt_xent(z_a, z_b, temperature=self.config.loss.temperature, ids=ids)
    labels = jnp.concatenate([batch['label'], batch['label']], axis=0)
    return loss, StepOutput(new_batch_stats, {'contrastive_loss': loss}, h, labels)


class _SingleSliceMethod(ContrastiveMethod):
  """A method whose views are single slices (K = 1)."""

  @classmethod
  def check_config(cls, config):
    if config.data.set_size != 1:
      raise ConfigError(f'config key data.set_size={config.data.set_size} must be 1 for '
                        f'method={config.method!r} (only DS-SimCLR contrasts sets)')


class SimclrMethod(_SingleSliceMethod):
  """SimCLR: both views augment one slice drawn uniformly from all slices of all scans."""

  def make_sampler(self, source):
    d = self.config.data
    return samplers.SimclrSampler(source, int(d.image_size), int(d.channels),
                                  on_bad_scan=str(d.on_bad_scan),
                                  crop_source_size=int(self.config.augment.crop_source_size))


class PerScanMethod(_SingleSliceMethod):
  """PS-SimCLR: the views are slices i and i + ceil(omega * n) of one scan."""

  def make_sampler(self, source):
    d = self.config.data
    return samplers.PerScanSampler(source, int(d.image_size), int(d.channels), float(d.window),
                                   on_bad_scan=str(d.on_bad_scan),
                                   crop_source_size=int(self.config.augment.crop_source_size))


class DeepSetMethod(ContrastiveMethod):
  """DS-SimCLR: each view is a set of K evenly spaced slices of a random window of one scan."""

  @property
  def set_size(self) -> int:
    return int(self.config.data.set_size)

  def make_sampler(self, source):
    d = self.config.data
    return samplers.DeepSetSampler(source, int(d.image_size), int(d.channels), float(d.window),
                                   int(d.set_size), str(d.short_scans),
                                   on_bad_scan=str(d.on_bad_scan),
                                   crop_source_size=int(self.config.augment.crop_source_size))
