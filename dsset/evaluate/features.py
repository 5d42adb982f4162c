"""Frozen-encoder features of the evaluation splits, computed once per split.

Levels (config key evaluate.level):
  'slice': one feature per labelled slice (the scan's label on each of its slices).
  'scan':  one feature per labelled scan, from the features of all its slices, pooled as config key
           evaluate.scan_features says:
             'mean':        their mean, for every encoder; it keeps scans of different depth
                            comparable.
             'set_encoder': the pretrained set encoder: its pooling (model.pooling of the
                            pretraining run, sum or mean) and its rho when it was trained with one
                            (model.rho). For SimCLR and PS-SimCLR runs (no rho) this is the sum or
                            mean; for the random-init baseline, config.model's pooling and a
                            randomly initialised rho when config.model.rho is set.
             'slice_transformer': the volume feature of intra-inter clustering's pretrained
                            slice transformer (init_from must hold its slice_transformer.msgpack):
                            dsset.evaluate.slice_transformer_features, which make_extractor picks.

The encoder is the 2D backbone alone, in eval mode (BatchNorm running statistics), either loaded
from a pretraining workdir (config key init_from) or randomly initialised from config.model with
config.seed (the random-init baseline).

BatchNorm statistics (config key evaluate.recompute_batch_stats: 'random_init' | 'always' |
'never'): a random-init encoder's running statistics are the initial 0 and 1, which scale its
eval-mode features arbitrarily. Before extracting features the extractor can replace them: every
image of the train split (all its scans, labelled or not) goes through the encoder in train mode,
in batches of evaluate.batch_size (the last one masked where padded), and each BatchNorm's running
mean and variance become the mean and (biased) variance of its inputs over all those images and
positions, combined exactly across batches (not a moving average). As in torch's update_bn, each
layer's inputs are those of the train-mode pass, whose earlier layers normalise by batch. The
default 'random_init' does it for the random-init baseline only; an encoder handed in as variables
(a fine-tuned one) is never changed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data_pipelines import pipeline
from dsset import checkpointing
from dsset.config_validation import ConfigError
# The pretraining method normalises inputs with these constants; the BatchNorm running statistics
# of a pretrained encoder were collected on inputs scaled this way, so features must use the same.
from dsset.methods.contrastive import INPUT_MEAN, INPUT_STD
from dsset.models import SetEncoder, layers, make_backbone, unet3d

LEVELS = ('slice', 'scan')
SCAN_FEATURES = ('mean', 'set_encoder', 'slice_transformer')
RECOMPUTE_BATCH_STATS = ('random_init', 'always', 'never')
RANDOM_INIT = 'random init'


@dataclasses.dataclass
class SplitFeatures:
  """Features of one split at one level; scan_ids index the scans of that split's source."""

  features: np.ndarray  # float32 [N, D]
  labels: np.ndarray  # int32 [N]
  scan_ids: np.ndarray  # int32 [N]


def encoder_model_config(config) -> ml_collections.ConfigDict:
  """The model section to build: the pretraining run's (from backbone.json) or config.model.

  Runtime choices (dtype, CPU fast path) always come from this config, so a GPU-trained encoder can
  be evaluated on a CPU and vice versa.
  """
  if not config.init_from:
    return config.model
  _, source_model = checkpointing.load_backbone(config.init_from)
  if checkpointing.is_torch_file(config.init_from):
    # A torchvision file fixes only the architecture (backbone, small_stem, width_multiplier);
    # the rest of the model section (set pooling, rho) is this config's.
    model = ml_collections.ConfigDict(config.model.to_dict())
    model.update({key: source_model[key]
                  for key in ('backbone', 'small_stem', 'width_multiplier')})
    return model
  model = ml_collections.ConfigDict(source_model)
  model.dtype = config.model.dtype
  model.cpu_fast_path = config.model.cpu_fast_path
  return model


def pretraining_method(init_from: str) -> str:
  """The method of the pretraining run in `init_from` (its config.json), or 'random init'. An
  intra_inter run names its objective too ('intra_inter:mask', ':inter', ':joint'), since its
  stages are different encoders that a comparison must not pool."""
  if not init_from:
    return RANDOM_INIT
  if checkpointing.is_torch_file(init_from):
    return f'torch weights ({os.path.basename(init_from)})'
  path = os.path.join(init_from, 'config.json')
  try:
    with open(path) as f:
      config = json.load(f)
    method = str(config['method'])
  except (OSError, KeyError, ValueError) as e:
    raise ConfigError(f'config key init_from={init_from!r}: cannot read the method from {path} '
                      f'({e})') from None
  objective = config.get('intra_inter', {}).get('objective')
  return f'{method}:{objective}' if objective else method


