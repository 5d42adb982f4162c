"""Intra-inter clustering (Nguyen et al., AAAI 2023): the masked-embedding and 3D stages, and the
joint objective. The 2D stage (clustering single slices) is the swav method.

Each example is a stack of T = data.num_slices slices of one scan (data_pipelines.volumes.
SliceStackSampler). On the device it gets two views by the 3D augmentations of
intra_inter.augment (dsset.augment3d.intra_inter_views); every slice of both views goes through the
ResNet in one call, and the slice embedding turns each slice's stage pools and feature into a token
(dsset.models.slice_transformer). Then, by intra_inter.objective:

- 'mask' (released stage 2): ceil(mask_ratio * T) tokens of each volume, the same ones in both
  views, are replaced by a learned mask token; the slice transformer and a linear decoder
  reconstruct the tokens. Loss: the squared error over the masked tokens (mask_loss 'masked'), or
  the released code's (mean over all tokens, the views summed, divided by int(mask_ratio * T)).
  The targets are the tokens themselves, without gradient. With freeze_encoder (the released
  stage) the ResNet and the slice embedding stay as loaded, BatchNorm in eval mode, so the targets
  are fixed; unfrozen, nothing stops the tokens from collapsing to one easily predicted vector.
- 'inter' (released stage 3): the volume feature (the L2-normalised mean of the transformer's
  output tokens, no masking) of each view is scored against prototypes, and SwAV's swapped
  prediction with Sinkhorn codes over the global batch (and the queue, swav.queue_length) makes
  the two views of a volume agree. Everything trains, BatchNorm in train mode.
- 'joint': weights (intra, mask, inter) times three terms in one run: the mask and inter terms as
  above (two transformer passes, masked and unmasked), and an intra term that is the swav method
  on slices: intra_inter.intra_slices real slices drawn per volume, two views of each by the 2D
  augmentations (augment.*), through the same ResNet call, a projection head and prototypes of
  their own, swapped prediction between the two views.

Where the released code differs: its slice embedding belongs to the frozen ResNet in the mask
stage and is not loaded when the 3D stage starts (only the transformer is carried over; the
embedding is initialised afresh), where here stage 3 loads the slice embedding stage 2 used; its
transformer attends along the token width rather than the slices (docs/architecture.md, "Slice
transformer"); its prototypes score the unit volume feature directly (projection_head False, which
:paper keeps; the smaller default batches collapsed without the head); its views are augmented on
the host. The DeepCluster-v2 form of the 3D loss is
not implemented.

Parameters: backbone (the ResNet; exported as the encoder), slice_embedding, slice_transformer
(exported to checkpointing.SLICE_TRANSFORMER_FILE for the next stage), mask_token and decoder
('mask', 'joint'), inter_prototypes (and inter_head with projection_head) ('inter', 'joint'),
intra_head and intra_prototypes ('joint').
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from data_pipelines import volumes
from dsset import augment, augment3d, checkpointing, models
from dsset.config_validation import ConfigError
from dsset.methods.base import StepOutput
from dsset.methods.clustering import l2_normalize, positive_int, positive_number
from dsset.methods.pretraining import PretrainingMethod
from dsset.methods.swav import SwavMethod, queue_state, swav_loss, unit_prototypes

OBJECTIVES = ('mask', 'inter', 'joint')
MASK_LOSSES = ('masked', 'released')
# The terms of each objective, in the order of intra_inter.weights.
TERMS = ('intra', 'mask', 'inter')
_PARTS = {'mask': ('mask',), 'inter': ('inter',), 'joint': TERMS}
# What a stage hands on to the next besides the encoder (checkpointing.SLICE_TRANSFORMER_FILE).
TOKEN_MODULES = ('slice_embedding', 'slice_transformer')
_FROZEN_PROTOTYPES = 'prototypes_frozen'


def mask_count(num_tokens: int, ratio: float) -> int:
  """Tokens masked per volume: ceil(ratio * T), as the released MaskGenerator (floating-point
  error below 1e-9 ignored: 0.1 * 30 masks 3)."""
  return math.ceil(round(ratio * num_tokens, 9))


def token_mask(key: jax.Array, batch: int, num_tokens: int, ratio: float) -> jax.Array:
  """bool [batch, T], True where a token is masked: mask_count positions per row, uniformly
  without replacement (the first of a random order)."""
  order = jnp.argsort(jax.random.uniform(key, (batch, num_tokens)), axis=1)
  chosen = order[:, :mask_count(num_tokens, ratio)]
  return jnp.zeros((batch, num_tokens), bool).at[jnp.arange(batch)[:, None], chosen].set(True)


def masked_mse(predictions: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over the masked tokens (mask [N, T]) of the squared error averaged over the width
  (predictions, targets [N, T, D])."""
  error = jnp.mean(jnp.square(predictions - targets), axis=-1)
  return jnp.sum(jnp.where(mask, error, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def released_mse(predictions: jax.Array, targets: jax.Array, ratio: float) -> jax.Array:
  """The released mask stage's loss: for each of the two views (predictions, targets [2B, T, D],
  all first views then all second views) the mean squared error over every token, the two summed
  and divided by int(ratio * T) (at least 1: the released code divides by 0 below 10 slices)."""
  per_view = jnp.mean(jnp.square(predictions - targets).reshape(2, -1), axis=1)
  return jnp.sum(per_view) / max(int(ratio * predictions.shape[1]), 1)


class IntraInterModel(nn.Module):
  """Slice stacks of both views -> a dict of what the objective's terms need.

  backbone, slice_embedding and slice_transformer are modules passed in (Linen names their
  variables after these attributes); parts: the terms to build ('intra', 'mask', 'inter').
  """

  backbone: nn.Module
  slice_embedding: nn.Module
  slice_transformer: nn.Module
  parts: tuple[str, ...]
  num_prototypes: int
  projection_head: bool
  head_hidden: int
  head_out: int

  @nn.compact
  def __call__(self, stacks, mask, slices, train: bool, train_encoder: bool):
    """stacks [N, T, H, W, C] (N = 2B, all first views then all second views), mask [N, T]
    (True: the token is masked; 'mask'), slices [M, H, W, C] (both views of the intra slices;
    'intra'), all float inputs of the encoder. train: dropout and the heads' BatchNorm; train_encoder: the encoder's
    BatchNorm in train mode and gradients into the encoder and slice embedding.

    Returns tokens [N, T, D] (the slice embeddings), volume [N, D] (the volume feature, for the
    probe) and per part: reconstruction [N, T, D]; inter_z, inter_scores; intra_h, intra_z,
    intra_scores.
    """
    n, t = stacks.shape[:2]
    images = stacks.reshape(n * t, *stacks.shape[2:])
    if 'intra' in self.parts:
      images = jnp.concatenate([images, slices.astype(images.dtype)])
    features, pools = self.backbone.features_and_stage_pools(images, train=train_encoder)
    tokens = self.slice_embedding([p[:n * t] for p in [*pools, features]]).reshape(n, t, -1)
    if not train_encoder:
      # Frozen: no gradient flows back into the encoder (frozen_paths keeps its weights too).
      tokens, features = jax.lax.stop_gradient((tokens, features))
    out = {'tokens': tokens}
    if 'mask' in self.parts:
      mask_token = self.param('mask_token', nn.initializers.normal(1.0), (tokens.shape[-1],))
      encoded = self.slice_transformer(jnp.where(mask[..., None], mask_token, tokens),
                                       train=train)
      out['reconstruction'] = nn.Dense(tokens.shape[-1], name='decoder')(encoded)
      out['volume'] = models.volume_feature(encoded)
    if 'inter' in self.parts:
      volume = models.volume_feature(self.slice_transformer(tokens, train=train))
      z = volume
      if self.projection_head:
        z = l2_normalize(models.ProjectionHead(self.head_hidden, self.head_out,
                                               name='inter_head')(volume, train=train))
      out.update(volume=volume, inter_z=z, inter_scores=nn.Dense(
          self.num_prototypes, use_bias=False, name='inter_prototypes')(z))
    if 'intra' in self.parts:
      h = features[n * t:]
      z = l2_normalize(models.ProjectionHead(self.head_hidden, self.head_out,
                                             name='intra_head')(h, train=train))
      out.update(intra_h=h, intra_z=z, intra_scores=nn.Dense(
          self.num_prototypes, use_bias=False, name='intra_prototypes')(z))
    return out


def _pair(low: float | None = None):
  """A rule: (low, high) numbers with low <= high (and low >= `low` when given)."""
  def ok(v):
    return (isinstance(v, (tuple, list)) and len(v) == 2 and
            all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v) and
            v[0] <= v[1] and (low is None or v[0] >= low))
  return ok, 'a pair (low, high) with low <= high' + ('' if low is None else f' and low >= {low}')


def _axes(v) -> bool:
  return (isinstance(v, (tuple, list)) and len(v) > 0 and len(set(v)) == len(v) and
          all(a in (0, 1, 2) and not isinstance(a, bool) for a in v))


def _weights(v) -> bool:
  return (isinstance(v, (tuple, list)) and len(v) == 3 and
          all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in v) and
          sum(v) > 0)


