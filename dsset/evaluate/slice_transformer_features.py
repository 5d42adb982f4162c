"""Scan features from intra-inter clustering's slice transformer (config key
evaluate.scan_features='slice_transformer'), for the linear probe, kNN and embeddings.

A scan's feature is the volume feature the pretraining run learned: every slice of the scan
(resized as for every 2D evaluation) goes through the frozen ResNet of init_from (eval-mode
BatchNorm, `ResNet.features_and_stage_pools`), the pretrained slice embedding turns each slice into
a token, the tokens are cropped or padded to the run's T = data.num_slices, and the pretrained
slice transformer (eval mode: no dropout) and `volume_feature` give one unit vector [d_model].
Slice-level features stay the ResNet's features.

init_from must be an intra_inter workdir that wrote slice_transformer.msgpack (stage 2, stage 3
or joint); the transformer's settings and T come from that run's config.json.

Scans of another length than T (the transformer takes exactly T tokens: its relative position
bias is a table of 2T - 1 entries). Pretraining sees a random run of T consecutive slices of a
longer scan, and a shorter scan whole, at a random offset among zero images. Here the offset is
the centre one (`data_pipelines.volumes.stack_indices` without a generator, which is also what
TorchIO's CropOrPad, the released code's, does): a longer scan gives its central T slices, so
(n - T) // 2 slices at its start and the rest at its end are not seen; a shorter one sits in the
middle of zero images. A padded position's token is the token of a zero image through the same
encoder and embedding, as a padded slice's is in pretraining.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from data_pipelines import volumes
from dsset import checkpointing
from dsset.config_validation import ConfigError
from dsset.evaluate.features import FeatureExtractor, SplitFeatures
from dsset.models import ResNet, SliceEmbedding, volume_feature
from dsset.models.slice_transformer import make_slice_transformer

SCAN_FEATURES = 'slice_transformer'
# What slice_transformer.msgpack holds (dsset.methods.intra_inter.TOKEN_MODULES).
EMBEDDING, TRANSFORMER = 'slice_embedding', 'slice_transformer'


def _where(init_from: str) -> str:
  return f"config key evaluate.scan_features='{SCAN_FEATURES}' with init_from={init_from!r}"


def load_volume_model(init_from: str) -> tuple[dict, dict, int]:
  """(the params {slice_embedding, slice_transformer}, the model.slice_transformer settings and
  data.num_slices of the run in init_from); ConfigError naming the keys and the workdir where
  there are none."""
  if not init_from:
    raise ConfigError(f"config key evaluate.scan_features='{SCAN_FEATURES}' reads the slice "
                      'transformer of an intra_inter pretraining run, but config key init_from '
                      'is empty; set it to the workdir of an intra_inter stage-2, stage-3 or '
                      "joint run, or use evaluate.scan_features='mean'")
  if checkpointing.is_torch_file(init_from):
    raise ConfigError(f'{_where(init_from)}: a PyTorch file holds no slice transformer; use '
                      "evaluate.scan_features='mean'")
  params = checkpointing.load_slice_transformer(init_from)
  if params is None:
    raise ConfigError(
        f'{_where(init_from)}: no {checkpointing.SLICE_TRANSFORMER_FILE} there (intra_inter runs '
        f'of stage 2, stage 3 and joint write it; {_method_of(init_from)}); point init_from at '
        "one, or use evaluate.scan_features='mean' (or 'set_encoder' for a DS-SimCLR run)")
  missing = [name for name in (EMBEDDING, TRANSFORMER) if name not in params]
  if missing:
    raise ConfigError(f'{_where(init_from)}: its {checkpointing.SLICE_TRANSFORMER_FILE} has no '
                      f'{" or ".join(missing)}')
  path = os.path.join(init_from, 'config.json')
  try:
    with open(path) as f:
      run = json.load(f)
    settings, num_slices = run['model']['slice_transformer'], int(run['data']['num_slices'])
  except (OSError, KeyError, TypeError, ValueError) as e:
    raise ConfigError(f'{_where(init_from)}: cannot read model.slice_transformer and '
                      f'data.num_slices of that run from {path} ({type(e).__name__}: {e})'
                      ) from None
  return params, dict(settings), num_slices


def _method_of(init_from: str) -> str:
  """'a <method> run has none' from init_from's config.json, for the message."""
  try:
    with open(os.path.join(init_from, 'config.json')) as f:
      return f"a {json.load(f)['method']} run has none"
  except (OSError, KeyError, TypeError, ValueError):
    return 'that folder has no readable config.json'


def token_stack(tokens: np.ndarray, num_slices: int, pad_token: np.ndarray) -> np.ndarray:
  """A scan's slice tokens [n, D] -> the transformer's input [num_slices, D]: the central
  num_slices tokens of a longer scan, or all n centred among copies of pad_token [D]."""
  indices = volumes.stack_indices(len(tokens), num_slices, None)
  return np.where((indices >= 0)[:, None], tokens[np.maximum(indices, 0)], pad_token[None])