def normalise_images(images: jax.Array) -> jax.Array:
  """uint8 images -> the float inputs the encoder was pretrained on."""
  return (images.astype(jnp.float32) / 255.0 - INPUT_MEAN) / INPUT_STD


class FeatureExtractor:
  """Jitted, batched encoder: uint8 images [N, H, W, C] -> float32 features [N, D]."""

  def __init__(self, config, variables: dict | None = None):
    """variables: the encoder's {'params', 'batch_stats'} to use instead of init_from/random."""
    # Checked first, so a bad value stops the run before an encoder is loaded or initialised.
    self.scan_features = str(config.evaluate.scan_features)
    if self.scan_features not in SCAN_FEATURES:
      raise ConfigError(f'config key evaluate.scan_features={self.scan_features!r} is invalid: '
                        f'expected one of {SCAN_FEATURES}')
    self.recompute_batch_stats = str(config.evaluate.recompute_batch_stats)
    if self.recompute_batch_stats not in RECOMPUTE_BATCH_STATS:
      raise ConfigError(f'config key evaluate.recompute_batch_stats='
                        f'{self.recompute_batch_stats!r} is invalid: expected one of '
                        f'{RECOMPUTE_BATCH_STATS}')
    self.model_config = encoder_model_config(config)
    self.backbone = self.make_encoder(self.model_config)
    self.batch_size = int(config.evaluate.batch_size)
    self.batch_stats_recomputed = variables is None and (
        self.recompute_batch_stats == 'always'
        or (self.recompute_batch_stats == 'random_init' and not config.init_from))
    if variables is None:
      variables = self.initial_variables(config)
    if self.batch_stats_recomputed:
      variables = self.train_batch_stats(config, variables)
    self.variables = variables
    self._apply = jax.jit(self._encode)
    if self.scan_features == 'set_encoder':
      self.set_encoder = SetEncoder(encoder=None, pooling=self.model_config.pooling,
                                    rho=bool(self.model_config.rho))
      self.set_encoder_variables = self._set_encoder_variables(config)

  def make_encoder(self, model_config):
    return make_backbone(model_config)

  def example_input(self, config) -> jax.Array:
    """One zero input of the encoder, for its initialisation."""
    size, channels = int(config.data.image_size), int(config.data.channels)
    return jnp.zeros((1, size, size, channels))

  def _set_encoder_variables(self, config) -> dict:
    """The pretrained set encoder's own layers, or random ones drawn with config.seed."""
    if config.init_from:
      return checkpointing.load_set_encoder(config.init_from)
    features = jnp.zeros((1, 1, self.num_features))
    rng = jax.random.key(int(config.seed) + 1, impl='rbg')  # not the encoder's draw
    variables = self.set_encoder.init(rng, features, train=False)
    return {'params': variables.get('params', {}), 'batch_stats': variables.get('batch_stats', {})}

  def pool_scan(self, slice_features: np.ndarray) -> np.ndarray:
    """Features [n, D] of all slices of one scan -> its scan feature [D]."""
    if self.scan_features == 'mean':
      return slice_features.mean(axis=0, dtype=np.float64).astype(np.float32)
    if self.scan_features != 'set_encoder':
      # The volume feature needs the slices' tokens, not their features.
      raise ValueError(f'evaluate.scan_features={self.scan_features!r} has its own extractor: '
                       'build it with make_extractor')
    # Not jitted: one tiny call per scan, and real scans differ in slice count.
    pooled = self.set_encoder.apply(self.set_encoder_variables, jnp.asarray(slice_features)[None],
                                    train=False)
    return np.asarray(pooled[0], np.float32)

  def initial_variables(self, config) -> dict:
    """The encoder of config.init_from, or a random one drawn with config.seed."""
    def init(rng):
      return self.backbone.init(rng, self.example_input(config), train=False)

    # The 'rbg' generator compiles several times faster than threefry on a CPU (the random-init
    # baseline only needs a seeded draw from the model's initialisers, not pretraining's bits).
    rng = jax.random.key(int(config.seed), impl='rbg')
    if config.init_from:
      # Only the shapes are needed to check the loaded encoder against this model.
      shapes = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(init, rng))
      encoder, _ = checkpointing.load_backbone(config.init_from)
      return checkpointing.insert_backbone(shapes, encoder, (), config.init_from)
    # Jitted: one compiled program initialises faster than op-by-op dispatch on a CPU.
    return jax.device_get(jax.jit(init)(rng))

  @property
  def num_features(self) -> int:
    return self.backbone.num_features

  @property
  def batch_stats_settings(self) -> dict:
    """What eval.json records about the encoder's BatchNorm statistics."""
    return {'recompute_batch_stats': self.recompute_batch_stats,
            'batch_stats_recomputed': self.batch_stats_recomputed}

  def normalise(self, images: jax.Array) -> jax.Array:
    """uint8 inputs -> what the encoder takes."""
    return normalise_images(images)

  def _encode(self, variables, images):
    return self.backbone.apply(variables, self.normalise(images), train=False)

  def _batches(self, arrays: Iterable[np.ndarray]) -> Iterator[tuple[np.ndarray, int]]:
    """The rows of `arrays`, in order, as (batch of evaluate.batch_size rows, count of real ones):
    the last batch is zero-padded, so the encoder compiles once."""
    pending, held = [], 0
    for array in arrays:
      start = 0
      while start < len(array):
        take = min(self.batch_size - held, len(array) - start)
        pending.append(array[start:start + take])
        held, start = held + take, start + take
        if held == self.batch_size:
          yield np.concatenate(pending), held
          pending, held = [], 0
    if held:
      padding = np.zeros((self.batch_size - held, *pending[0].shape[1:]), pending[0].dtype)
      yield np.concatenate([*pending, padding]), held

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """Encodes in fixed-size batches."""
    out = [np.asarray(self._apply(self.variables, chunk))[:count]
           for chunk, count in self._batches([images])]
    if not out:
      return np.zeros((0, self.num_features), np.float32)
    return np.concatenate(out)

  def _batch_norm_moments(self, variables, images, valid):
    """One train-mode pass over a batch: for each BatchNorm (by module path), the count, mean and
    sum of squared deviations of its inputs over the valid images and every position."""
    moments = {}

    def record(call, args, kwargs, context):
      if context.method_name != '__call__' or not isinstance(context.module, layers.BATCH_NORMS):
        return call(*args, **kwargs)
      x = args[0]
      rows = valid.reshape(-1, *(1,) * (x.ndim - 1))
      weights = jnp.broadcast_to(rows, (*x.shape[:-1], 1)).astype(jnp.float32)
      x32, axes = x.astype(jnp.float32), tuple(range(x.ndim - 1))
      count = jnp.sum(weights)
      mean = jnp.sum(weights * x32, axes) / jnp.maximum(count, 1.0)
      moments[context.module.path] = (count, mean, jnp.sum(weights * (x32 - mean) ** 2, axes))
      # The padding rows are left out of the batch statistics that normalise the real ones.
      return call(*args, **{**kwargs, 'mask': rows})

    with nn.intercept_methods(record):
      # A 3D encoder with dropout drops out in train mode, as torch's would; the key is fixed.
      self.backbone.apply(variables, self.normalise(images), train=True, mutable=['batch_stats'],
                          rngs={'dropout': jax.random.key(0)})
    return moments

  def train_batch_stats(self, config, variables: dict) -> dict:
    """variables with every BatchNorm's running mean and variance replaced by those of its inputs
    over the train split's images in train mode (module docstring)."""
    moments_of = jax.jit(self._batch_norm_moments)
    per_batch = {}
    inputs = (x for x, _, _ in self.scan_inputs(config, 'train', labelled_only=False))
    for chunk, count in self._batches(inputs):
      valid = np.arange(len(chunk)) < count
      for path, moments in jax.device_get(moments_of(variables, chunk, valid)).items():
        per_batch.setdefault(path, []).append(moments)
    if not per_batch:
      raise ConfigError(f'config key evaluate.recompute_batch_stats={self.recompute_batch_stats!r}'
                        f': the train split of data.source={config.data.source!r} has no scans')
    batch_stats = jax.tree.map(np.asarray, variables['batch_stats'])
    for path, batches in per_batch.items():
      counts, means, squares = (np.asarray(m, np.float64) for m in zip(*batches))
      mean = counts @ means / counts.sum()
      # Chan et al.'s pairwise combination: within-batch plus between-batch squared deviations.
      var = (squares.sum(0) + counts @ (means - mean) ** 2) / counts.sum()
      node = batch_stats
      for name in path:
        node = node[name]
      node['mean'], node['var'] = mean.astype(np.float32), var.astype(np.float32)
    return {**variables, 'batch_stats': batch_stats}

  def scan_inputs(self, config, split: str, labelled_only: bool):
    """(encoder inputs of one scan [n, ...], its label, its index in the split) for every scan of
    `split`; labelled_only leaves out those labelled -1. 2D: the scan's slices."""
    for scan in pipeline.make_eval_dataset(config, split, 'scan'):
      if not labelled_only or scan['label'] >= 0:
        yield scan['slices'], int(scan['label']), int(scan['scan_id'])

  def extract_levels(self, config, split: str, labelled_only: bool = True
                     ) -> dict[str, SplitFeatures]:
    """Features of `split` at both levels ({'slice': ..., 'scan': ...}) from one encoder pass.

    labelled_only: leave out scans whose label is -1 (kept, with label -1, when False).
    """
    images, labels, scan_ids = [], [], []
    for slices, label, scan_id in self.scan_inputs(config, split, labelled_only):
      images.append(slices)
      labels.append(label)
      scan_ids.append(scan_id)
    if not images:
      empty = SplitFeatures(np.zeros((0, self.num_features), np.float32),
                            np.zeros(0, np.int32), np.zeros(0, np.int32))
      return {level: empty for level in LEVELS}
    slice_features = self(np.concatenate(images))
    counts = np.asarray([len(slices) for slices in images])
    owners = np.repeat(np.arange(len(images)), counts)
    labels, scan_ids = np.asarray(labels, np.int32), np.asarray(scan_ids, np.int32)
    scan_features = np.stack([self.pool_scan(f)
                              for f in np.split(slice_features, np.cumsum(counts)[:-1])])
    return {
        'slice': SplitFeatures(slice_features, labels[owners], scan_ids[owners]),
        'scan': SplitFeatures(scan_features, labels, scan_ids),
    }


