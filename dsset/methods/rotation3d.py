"""3D rotation prediction (Taleb et al., NeurIPS 2020): which of 10 rotations turned the volume.

Each example is a random cube of a scan (data_pipelines.volumes); on the device it gets the
intensity part of the 3D augmentation (augment3d.*: geometric augmentation is for the config to
turn on, and configs/rotation3d.py keeps it off, since a flip or a turn of the input is exactly
what the task must tell apart), then one of the 10 rotations of dsset.augment3d.ROTATIONS drawn
uniformly per example. The 3D U-Net encoder's pooled bottleneck feeds the pretext head and a
10-way classifier trained with cross-entropy. The encoder is exported for downstream 3D runs.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from data_pipelines import volumes
from dsset import augment3d
from dsset.config_validation import ConfigError
from dsset.methods.base import StepOutput
from dsset.methods.pretraining import PretrainingMethod
from dsset.models import PretextHead, unet3d


class RotationModel(nn.Module):
  """volumes [N, S, S, S, C] -> (encoder features [N, F], rotation logits [N, 10])."""

  backbone: nn.Module
  hidden: tuple[int, ...]
  dropout: float
  num_classes: int = augment3d.NUM_ROTATIONS

  @nn.compact
  def __call__(self, volumes, train: bool):
    h = self.backbone(volumes, train=train)
    z = PretextHead(self.hidden, self.dropout, name='pretext_head')(h, train=train)
    return h, nn.Dense(self.num_classes, name='classifier')(z)


def check_3d_encoder(config) -> None:
  """Every 3D method needs the 3D encoder: names the key when the config asks for a 2D one."""
  if config.model.backbone != unet3d.BACKBONE:
    raise ConfigError(f'config key model.backbone={config.model.backbone!r} is a 2D encoder; '
                      f'method={config.method!r} trains the 3D encoder: set model.backbone='
                      f'{unet3d.BACKBONE!r} (configs/{config.method}.py does)')


class Rotation3DMethod(PretrainingMethod):

  encoder_path = unet3d.ENCODER_PATH

  def __init__(self, config):
    super().__init__(config)
    self.model = RotationModel(backbone=unet3d.make_unet3d(config.model),
                               hidden=tuple(config.model.pretext_hidden),
                               dropout=float(config.model.pretext_dropout))

  @classmethod
  def check_config(cls, config):
    check_3d_encoder(config)

  def make_sampler(self, source):
    d = self.config.data
    return volumes.VolumeSampler(source, int(d.volume_size), float(d.voxel_mm),
                                 on_bad_scan=str(d.on_bad_scan))

  def init(self, rng):
    size = int(self.config.data.volume_size)
    return self.model.init(rng, jnp.zeros((1, size, size, size, 1)), train=False)

  def loss(self, params, batch_stats, batch, rng, phase):
    del phase
    augment_key, rotation_key, dropout_key = jax.random.split(rng, 3)
    views, _ = augment3d.augment_volumes(augment_key, batch['volume'], self.config.augment3d)
    rotations = jax.random.randint(rotation_key, (views.shape[0],), 0, augment3d.NUM_ROTATIONS)
    views = jax.vmap(augment3d.rotate)(views, rotations)
    (h, logits), updates = self.model.apply(
        {'params': params, 'batch_stats': batch_stats}, augment3d.normalise(views), train=True,
        mutable=['batch_stats'], rngs={'dropout': dropout_key})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, rotations).mean()
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == rotations)
    return loss, StepOutput(updates['batch_stats'],
                            {'rotation_loss': loss, 'rotation_accuracy': accuracy}, h,
                            batch['label'])
