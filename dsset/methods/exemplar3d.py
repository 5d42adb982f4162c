"""3D exemplar networks (Taleb et al., NeurIPS 2020): a triplet loss pulls a random view of a cube
towards the cube and pushes it away from another cube of the batch.

Each example is a random cube of a scan (data_pipelines.volumes). On the device, per step: the
anchor is a random view of the cube (augment3d.exemplar_augment: flips, quarter and free turns,
brightness/contrast, zoom, with the released code's probabilities), the positive is the cube as it
came, and the negative is the cube of another example, chosen by a derangement of the batch drawn
from the step's key (a single random cycle through the batch, so no example is its own negative).
Views and cubes go through the 3D U-Net encoder as one batch; the pooled encoder features ->
Dense(code_size) -> sigmoid are the embeddings (exemplar3d.pretext_head puts the pretext head in
between). The negative's embedding is the positive's of the deranged example: the same cube, so it
is not encoded a second time. Loss: max(0, d(a, p) - d(a, n) + margin) averaged over the batch,
d the squared L2 distance (exemplar3d.distance='squared_l2', the paper) or its mean over the code
('mean_squared', the released code). Logged beside it: triplet_accuracy (the share of triplets
that meet the margin, d(a, n) >= d(a, p) + margin), positive_distance and negative_distance (batch
means). The online probe reads the encoder features of the unaugmented cubes. The encoder is
exported for downstream 3D runs.

Compared with the released code (HealthML/self-supervised-3d-tasks: algorithms/exemplar.py,
preprocessing/preprocess_exemplar.py, metrics.py):
- it embeds anchor, positive and negative with three separate Dense(1024, sigmoid) layers (each
  Keras call makes a new layer); here one embedding serves all three, as the paper's formulation;
- it flattens the encoder's bottleneck map into the embedding; here the globally averaged features
  (UNet3DEncoder's output, as for rotation3d) feed it, so the layer's size is independent of the
  cube;
- it encodes the three inputs in three calls, BatchNorm normalising each with its own statistics;
  here views and cubes share one batch (and its statistics), and negatives are not re-encoded;
- its triplet loss takes the mean over the code of the squared differences: with sigmoid codes
  that distance is at most 1, so with margin 1 the hinge never closes and the loss is
  d(a, p) - d(a, n) + 1; the paper (and the default here) uses the squared L2 norm;
- its training configs draw negatives from the whole dataset (sample_neg_examples_from='dataset');
  its default, and this method, draw them from the batch;
- free turns and zooms: see dsset.augment3d.exemplar_augment_one (trilinear and centred here,
  cubic splines and a random crop there).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from data_pipelines import volumes
from dsset import augment3d
from dsset.config_validation import (ConfigError, _bool, _non_negative, _one_of, _positive,
                                     _positive_int, _probability, _range)
from dsset.methods.base import StepOutput
from dsset.methods.pretraining import PretrainingMethod
from dsset.methods.rotation3d import check_3d_encoder
from dsset.models import PretextHead, unet3d

DISTANCES = ('squared_l2', 'mean_squared')


class ExemplarModel(nn.Module):
  """volumes [N, S, S, S, C] -> (encoder features [N, F], sigmoid embeddings [N, code_size])."""

  backbone: nn.Module
  code_size: int
  head_hidden: tuple[int, ...]  # () = no pretext head, as the released code
  dropout: float

  @nn.compact
  def __call__(self, volumes, train: bool):
    h = self.backbone(volumes, train=train)
    z = h
    if self.head_hidden:
      z = PretextHead(self.head_hidden, self.dropout, name='pretext_head')(z, train=train)
    return h, nn.sigmoid(nn.Dense(self.code_size, name='embedding')(z))


def derangement(key: jax.Array, n: int) -> jax.Array:
  """A random permutation [n] of 0..n-1 without fixed points (n >= 2): a single cycle visiting
  the examples in a uniformly random order, each example sending to the next. Every n-cycle is
  equally likely, as with the released code's Sattolo shuffle."""
  order = jax.random.permutation(key, n)
  return jnp.zeros(n, jnp.int32).at[order].set(jnp.roll(order, -1).astype(jnp.int32))