def make_extractor(config, variables: dict | None = None):
  """The feature extractor for the encoder under evaluation: FeatureExtractor for the 2D encoders,
  dsset.evaluate.volume_features.VolumeFeatureExtractor for the 3D one, and
  dsset.evaluate.slice_transformer_features.SliceTransformerFeatureExtractor for
  evaluate.scan_features='slice_transformer'."""
  if str(config.evaluate.scan_features) == 'slice_transformer':
    # First, before the encoder's export is read: a missing slice transformer is named as such.
    from dsset.evaluate.slice_transformer_features import SliceTransformerFeatureExtractor
    return SliceTransformerFeatureExtractor(config, variables)
  if encoder_model_config(config).backbone == unet3d.BACKBONE:
    from dsset.evaluate.volume_features import VolumeFeatureExtractor  # it builds on this module
    return VolumeFeatureExtractor(config, variables)
  return FeatureExtractor(config, variables)


def extract_levels(config, extractor, split: str,
                   labelled_only: bool = True) -> dict[str, SplitFeatures]:
  """Features of `split` at every level the extractor gives, from one encoder pass."""
  return extractor.extract_levels(config, split, labelled_only)


def extract_split(config, extractor, split: str, level: str) -> SplitFeatures:
  """Features of the labelled examples of `split` at `level` ('slice' | 'scan')."""
  if level not in LEVELS:
    raise ConfigError(f'config key evaluate.level={level!r} is invalid: expected one of {LEVELS}')
  levels = extract_levels(config, extractor, split)
  if level not in levels:
    raise ConfigError(f'config key evaluate.level={level!r}: this encoder gives features at '
                      f'{sorted(levels)} level only')
  return levels[level]