class SliceTransformerFeatureExtractor(FeatureExtractor):
  """The 2D FeatureExtractor for slice features; scan features are the pretrained volume features
  (module docstring)."""

  def __init__(self, config, variables: dict | None = None):
    # Before the encoder is loaded: a workdir without a slice transformer stops the run at once.
    self._params, settings, self.num_slices = load_volume_model(config.init_from)
    self._level = str(config.evaluate.level)
    self._d_model = int(np.shape(self._params[EMBEDDING]['project']['kernel'])[-1])
    super().__init__(config, variables)
    # The compute dtype of this config's encoder (model.dtype), as the method uses for the tokens.
    dtype = self.backbone.layers.dtype
    self.embedding = SliceEmbedding(self._d_model, dtype=dtype)
    self.transformer = make_slice_transformer(settings, dtype)
    self._check_shapes(config)
    self._tokens = jax.jit(self._encode_tokens)
    self._volumes = jax.jit(self._encode_volumes)

  @property
  def num_features(self) -> int:
    """Width of the features at evaluate.level: the volume feature's at scan level."""
    return self._d_model if self._level == 'scan' else self.backbone.num_features

  def _check_shapes(self, config) -> None:
    """The loaded params against the modules this run's config.json describes (T included: the
    position-bias table is [heads, 2T - 1])."""
    size, channels = int(config.data.image_size), int(config.data.channels)

    def init(rng):
      features, pools = self.backbone.apply(self.variables, jnp.zeros((1, size, size, channels)),
                                            method=ResNet.features_and_stage_pools)
      tokens = jnp.zeros((1, self.num_slices, self._d_model))
      return {EMBEDDING: self.embedding.init(rng, [*pools, features])['params'],
              TRANSFORMER: self.transformer.init(rng, tokens)['params']}

    want = traverse_util.flatten_dict(jax.eval_shape(init, jax.random.key(0)))
    have = traverse_util.flatten_dict({name: self._params[name] for name in (EMBEDDING,
                                                                              TRANSFORMER)})
    wrong = sorted('/'.join(path) for path in set(want) | set(have)
                   if path not in want or path not in have
                   or tuple(want[path].shape) != tuple(np.shape(have[path])))
    if wrong:
      raise ConfigError(
          f'{_where(config.init_from)}: its {checkpointing.SLICE_TRANSFORMER_FILE} does not match '
          'the model.slice_transformer and data.num_slices of its config.json and its encoder: '
          + ', '.join(wrong[:4]) + (f' and {len(wrong) - 4} more' if len(wrong) > 4 else ''))

  def _encode_tokens(self, variables, embedding_params, images):
    features, pools = self.backbone.apply(variables, self.normalise(images), train=False,
                                          method=ResNet.features_and_stage_pools)
    return features, self.embedding.apply({'params': embedding_params}, [*pools, features])

  def _encode_volumes(self, transformer_params, stacks):
    return volume_feature(self.transformer.apply({'params': transformer_params}, stacks,
                                                 train=False))

  def features_and_tokens(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 slices [N, H, W, C] -> (ResNet features [N, F], slice tokens [N, d_model]), in
    fixed-size batches."""
    features, tokens = [], []
    for chunk, count in self._batches([images]):
      f, t = self._tokens(self.variables, self._params[EMBEDDING], chunk)
      features.append(np.asarray(f)[:count])
      tokens.append(np.asarray(t)[:count])
    if not features:
      return (np.zeros((0, self.backbone.num_features), np.float32),
              np.zeros((0, self._d_model), np.float32))
    return np.concatenate(features), np.concatenate(tokens)

  def volume_features(self, stacks: np.ndarray) -> np.ndarray:
    """Token stacks [V, T, d_model] -> unit volume features [V, d_model], in fixed-size batches."""
    out = [np.asarray(self._volumes(self._params[TRANSFORMER], chunk))[:count]
           for chunk, count in self._batches([stacks])]
    return np.concatenate(out) if out else np.zeros((0, self._d_model), np.float32)

  def extract_levels(self, config, split, labelled_only=True):
    images, labels, scan_ids = [], [], []
    for slices, label, scan_id in self.scan_inputs(config, split, labelled_only):
      images.append(slices)
      labels.append(label)
      scan_ids.append(scan_id)
    labels, scan_ids = np.asarray(labels, np.int32), np.asarray(scan_ids, np.int32)
    if not images:
      return {'slice': SplitFeatures(np.zeros((0, self.backbone.num_features), np.float32),
                                     labels, scan_ids),
              'scan': SplitFeatures(np.zeros((0, self._d_model), np.float32), labels, scan_ids)}
    slice_features, tokens = self.features_and_tokens(np.concatenate(images))
    _, pad_token = self.features_and_tokens(np.zeros_like(images[0][:1]))
    counts = np.asarray([len(slices) for slices in images])
    stacks = np.stack([token_stack(t, self.num_slices, pad_token[0])
                       for t in np.split(tokens, np.cumsum(counts)[:-1])])
    owners = np.repeat(np.arange(len(images)), counts)
    return {
        'slice': SplitFeatures(slice_features, labels[owners], scan_ids[owners]),
        'scan': SplitFeatures(self.volume_features(stacks), labels, scan_ids),
    }
