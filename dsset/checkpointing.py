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
import re
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
  if is_torch_file(source_workdir):
    raise ConfigError(f'config key init_from={source_workdir!r}: a PyTorch file holds no set '
                      'encoder; use evaluate.scan_features=\'mean\'')
  path = os.path.join(source_workdir, SET_ENCODER_FILE)
  if not os.path.isfile(path):
    raise ConfigError(f'config key init_from={source_workdir!r}: no {SET_ENCODER_FILE} there '
                      '(pretraining runs of this version write it); use '
                      'evaluate.scan_features=\'mean\' or pretrain again')
  with open(path, 'rb') as f:
    tree = flax.serialization.msgpack_restore(f.read())
  return {'params': tree.get('params', {}), 'batch_stats': tree.get('batch_stats', {})}


# Intra-inter clustering's slice embedding and slice transformer (their params; they have no batch
# statistics), written beside its encoder so that a run continuing from the workdir gets them.
SLICE_TRANSFORMER_FILE = 'slice_transformer.msgpack'


def export_slice_transformer(workdir: str, params: dict) -> str:
  """Writes {module name: params} to SLICE_TRANSFORMER_FILE atomically; returns its path."""
  path = os.path.join(workdir, SLICE_TRANSFORMER_FILE)
  _write_msgpack(path, params)
  return path


def load_slice_transformer(source_workdir: str) -> dict | None:
  """What export_slice_transformer wrote in source_workdir, or None where there is none (a 2D
  pretraining run, a PyTorch file)."""
  path = os.path.join(source_workdir, SLICE_TRANSFORMER_FILE)
  if is_torch_file(source_workdir) or not os.path.isfile(path):
    return None
  with open(path, 'rb') as f:
    return flax.serialization.msgpack_restore(f.read())


# init_from may name a torchvision-layout ResNet state_dict, or a MONAI BasicUNet-layout 3D U-Net
# encoder, instead of a workdir (docs/pytorch.md).
TORCH_SUFFIXES = ('.pth', '.pt')


def is_torch_file(init_from: str) -> bool:
  """Whether init_from names a PyTorch state_dict file (by its suffix) rather than a workdir."""
  return str(init_from).lower().endswith(TORCH_SUFFIXES)


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """A torchvision-layout state_dict file as numpy arrays (torch is imported only here).

  Accepts a plain state_dict, one wrapped as {'state_dict': ...} or {'model': ...}, and keys
  prefixed by 'module.' (DataParallel). Read with weights_only=True: no pickled code runs.
  """
  where = f'config key init_from={path!r}'
  if not os.path.isfile(path):
    raise ConfigError(f'{where}: no such file')
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ConfigError(f'{where}: reading a PyTorch file needs torch: pip install torch '
                      '(or pip install -e ".[torch]")') from None
  try:
    tree = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # noqa: BLE001 -- torch raises many kinds for unreadable files
    raise ConfigError(f'{where}: torch.load cannot read it ({type(e).__name__}: '
                      f'{str(e).splitlines()[0] if str(e) else ""})') from None
  for wrapper in ('state_dict', 'model'):
    if isinstance(tree, dict) and isinstance(tree.get(wrapper), dict):
      tree = tree[wrapper]
  if not isinstance(tree, dict) or not tree:
    raise ConfigError(f'{where}: not a state_dict (a dict of tensors)')
  out = {}
  for key, value in tree.items():
    if not isinstance(value, torch.Tensor):
      raise ConfigError(f'{where}: {key!r} is a {type(value).__name__}, not a tensor: not a '
                        'state_dict')
    key = key[len('module.'):] if key.startswith('module.') else key
    out[key] = value.detach().cpu().numpy()
  return out


def load_torch_backbone(path: str) -> tuple[dict, dict]:
  """A torchvision ResNet state_dict file -> (encoder {'params', 'batch_stats'}, model dict with
  the backbone, small_stem and width_multiplier its keys and shapes imply); a 3D U-Net encoder
  in MONAI BasicUNet's layout -> backbone 'unet3d', filters and bottleneck."""
  from dsset.export import convert  # pylint: disable=import-outside-toplevel
  state_dict = load_torch_state_dict(path)
  try:
    model = convert.infer_model(state_dict)
    encoder = convert.torch_to_flax(state_dict, model['backbone'])
  except convert.ConversionError as e:
    raise ConfigError(f'config key init_from={path!r}: {e}') from None
  model.pop('in_channels')
  return encoder, {**model, 'source': 'torch'}


def load_backbone(source_workdir: str) -> tuple[dict, dict]:
  """Reads a backbone export: ({'params', 'batch_stats'} of the encoder, its model config dict).

  source_workdir is a pretraining workdir, or a state_dict file (.pth/.pt: `load_torch_backbone`)
  of a torchvision-layout ResNet (its model dict has only backbone, small_stem and
  width_multiplier, plus source='torch') or of a 3D U-Net encoder in MONAI BasicUNet's layout.
  """
  if is_torch_file(source_workdir):
    return load_torch_backbone(source_workdir)
  path = os.path.join(source_workdir, BACKBONE_FILE)
  info_path = os.path.join(source_workdir, BACKBONE_INFO_FILE)
  if not os.path.isfile(path) or not os.path.isfile(info_path):
    raise ConfigError(f'config key init_from={source_workdir!r}: no {BACKBONE_FILE} there; '
                      'point it at a finished pretraining workdir (or a torchvision ResNet '
                      '.pth file)')
  with open(path, 'rb') as f:
    encoder = flax.serialization.msgpack_restore(f.read())
  with open(info_path) as f:
    info = json.load(f)
  return encoder, info['model']