def _bool(v) -> bool:
  return isinstance(v, bool)


_AUGMENT = 'intra_inter.augment.'
_TRANSFORMER = 'model.slice_transformer.'


class IntraInterMethod(PretrainingMethod):
  """intra_inter: config keys under intra_inter, model.slice_transformer, swav and
  data.num_slices (configs/intra_inter.py)."""

  config_rules = {
      'data.num_slices': (positive_int, 'an integer > 0'),
      **{_TRANSFORMER + key: (positive_int, 'an integer > 0') for key in (
          'd_model', 'num_layers', 'num_heads', 'downsample', 'offset_kernel', 'ffn_hidden')},
      _TRANSFORMER + 'offset_scale': (positive_number, 'a number > 0'),
      _TRANSFORMER + 'position_bias': (_bool, 'True or False'),
      _TRANSFORMER + 'dropout': ((lambda v: isinstance(v, (int, float)) and 0 <= v < 1),
                                 'a number in [0, 1)'),
      _TRANSFORMER + 'pre_ln': (_bool, 'True or False'),
      **SwavMethod.config_rules,
      'intra_inter.objective': ((lambda v: v in OBJECTIVES), f'one of {list(OBJECTIVES)}'),
      'intra_inter.weights': (_weights, 'three numbers >= 0 (intra, mask, inter), not all 0'),
      'intra_inter.mask_ratio': ((lambda v: isinstance(v, (int, float)) and 0 < v < 1),
                                 'a number in (0, 1)'),
      'intra_inter.mask_loss': ((lambda v: v in MASK_LOSSES), f'one of {list(MASK_LOSSES)}'),
      'intra_inter.freeze_encoder': (_bool, 'True or False'),
      'intra_inter.projection_head': (_bool, 'True or False'),
      'intra_inter.intra_slices': (positive_int, 'an integer > 0'),
      _AUGMENT + 'transforms': (
          (lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and len(set(v)) == len(v) and
           set(v) <= set(augment3d.INTRA_INTER_TRANSFORMS)),
          f'distinct names of {sorted(augment3d.INTRA_INTER_TRANSFORMS)}'),
      _AUGMENT + 'num_transforms': (positive_int, 'an integer > 0'),
      _AUGMENT + 'distinct_views': (_bool, 'True or False'),
      _AUGMENT + 'flip_axes': (_axes, 'distinct axes among 0, 1, 2'),
      _AUGMENT + 'flip_prob': ((lambda v: isinstance(v, (int, float)) and 0 <= v <= 1),
                               'a probability in [0, 1]'),
      _AUGMENT + 'affine_scales': _pair(low=1e-3),
      _AUGMENT + 'affine_degrees': _pair(),
      _AUGMENT + 'affine_translation': _pair(),
      _AUGMENT + 'anisotropy_axes': (_axes, 'distinct axes among 0, 1, 2'),
      _AUGMENT + 'anisotropy_factor': _pair(low=1),
      _AUGMENT + 'noise_std': _pair(low=0),
      _AUGMENT + 'blur_sigma': _pair(low=0),
      _AUGMENT + 'bias_order': ((lambda v: isinstance(v, int) and not isinstance(v, bool)
                                 and v >= 0), 'an integer >= 0'),
      _AUGMENT + 'bias_coefficients': _pair(),
      _AUGMENT + 'log_gamma': _pair(),
  }

  def __init__(self, config):
    super().__init__(config)
    t = config.model.slice_transformer
    self.parts = _PARTS[config.intra_inter.objective]
    backbone = models.make_backbone(config.model)
    # The encoder's compute dtype (model.dtype) for the tokens' Dense layers too.
    dtype = backbone.layers.dtype
    self.model = IntraInterModel(
        backbone=backbone,
        slice_embedding=models.SliceEmbedding(int(t.d_model), dtype=dtype),
        slice_transformer=models.SliceTransformer(
            num_layers=int(t.num_layers), num_heads=int(t.num_heads),
            downsample=int(t.downsample), offset_kernel=int(t.offset_kernel),
            offset_scale=float(t.offset_scale), position_bias=bool(t.position_bias),
            ffn_hidden=int(t.ffn_hidden), dropout=float(t.dropout), pre_ln=bool(t.pre_ln),
            dtype=dtype),
        parts=self.parts,
        num_prototypes=int(config.swav.num_prototypes),
        projection_head=bool(config.intra_inter.projection_head),
        head_hidden=int(config.model.head_hidden),
        head_out=int(config.model.head_out),
    )

  @classmethod
  def check_config(cls, config):
    if config.model.backbone not in models.BACKBONES:
      raise ConfigError(f'config key model.backbone={config.model.backbone!r}: intra_inter '
                        f'embeds slices with a 2D ResNet, one of {sorted(models.BACKBONES)}')
    t = config.model.slice_transformer
    if t.d_model % t.num_heads:
      raise ConfigError(f'config keys model.slice_transformer.d_model={t.d_model} must be a '
                        f'multiple of model.slice_transformer.num_heads={t.num_heads}')
    if t.offset_kernel < t.downsample:
      raise ConfigError(f'config key model.slice_transformer.offset_kernel={t.offset_kernel} '
                        f'must be at least model.slice_transformer.downsample={t.downsample}, '
                        'or the offset windows skip tokens')
    aug = config.intra_inter.augment
    needed = aug.num_transforms * (2 if aug.distinct_views else 1)
    if needed > len(aug.transforms):
      raise ConfigError(f'config key intra_inter.augment.num_transforms={aug.num_transforms}: '
                        f'the two views need {needed} of the {len(aug.transforms)} transforms '
                        f'(intra_inter.augment.distinct_views={aug.distinct_views})')
    if config.swav.num_small_crops:
      raise ConfigError(f'config key swav.num_small_crops={config.swav.num_small_crops}: '
                        'intra_inter has no multi-crop (its intra slices get two views); train '
                        'stage 1 (configs/intra_inter.py:stage1, the swav method) with it instead')
    m = config.intra_inter
    if m.objective == 'joint' and m.intra_slices > config.data.num_slices:
      raise ConfigError(f'config key intra_inter.intra_slices={m.intra_slices} is more than the '
                        f'data.num_slices={config.data.num_slices} slices of a stack')
    if m.objective == 'joint' and m.freeze_encoder and m.weights[0] > 0:
      raise ConfigError('config keys intra_inter.freeze_encoder=True and intra_inter.weights: '
                        'the intra term (weight > 0) trains the encoder that freeze_encoder '
                        'keeps fixed')

  @property
  def num_slices(self) -> int:
    return int(self.config.data.num_slices)

  @property
  def _intra_slices(self) -> int:
    return int(self.config.intra_inter.intra_slices) if 'intra' in self.parts else 0

  def make_sampler(self, source):
    d = self.config.data
    return volumes.SliceStackSampler(source, self.num_slices, int(d.image_size),
                                     int(d.channels), on_bad_scan=str(d.on_bad_scan))

  @property
  def monitor_dim(self) -> int:
    """The online probe reads the volume feature."""
    return int(self.config.model.slice_transformer.d_model)

  def images_per_example(self) -> int:
    return 2 * (self.num_slices + self._intra_slices)

  def init(self, rng):
    d = self.config.data
    image = (d.image_size, d.image_size, d.channels)
    stacks = jnp.zeros((2, self.num_slices, *image), jnp.float32)
    slices = jnp.zeros((2 * self._intra_slices, *image), jnp.float32)
    return self.model.init(rng, stacks, jnp.zeros((2, self.num_slices), bool), slices,
                           train=False, train_encoder=False)

  def init_method_state(self, variables):
    length = int(self.config.swav.queue_length)
    dims = {'inter': int(self.config.model.head_out) if self.config.intra_inter.projection_head
            else int(self.config.model.slice_transformer.d_model),
            'intra': int(self.config.model.head_out)}
    state = {part: queue_state(length, dims[part]) for part in ('inter', 'intra')
             if part in self.parts}
    return {part: queue for part, queue in state.items() if queue}

  def _prototype_layers(self) -> tuple[str, ...]:
    return tuple(f'{part}_prototypes' for part in ('inter', 'intra') if part in self.parts)

  def phase(self, step):
    frozen = self._prototype_layers() and step <= int(self.config.swav.freeze_prototypes_steps)
    return _FROZEN_PROTOTYPES if frozen else None

  def frozen_paths(self, phase):
    paths = tuple((name,) for name in self._prototype_layers()) if phase else ()
    if self.config.intra_inter.freeze_encoder:
      paths += (('backbone',), ('slice_embedding',))
    return paths

  def before_step(self, params, method_state, step, rng, phase):
    # SwAV's prototype normalisation before every step, outside the gradient (dsset.methods.swav).
    for name in self._prototype_layers():
      params = unit_prototypes(params, name)
    return params, method_state

  def _inputs(self, batch, rng):
    """The model's float inputs: both 3D views of every stack [2B, T, H, W, C], the token mask
    [2B, T] (one per volume, the same in both views) and both 2D views of the intra slices
    [2 B S, H, W, C]; rows all first views, then all second views."""
    views_key, mask_key, pick_key, slices_key = jax.random.split(rng, 4)
    stacks = batch['slices']
    b, t = stacks.shape[:2]
    views = augment3d.intra_inter_views(views_key, stacks, self.config.intra_inter.augment)
    views = augment3d.normalise(jnp.moveaxis(views, 1, 0)).reshape(2 * b, *stacks.shape[1:])
    mask = token_mask(mask_key, b, t, float(self.config.intra_inter.mask_ratio))
    slices = None
    if self._intra_slices:
      # Real slices first (padded ones only when a stack has too few), in random order.
      order = jnp.argsort(jax.random.uniform(pick_key, (b, t)) + jnp.where(batch['valid'], 0, 2),
                          axis=1)[:, :self._intra_slices]
      picked = jnp.take_along_axis(stacks, order[:, :, None, None, None], axis=1)
      pairs = jnp.repeat(picked.reshape(-1, 1, 1, *stacks.shape[2:]), 2, axis=1)
      slices = augment.augment_views(slices_key, pairs, self.config.augment,
                                     int(self.config.data.image_size))
      slices = augment3d.normalise(jnp.moveaxis(slices[:, :, 0], 1, 0))
      slices = slices.reshape(-1, *slices.shape[2:])
    return views, jnp.concatenate([mask, mask]), slices

  def loss_with_state(self, params, batch_stats, method_state, batch, rng, phase):
    inputs_key, dropout_key = jax.random.split(rng)
    views, mask, slices = self._inputs(batch, inputs_key)
    out, updates = self.model.apply(
        {'params': params, 'batch_stats': batch_stats}, views, mask, slices, train=True,
        train_encoder=not self.config.intra_inter.freeze_encoder, mutable=['batch_stats'],
        rngs={'dropout': dropout_key})
    m = self.config.intra_inter
    terms, metrics, new_state = {}, {}, {}
    if 'mask' in self.parts:
      targets = jax.lax.stop_gradient(out['tokens'])
      terms['mask'] = (released_mse(out['reconstruction'], targets, float(m.mask_ratio))
                       if m.mask_loss == 'released' else
                       masked_mse(out['reconstruction'], targets, mask))
    for part in ('inter', 'intra'):
      if part in self.parts:
        terms[part], usage, queue = swav_loss(
            out[f'{part}_scores'], out[f'{part}_z'], params[f'{part}_prototypes']['kernel'],
            method_state.get(part, {}), self.config.swav)
        metrics.update({f'{part}_{key}': value for key, value in usage.items()})
        if queue is not None:
          new_state[part] = queue
    weights = dict(zip(TERMS, m.weights)) if m.objective == 'joint' else {self.parts[0]: 1.0}
    loss = sum(float(weights[part]) * term for part, term in terms.items())
    metrics.update({f'{part}_loss': term for part, term in terms.items()})
    labels = jnp.concatenate([batch['label'], batch['label']])
    return loss, StepOutput(updates['batch_stats'], metrics, out['volume'], labels,
                            method_state=new_state or None)

  def load_init_from(self, variables):
    """The encoder of init_from, and its slice embedding and transformer when it has them (a
    stage-2 or joint workdir); a 2D workdir (stage 1) gives the encoder only."""
    variables = super().load_init_from(variables)
    loaded = checkpointing.load_slice_transformer(self.config.init_from)
    if loaded is None:
      return variables
    params = dict(variables['params'])
    for name in TOKEN_MODULES:
      want = traverse_util.flatten_dict(params[name])
      have = traverse_util.flatten_dict(loaded.get(name, {}))
      wrong = sorted('/'.join((name, *path)) for path in set(want) | set(have)
                     if np.shape(want.get(path)) != np.shape(have.get(path))
                     or (path in want) != (path in have))
      if wrong:
        raise ConfigError(
            f'config key init_from={self.config.init_from!r}: its {name} does not match this '
            'config (model.slice_transformer.*, data.num_slices, and the encoder\'s width): '
            + ', '.join(wrong[:4]) + (f' and {len(wrong) - 4} more' if len(wrong) > 4 else ''))
      params[name] = traverse_util.unflatten_dict(
          {path: np.asarray(have[path], np.asarray(value).dtype) for path, value in want.items()})
    return {**variables, 'params': params}

  def finish(self, variables, workdir):
    result = super().finish(variables, workdir)
    result['slice_transformer'] = checkpointing.export_slice_transformer(
        workdir, {name: variables['params'][name] for name in TOKEN_MODULES})
    return result
