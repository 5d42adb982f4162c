"""SimCLR-family pretraining: set encoder -> projection head -> NT-Xent over the global batch.

With K = 1 slice per view the set encoder is the plain 2D encoder (SimCLR, PS-SimCLR); with K > 1
it is the Deep Set of DS-SimCLR. Augmentation runs here, inside the jitted step, from one key per
(example, view), so the host only ships uint8 slices.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsset import augment, losses, models

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


class ContrastiveMethod:
  """The pure functions the training loop needs: init variables and the loss of one batch."""

  # Where the transferable 2D encoder lives inside the variables (for export and init_from): a
  # Linen module passed as an attribute is named after the first parent attribute that holds it.
  encoder_path = ('backbone',)
  # The set encoder's own layers (rho), exported for scan-level evaluation.
  set_encoder_path = ('set_encoder',)

  def __init__(self, config):
    self.config = config
    self.model = ContrastiveModel(
        backbone=models.make_backbone(config.model),
        pooling=config.model.pooling,
        rho=config.model.rho,
        head_hidden=config.model.head_hidden,
        head_out=config.model.head_out,
    )

  @property
  def set_size(self) -> int:
    """K, slices per view: data.set_size for DS-SimCLR, one slice for the other two."""
    return self.config.data.set_size if self.config.method == 'deepset' else 1

  def images_per_example(self) -> int:
    """Slices one example sends through the encoder (two views of K slices)."""
    return 2 * self.set_size

  def example_batch(self, batch_size: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of one host batch (the batch contract of DESIGN.md)."""
    d = self.config.data
    k = self.set_size
    return {
        'views': jax.ShapeDtypeStruct((batch_size, 2, k, d.image_size, d.image_size, d.channels),
                                      jnp.uint8),
        'mask': jax.ShapeDtypeStruct((batch_size, 2, k), jnp.bool_),
        'scan_id': jax.ShapeDtypeStruct((batch_size,), jnp.int32),
        'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32),
    }

  def init(self, rng: jax.Array) -> dict:
    shapes = self.example_batch()
    views = jnp.zeros(shapes['views'].shape[2:], jnp.float32)[None]
    mask = jnp.ones(shapes['mask'].shape[2:], bool)[None]
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

  def loss(self, params, batch_stats, batch, rng, train: bool = True):
    """Returns (loss, (new_batch_stats, metrics, representations h [2B, D]))."""
    views, mask = self.augmented_inputs(batch, rng)
    variables = {'params': params, 'batch_stats': batch_stats}
    (h, z), updates = self.model.apply(variables, views, mask, train=train,
                                       mutable=['batch_stats'])
    z_a, z_b = jnp.split(z, 2, axis=0)
    ids = batch['scan_id'] if self.config.loss.same_scan_positives else None
    loss = losses.nt_xent(z_a, z_b, temperature=self.config.loss.temperature, ids=ids)
    metrics = {'contrastive_loss': loss}
    return loss, (updates['batch_stats'], metrics, h)