def _stem_for_grey(target: dict, loaded: dict) -> dict:
  """loaded params with a 3-channel stem kernel summed to 1 channel when the target has 1.

  Summed, not divided by 3: conv1 of a grey image g with the summed kernel equals conv1 of g
  repeated to RGB with the 3 kernels, so bn1's running statistics and every feature stay those of
  the source network fed the grey image as RGB (timm's adapt_input_conv does the same). A plain
  mean would scale conv1's output by 1/3 against bn1's statistics.
  """
  from dsset.export import convert  # pylint: disable=import-outside-toplevel
  stem_target = convert.lookup(target, ('Conv_0', 'kernel'))
  stem_loaded = convert.lookup(loaded, ('Conv_0', 'kernel'))
  if stem_target is None or stem_loaded is None or np.ndim(stem_loaded) != 4:
    return loaded
  (h, w, c, o), (h2, w2, c2, o2) = np.shape(stem_target), np.shape(stem_loaded)
  if (c, c2) != (1, 3) or (h, w, o) != (h2, w2, o2):
    return loaded  # nothing to adapt, or a mismatch insert_backbone names as it is
  summed = np.sum(np.asarray(stem_loaded, np.float32), axis=2, keepdims=True)
  return {**loaded, 'Conv_0': {**loaded['Conv_0'], 'kernel': summed}}


def _flat_shapes(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], tuple]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flat_shapes(value, (*prefix, str(key))))
    return out
  return {prefix: tuple(np.shape(tree))}


def _flax_label(collection: str, path: tuple[str, ...], shape: tuple) -> tuple[Any, str, tuple]:
  """(sort key, label, shape shown) of a variable named by its Flax path."""
  label = f'{collection}/{"/".join(path)}'
  return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', label)], label, shape


def _torch_labeller(encoder: dict):
  """Labels variables of an encoder read from a PyTorch file by their torch keys, in network
  order, with conv kernels shown as torch holds them (OIHW, OIDHW)."""
  from dsset.export import convert  # pylint: disable=import-outside-toplevel
  backbone = _backbone_of(encoder)
  levels = convert.unet3d_levels(encoder['params'])
  order = convert.torch_key_order(backbone, levels)

  def label(collection: str, path: tuple[str, ...], shape: tuple) -> tuple[Any, str, tuple]:
    key = convert.torch_name(backbone, collection, path, levels)
    if key is None:
      _, name, shape = _flax_label(collection, path, shape)
      return (len(order), name), name, shape
    if path[-1] == 'kernel' and len(shape) >= 4:
      shape = (shape[-1], shape[-2], *shape[:-2])
    return (order[key], key), key, shape
  return label


def _mismatches(collection: str, target: dict, loaded: dict, label) -> list[tuple[Any, str]]:
  """(sort key, line) naming every variable whose shape differs, or that only one side has."""
  want, have = _flat_shapes(target), _flat_shapes(loaded)
  lines = []
  for path in set(want) | set(have):
    if path not in have:
      key, name, shape = label(collection, path, want[path])
      lines.append((key, f'{name} missing (this model has {list(shape)})'))
    elif path not in want:
      key, name, _ = label(collection, path, have[path])
      lines.append((key, f'{name} not in this model'))
    elif want[path] != have[path]:
      key, name, shape_have = label(collection, path, have[path])
      _, _, shape_want = label(collection, path, want[path])
      lines.append((key, f'{name} has {list(shape_have)}, this model {list(shape_want)}'))
  return lines


def insert_backbone(variables: dict, encoder: dict, encoder_path: tuple[str, ...],
                    source: str) -> dict:
  """Returns variables with the encoder subtree replaced by `encoder`, checking every shape.

  From a torchvision file (a .pth/.pt source) a 3-channel stem is summed to 1 channel when this
  model's is 1-channel (`_stem_for_grey`), and mismatches are named by torch key and shape (OIHW);
  otherwise by Flax path and shape (conv kernels HWIO).
  """
  torch_source = is_torch_file(source)
  label = _torch_labeller(encoder) if torch_source else _flax_label
  out = {}
  lines = []
  for collection in ('params', 'batch_stats'):
    target = subtree(variables[collection], encoder_path)
    loaded = encoder[collection]
    if torch_source and collection == 'params':
      loaded = _stem_for_grey(target, loaded)
    mismatches = _mismatches(collection, target, loaded, label)
    if mismatches:
      lines.extend(mismatches)
      continue
    new = jax.tree.map(lambda t, l: np.asarray(l, dtype=t.dtype), target, loaded)
    out[collection] = replace_subtree(variables[collection], encoder_path, new)
  if lines:
    lines = [line for _, line in sorted(lines, key=lambda item: item[0])]
    shown = '; '.join(lines[:4]) + (f'; and {len(lines) - 4} more' if len(lines) > 4 else '')
    raise ConfigError(f'config key init_from={source!r}: its encoder does not match this '
                      'config\'s model (check model.backbone, model.width_multiplier, '
                      f'model.small_stem and data.channels): {shown}')
  return {**variables, **out}


def _backbone_of(encoder: dict) -> str:
  """The dsset backbone name of Flax encoder variables (by block type and count)."""
  if any(key.startswith('ConvBlock3D_') for key in encoder['params']):
    return 'unet3d'
  blocks = [key for key in encoder['params'] if '_' in key and not key.startswith(
      ('Conv_', 'BatchNorm_'))]
  if any(key.startswith('Bottleneck_') for key in blocks):
    return 'resnet50'
  return 'resnet10' if len(blocks) == 4 else 'resnet18'


def replace_subtree(tree: dict, path: tuple[str, ...], value: Any) -> dict:
  """A copy of tree with the subtree at path replaced by value (tree itself is not changed)."""
  if not path:
    return value
  return {**tree, path[0]: replace_subtree(tree[path[0]], path[1:], value)}
