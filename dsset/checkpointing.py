"""Checkpoints (Orbax), resume, and the backbone-only export used by downstream runs.

One CheckpointManager saves two items per step: the training state pytree and the data iterator's
state (JSON), so a resumed run continues with the very next batch. Orbax writes each step into a
temporary folder and renames it when complete, so a crash mid-write leaves the previous step as the
latest readable one.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp

from dsset.config_validation import ConfigError

BACKBONE_FILE = 'backbone.msgpack'
BACKBONE_INFO_FILE = 'backbone.json'


def make_manager(workdir: str, checkpoint_config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=int(checkpoint_config.max_to_keep),
      enable_async_checkpointing=True,
      create=True,
  )
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                               options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: Any) -> None:
  """Starts an asynchronous save; arrays are copied off the device before this returns."""
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_state),
  ))


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any):
  """Restores (state, data_state) at `step` onto the shardings given in abstract_state."""
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=ocp.args.JsonRestore(),
  ))
  return restored['state'], restored['data']


def _subtree(tree: dict, path: tuple[str, ...]) -> dict:
  for key in path:
    tree = tree[key]
  return tree


def export_backbone(workdir: str, variables: dict, encoder_path: tuple[str, ...],
                    model_config) -> str:
  """Writes the encoder's params + batch_stats (msgpack) and its model config (JSON) atomically."""
  encoder = {
      'params': _subtree(variables['params'], encoder_path),
      'batch_stats': _subtree(variables['batch_stats'], encoder_path),
  }
  encoder = jax.tree.map(np.asarray, jax.device_get(encoder))
  path = os.path.join(workdir, BACKBONE_FILE)
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(flax.serialization.msgpack_serialize(encoder))
  os.replace(tmp, path)
  info_path = os.path.join(workdir, BACKBONE_INFO_FILE)
  with open(info_path + '.tmp', 'w') as f:
    json.dump({'model': model_config.to_dict(), 'encoder_path': list(encoder_path)}, f, indent=2)
  os.replace(info_path + '.tmp', info_path)
  return path


def load_backbone(source_workdir: str) -> tuple[dict, dict]:
  """Reads a backbone export: ({'params', 'batch_stats'} of the encoder, its model config dict)."""
  path = os.path.join(source_workdir, BACKBONE_FILE)
  info_path = os.path.join(source_workdir, BACKBONE_INFO_FILE)
  if not os.path.isfile(path) or not os.path.isfile(info_path):
    raise ConfigError(f'config key init_from={source_workdir!r}: no {BACKBONE_FILE} there; '
                      'point it at a finished pretraining workdir')
  with open(path, 'rb') as f:
    encoder = flax.serialization.msgpack_restore(f.read())
  with open(info_path) as f:
    info = json.load(f)
  return encoder, info['model']


def insert_backbone(variables: dict, encoder: dict, encoder_path: tuple[str, ...],
                    source: str) -> dict:
  """Returns variables with the encoder subtree replaced by `encoder`, checking every shape."""
  out = {}
  for collection in ('params', 'batch_stats'):
    target = _subtree(variables[collection], encoder_path)
    loaded = encoder[collection]
    target_shapes = jax.tree.map(np.shape, target)
    loaded_shapes = jax.tree.map(np.shape, loaded)
    if target_shapes != loaded_shapes:
      raise ConfigError(f'config key init_from={source!r}: its encoder does not match this '
                        'config\'s model (check model.backbone, model.width_multiplier, '
                        'model.small_stem and data.channels)')
    new = jax.tree.map(lambda t, l: np.asarray(l, dtype=t.dtype), target, loaded)
    out[collection] = _replace(variables[collection], encoder_path, new)
  return {**variables, **out}


def _replace(tree: dict, path: tuple[str, ...], value: Any) -> dict:
  if not path:
    return value
  return {**tree, path[0]: _replace(tree[path[0]], path[1:], value)}
