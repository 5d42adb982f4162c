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

from data_pipelines import samplers
from dsset import augment, losses, models
from dsset.config_validation import ConfigError
from dsset.methods.base import StepOutput
from dsset.methods.pretraining import PretrainingMethod

# uint8 slices are scaled to [0, 1] by the augmentation, then centred so the stem sees zero-mean
# inputs; BatchNorm after the stem makes the exact constants unimportant.
INPUT_MEAN = 0.5
INPUT_STD = 0.25


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

  def init(self, rng: jax.Array) -> dict:
    d = self.config.data
    views = jnp.zeros((1, self.set_size, d.image_size, d.image_size, d.channels), jnp.float32)
    mask = jnp.ones((1, self.set_size), bool)
    return self.model.init(rng, views, mask, train=False)

  def augmented_inputs(self, batch, rng):
    """uint8 views [B, 2, K, H, W, C] -> normalised float views [2B, K, H, W, C], mask [2B, K].

    Rows are ordered (all first views, then all second views) so z[:B] and z[B:] are the pairs.
    """
    views = augment.augment_views(rng, batch['views'], self.config.augment,
                                  self.config.data.image_size)
    views = (views - INPUT_MEAN) / INPUT_STD
    views = jnp.concatenate([views[:, 0], views[:, 1]], axis=0)
    mask = jnp.concatenate([batch['mask'][:, 0], batch['mask'][:, 1]], axis=0)
    return views, mask

  def loss(self, params, batch_stats, batch, rng, phase):
    del phase
    views, mask = self.augmented_inputs(batch, rng)
    variables = {'params': params, 'batch_stats': batch_stats}
    (h, z), updates = self.model.apply(variables, views, mask, train=True,
                                       mutable=['batch_stats'])
    z_a, z_b = jnp.split(z, 2, axis=0)
    ids = batch['scan_id'] if self.config.loss.same_scan_positives else None
    loss = losses.nt_xent(z_a, z_b, temperature=self.config.loss.temperature, ids=ids)
    labels = jnp.concatenate([batch['label'], batch['label']], axis=0)
    return loss, StepOutput(updates['batch_stats'], {'contrastive_loss': loss}, h, labels)


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
                                  on_bad_scan=str(d.on_bad_scan))


class PerScanMethod(_SingleSliceMethod):
  """PS-SimCLR: the views are slices i and i + ceil(omega * n) of one scan."""

  def make_sampler(self, source):
    d = self.config.data
    return samplers.PerScanSampler(source, int(d.image_size), int(d.channels), float(d.window),
                                   on_bad_scan=str(d.on_bad_scan))


class DeepSetMethod(ContrastiveMethod):
  """DS-SimCLR: each view is a set of K evenly spaced slices of a random window of one scan."""

  @property
  def set_size(self) -> int:
    return int(self.config.data.set_size)

  def make_sampler(self, source):
    d = self.config.data
    return samplers.DeepSetSampler(source, int(d.image_size), int(d.channels), float(d.window),
                                   int(d.set_size), bool(d.variable_set_size),
                                   on_bad_scan=str(d.on_bad_scan))
