"""What the patch-based 3D proxy tasks of Taleb et al. share (rpl3d, jigsaw3d): a tuple of patches
of a cube's grid goes through one shared 3D U-Net encoder, and a classifier on the concatenated
features names how the tuple was drawn.

Each example is a random cube of a scan (data_pipelines.volumes). On the device it gets the 3D
augmentation (augment3d.*; the configs keep its geometric part off, as the released code cuts the
patches from unaugmented volumes), then the patch grid of dsset.patches3d with fresh jitter per
patch; the task picks which patches, in which order, make the example's tuple and the label. Every
patch is encoded alone (BatchNorm statistics over all the patches of the batch, as Keras'
TimeDistributed encoder in the released code); the pooled features of the tuple are concatenated in
tuple order and go through the pretext head (dsset.models.PretextHead) and a linear classifier,
trained with cross-entropy. The released code flattens each patch's bottleneck map instead of
pooling it; dsset pools, as rotation3d does, so the head's size does not depend on the patch size.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from data_pipelines import volumes
from dsset import augment3d, patches3d
from dsset.config_validation import ConfigError
from dsset.methods.base import StepOutput
from dsset.methods.clustering import non_negative_int, positive_int
from dsset.methods.pretraining import PretrainingMethod
from dsset.methods.rotation3d import check_3d_encoder
from dsset.models import PretextHead, unet3d


class PatchTupleModel(nn.Module):
  """Patch tuples [N, K, p, p, p, C] -> (encoder features [N, K, F], logits [N, num_classes])."""

  backbone: nn.Module
  hidden: tuple[int, ...]
  dropout: float
  num_classes: int

  @nn.compact
  def __call__(self, tuples, train: bool):
    n, k = tuples.shape[:2]
    h = self.backbone(tuples.reshape((n * k,) + tuples.shape[2:]), train=train).reshape(n, k, -1)
    z = PretextHead(self.hidden, self.dropout, name='pretext_head')(h.reshape(n, -1), train=train)
    return h, nn.Dense(self.num_classes, name='classifier')(z)


def grid_rules(section: str) -> dict:
  """The config rules of the grid keys every patch task has in its own section."""
  return {
      f'{section}.patches_per_side': (positive_int, 'an integer > 0'),
      f'{section}.patch_jitter': (non_negative_int, 'an integer >= 0'),
  }


def encoder_multiple(model_config) -> int:
  """Sides of the encoder's input must be multiples of this (2 ** pooled levels)."""
  return 2 ** len(model_config.unet3d.filters)


class PatchTask3DMethod(PretrainingMethod):
  """A patch task: subclasses set `section` (their config section), the tuple length and class
  count, and draw_tuples; the rest is shared."""

  encoder_path = unet3d.ENCODER_PATH
  section: ClassVar[str]

  def __init__(self, config):
    super().__init__(config)
    self.grid = self.make_grid(config)
    self.model = PatchTupleModel(backbone=unet3d.make_unet3d(config.model),
                                 hidden=tuple(config.model.pretext_hidden),
                                 dropout=float(config.model.pretext_dropout),
                                 num_classes=self.num_classes)

  @classmethod
  def make_grid(cls, config) -> patches3d.PatchGrid:
    s = config[cls.section]
    try:
      return patches3d.make_grid(int(config.data.volume_size), int(s.patches_per_side),
                                 int(s.patch_jitter), encoder_multiple(config.model))
    except ValueError as e:
      raise ConfigError(f'config keys data.volume_size={config.data.volume_size}, '
                        f'{cls.section}.patches_per_side={s.patches_per_side}, '
                        f'{cls.section}.patch_jitter={s.patch_jitter} and model.unet3d.filters='
                        f'{tuple(config.model.unet3d.filters)} do not fit: {e}; use a larger '
                        'data.volume_size or fewer patches or less jitter') from None

  @classmethod
  def check_config(cls, config):
    check_3d_encoder(config)
    cls.make_grid(config)

  @property
  def tuple_length(self) -> int:
    """Patches per example (K)."""
    raise NotImplementedError

  @property
  def num_classes(self) -> int:
    raise NotImplementedError

  def draw_tuples(self, key: jax.Array, batch_size: int,
                  method_state: dict) -> tuple[jax.Array, jax.Array]:
    """Per example, the grid indices of its tuple [B, K] (int) and its label [B] (int)."""
    raise NotImplementedError

  def monitor_features(self, features: jax.Array, indices: jax.Array) -> jax.Array:
    """What the online probe reads [B, F], from the tuple's patch features [B, K, F]."""
    raise NotImplementedError

  def images_per_example(self) -> int:
    return self.tuple_length

  def make_sampler(self, source):
    d = self.config.data
    return volumes.VolumeSampler(source, int(d.volume_size), float(d.voxel_mm),
                                 on_bad_scan=str(d.on_bad_scan))

  def init(self, rng):
    p = self.grid.patch
    return self.model.init(rng, jnp.zeros((1, self.tuple_length, p, p, p, 1)), train=False)

  def make_tuples(self, rng: jax.Array, volumes_uint8: jax.Array,
                  method_state: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Augmented, normalised patch tuples [B, K, p, p, p, C], their grid indices [B, K] and the
    labels [B] of a batch of cubes."""
    augment_key, grid_key, task_key = jax.random.split(rng, 3)
    views, _ = augment3d.augment_volumes(augment_key, volumes_uint8, self.config.augment3d)
    views = augment3d.normalise(views)
    batch_size = views.shape[0]
    starts = jax.vmap(lambda k: patches3d.grid_starts(k, self.grid))(
        jax.random.split(grid_key, batch_size))  # [B, count, 3]
    indices, labels = self.draw_tuples(task_key, batch_size, method_state)
    tuple_starts = jnp.take_along_axis(starts, indices[..., None], axis=1)  # [B, K, 3]
    tuples = jax.vmap(lambda v, s: patches3d.cut_patches(v, s, self.grid.patch))(
        views, tuple_starts)
    return tuples, indices, labels

  def loss(self, params, batch_stats, batch, rng, phase):
    # Outside the loop (which passes the checkpointed state): the state a new run starts from.
    return self.loss_with_state(params, batch_stats, self.init_method_state({}), batch, rng, phase)

  def loss_with_state(self, params, batch_stats, method_state, batch, rng, phase):
    del phase
    tuple_key, dropout_key = jax.random.split(rng)
    tuples, indices, labels = self.make_tuples(tuple_key, batch['volume'], method_state)
    (h, logits), updates = self.model.apply(
        {'params': params, 'batch_stats': batch_stats}, tuples, train=True,
        mutable=['batch_stats'], rngs={'dropout': dropout_key})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
    name = self.config.method
    return loss, StepOutput(updates['batch_stats'],
                            {f'{name}_loss': loss, f'{name}_accuracy': accuracy},
                            self.monitor_features(h, indices), batch['label'])
