"""Checkpoints (Orbax), resume, and the encoder export used by downstream runs.

One CheckpointManager saves two items per step: the training state pytree and the data iterator's
state, so a resumed run continues with the very next batch. Every process calls save and restore
(Orbax coordinates the writers of one shared folder); the iterator state goes through Grain's
handler, which writes one file per process (process_<i>-of-<n>.json) because each process iterates
over its own block of the global batch. Orbax writes each step into a
temporary folder and renames it when complete, so a crash mid-write leaves the previous step as the
latest readable one.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.serialization
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from dsset.config_validation import ConfigError

BACKBONE_FILE = 'backbone.msgpack'
BACKBONE_INFO_FILE = 'backbone.json'
# The set encoder's own layers (DS-SimCLR's rho; empty without rho), for scan-level evaluation
# with the pretrained set encoder. Its pooling and rho switches are in backbone.json's model.
SET_ENCODER_FILE = 'set_encoder.msgpack'


def make_manager(workdir: str, checkpoint_config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=int(checkpoint_config.max_to_keep),
      enable_async_checkpointing=True,
      create=True,
  )
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                               options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         data_iterator: grain.DatasetIterator) -> None:
  """Starts an asynchronous save; arrays and the iterator's position are taken before it returns.

  (Grain's handler is synchronous, so Orbax records the iterator state inside this call.)
  """
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iterator),
  ))


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            data_iterator: grain.DatasetIterator) -> Any:
  """Returns the state at `step` on the shardings of abstract_state; moves data_iterator there."""
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iterator),
    ))
  except ValueError as e:
    if 'process_' not in str(e):
      raise
    # Grain names the file of each process's position after the process count.
    raise ConfigError(
        f'the checkpoint at step {step} in {manager.directory} was written by a different number '
        f'of processes than this run\'s {jax.process_count()}; resume with the same number of '
        'processes (or start a new --workdir with --config.init_from)') from None
  return restored['state']


def subtree(tree: dict, path: tuple[str, ...]) -> dict:
  """tree[path[0]][path[1]]..."""
  for key in path:
    tree = tree[key]
  return tree


def _write_msgpack(path: str, tree: dict) -> None:
  tree = jax.tree.map(np.asarray, jax.device_get(tree))
  with open(path + '.tmp', 'wb') as f:
    f.write(flax.serialization.msgpack_serialize(tree))
  os.replace(path + '.tmp', path)


def _subtree_or_empty(tree: dict, path: tuple[str, ...]) -> dict:
  # A module without variables (a set encoder without rho) has no entry at all.
  try:
    return subtree(tree, path)
  except KeyError:
    return {}


def export_backbone(workdir: str, variables: dict, encoder_path: tuple[str, ...],
                    model_config, set_encoder_path: tuple[str, ...] | None = None) -> str:
  """Writes the encoder's params + batch_stats (msgpack) and its model config (JSON) atomically.

  set_encoder_path: where the set encoder's own layers live (rho); when given they are written to
  SET_ENCODER_FILE so scan-level evaluation can pool slice features as pretraining did.
  """
  encoder = {
      'params': subtree(variables['params'], encoder_path),
      'batch_stats': subtree(variables['batch_stats'], encoder_path),
  }
  path = os.path.join(workdir, BACKBONE_FILE)
  _write_msgpack(path, encoder)
  if set_encoder_path is not None:
    _write_msgpack(os.path.join(workdir, SET_ENCODER_FILE), {
        'params': _subtree_or_empty(variables['params'], set_encoder_path),
        'batch_stats': _subtree_or_empty(variables['batch_stats'], set_encoder_path),
    })
  info_path = os.path.join(workdir, BACKBONE_INFO_FILE)
  with open(info_path + '.tmp', 'w') as f:
    json.dump({'model': model_config.to_dict(), 'encoder_path': list(encoder_path)}, f, indent=2)
  os.replace(info_path + '.tmp', info_path)
  return path


def load_set_encoder(source_workdir: str) -> dict:
  """Reads the set encoder's own {'params', 'batch_stats'} (rho; empty dicts without rho)."""
  path = os.path.join(source_workdir, SET_ENCODER_FILE)
  if not os.path.isfile(path):
    raise ConfigError(f'config key init_from={source_workdir!r}: no {SET_ENCODER_FILE} there '
                      '(pretraining runs of this version write it); use '
                      'evaluate.scan_features=\'mean\' or pretrain again')
  with open(path, 'rb') as f:
    tree = flax.serialization.msgpack_restore(f.read())
  return {'params': tree.get('params', {}), 'batch_stats': tree.get('batch_stats', {})}


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
    target = subtree(variables[collection], encoder_path)
    loaded = encoder[collection]
    target_shapes = jax.tree.map(np.shape, target)
    loaded_shapes = jax.tree.map(np.shape, loaded)
    if target_shapes != loaded_shapes:
      raise ConfigError(f'config key init_from={source!r}: its encoder does not match this '
                        'config\'s model (check model.backbone, model.width_multiplier, '
                        'model.small_stem and data.channels)')
    new = jax.tree.map(lambda t, l: np.asarray(l, dtype=t.dtype), target, loaded)
    out[collection] = replace_subtree(variables[collection], encoder_path, new)
  return {**variables, **out}


def replace_subtree(tree: dict, path: tuple[str, ...], value: Any) -> dict:
  """A copy of tree with the subtree at path replaced by value (tree itself is not changed)."""
  if not path:
    return value
  return {**tree, path[0]: replace_subtree(tree[path[0]], path[1:], value)}