def stratified_scan_mask(labels: np.ndarray, scan_ids: np.ndarray, fraction: float,
                         seed: int) -> np.ndarray:
  """Boolean mask over examples keeping a seeded, per-class `fraction` of the scans (at least one
  scan per class).

  Scans rather than slices are drawn, so at slice level a label fraction still means "this share of
  the labelled scans" and every kept scan contributes all its slices.
  """
  if not 0 < fraction <= 1:
    raise ConfigError(f'config key evaluate.label_fraction={fraction!r} is invalid: expected a '
                      'number in (0, 1]')
  if fraction == 1:
    return np.ones(len(labels), bool)
  rng = np.random.default_rng(seed)
  scans, first = np.unique(scan_ids, return_index=True)
  scan_labels = labels[first]
  kept = []
  for label in np.unique(scan_labels):
    members = scans[scan_labels == label]
    count = max(1, int(round(fraction * len(members))))
    kept.append(rng.choice(members, size=count, replace=False))
  return np.isin(scan_ids, np.concatenate(kept))


def stratified_scan_subset(data: SplitFeatures, fraction: float, seed: int) -> SplitFeatures:
  """The examples of the scans that stratified_scan_mask keeps."""
  keep = stratified_scan_mask(data.labels, data.scan_ids, fraction, seed)
  return SplitFeatures(data.features[keep], data.labels[keep], data.scan_ids[keep])