def triplet_loss(anchor: jax.Array, positive: jax.Array, negative: jax.Array, margin: float,
                 distance: str = 'squared_l2') -> tuple[jax.Array, dict[str, jax.Array]]:
  """Embeddings [N, D] -> (mean over the batch of max(0, d(a, p) - d(a, n) + margin), metrics).

  d: squared L2 distance ('squared_l2') or the mean over the D codes of the squared differences
  ('mean_squared'). Metrics: triplet_accuracy (share of triplets with d(a, n) >= d(a, p) + margin,
  whose hinge is 0), positive_distance and negative_distance (batch means of d).
  """
  reduce = {'squared_l2': jnp.sum, 'mean_squared': jnp.mean}[distance]
  to_positive = reduce(jnp.square(anchor - positive), axis=-1)
  to_negative = reduce(jnp.square(anchor - negative), axis=-1)
  loss = jnp.mean(jnp.maximum(0.0, to_positive - to_negative + margin))
  return loss, {'triplet_accuracy': jnp.mean(to_negative >= to_positive + margin),
                'positive_distance': jnp.mean(to_positive),
                'negative_distance': jnp.mean(to_negative)}


_AUGMENT_RULES = {
    'flip_prob': _probability(),
    'rotate_prob': _probability(),
    'quarter_turn_prob': _probability(),
    'color_prob': _probability(),
    'brightness_delta': _non_negative(),
    'contrast_range': _range(0.0, float('inf')),
    'zoom_prob': _probability(),
    # Beyond 4x a zoom keeps a sliver of the cube, or makes it a speck.
    'zoom_range': _range(0.25, 4.0),
}


class Exemplar3DMethod(PretrainingMethod):
  """exemplar3d: config keys under config.exemplar3d (configs/exemplar3d.py)."""

  encoder_path = unet3d.ENCODER_PATH
  config_rules = {
      'exemplar3d.code_size': _positive_int(),
      'exemplar3d.margin': _positive(),
      'exemplar3d.distance': _one_of(*DISTANCES),
      'exemplar3d.pretext_head': _bool(),
      **{f'exemplar3d.augment.{key}': rule for key, rule in _AUGMENT_RULES.items()},
  }

  def __init__(self, config):
    super().__init__(config)
    e = config.exemplar3d
    self.model = ExemplarModel(
        backbone=unet3d.make_unet3d(config.model), code_size=int(e.code_size),
        head_hidden=tuple(config.model.pretext_hidden) if e.pretext_head else (),
        dropout=float(config.model.pretext_dropout))

  @classmethod
  def check_config(cls, config):
    check_3d_encoder(config)
    if config.train.batch_size < 2:
      raise ConfigError(f'config key train.batch_size={config.train.batch_size} is too small for '
                        'method=exemplar3d: each negative is another cube of the batch, so it '
                        'needs at least 2')

  def make_sampler(self, source):
    d = self.config.data
    return volumes.VolumeSampler(source, int(d.volume_size), float(d.voxel_mm),
                                 on_bad_scan=str(d.on_bad_scan))

  def images_per_example(self) -> int:
    return 2  # the view and the cube; the negative's embedding is reused

  def init(self, rng):
    size = int(self.config.data.volume_size)
    return self.model.init(rng, jnp.zeros((1, size, size, size, 1)), train=False)

  def loss(self, params, batch_stats, batch, rng, phase):
    del phase
    e = self.config.exemplar3d
    augment_key, negative_key, dropout_key = jax.random.split(rng, 3)
    cubes = batch['volume']
    n = cubes.shape[0]
    views = augment3d.exemplar_augment(augment_key, cubes, e.augment)
    (h, codes), updates = self.model.apply(
        {'params': params, 'batch_stats': batch_stats},
        augment3d.normalise(jnp.concatenate([views, augment3d.to_unit_float(cubes)])),
        train=True, mutable=['batch_stats'], rngs={'dropout': dropout_key})
    anchor, positive = codes[:n], codes[n:]
    negative = positive[derangement(negative_key, n)]
    loss, metrics = triplet_loss(anchor, positive, negative, float(e.margin), str(e.distance))
    return loss, StepOutput(updates['batch_stats'], {'triplet_loss': loss, **metrics}, h[n:],
                            batch['label'])
