"""dsset's Flax encoder variables <-> PyTorch state_dicts, as numpy arrays (no torch).

2D ResNets take torchvision's layout; the 3D U-Net encoder (backbone 'unet3d') takes MONAI
BasicUNet's (dsset.export.torch_unet3d), see UNET3D below.

Flax names (dsset.models.resnet, auto-named):          torchvision names:
  Conv_0 / BatchNorm_0                                   conv1 / bn1
  <Block>_<i>/Conv_<j>, BatchNorm_<j> (j < convs)        layer<s>.<k>.conv<j+1>, bn<j+1>
  <Block>_<i>/Conv_<convs>, BatchNorm_<convs> (shortcut) layer<s>.<k>.downsample.0, downsample.1
where block i is the k-th block of stage s (1-based), <Block> is BasicBlock (2 convs) or Bottleneck
(3 convs). Conv kernels are HWIO in Flax and OIHW in torch; BatchNorm scale/bias/mean/var are
torch's weight/bias/running_mean/running_var (same epsilon 1e-5; Flax momentum 0.9 is torch's 0.1).
torch's num_batches_tracked (only used by momentum=None BatchNorms) is written as 0 and ignored on
import; fc.* is ignored on import.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterator

import numpy as np

from dsset.models.resnet import BACKBONES
from dsset.models.unet3d import BACKBONE as UNET3D

# The 3D U-Net encoder, Flax -> torch (MONAI BasicUNet's encoder path):
#   ConvBlock3D_0/Conv_<j>, BatchNorm_<j>        conv_0.conv_<j>.conv, conv_0.conv_<j>.adn.N
#   ConvBlock3D_<l>/Conv_<j>, BatchNorm_<j>      down_<l>.convs.conv_<j>.conv, ...adn.N   (l >= 1)
# Conv kernels are DHWIO in Flax and OIDHW in torch.


class ConversionError(ValueError):
  """A state_dict that does not describe a dsset encoder; the message names the keys."""


def architecture(backbone: str) -> tuple[str, tuple[int, ...], int]:
  """backbone -> (Flax block class name, blocks per stage, convs per block)."""
  if backbone not in BACKBONES:
    raise ConversionError(f'unknown backbone {backbone!r}; dsset has {sorted(BACKBONES)}')
  keywords = BACKBONES[backbone].keywords
  block = keywords['block']
  return block.__name__, tuple(keywords['stage_sizes']), 2 if block.expansion == 1 else 3


def _unet3d_modules(levels: int) -> Iterator[tuple[tuple[str, ...], str, str]]:
  for level in range(levels):
    block = 'conv_0' if level == 0 else f'down_{level}.convs'
    for j in range(2):
      yield (f'ConvBlock3D_{level}', f'Conv_{j}'), f'{block}.conv_{j}.conv', 'conv'
      yield (f'ConvBlock3D_{level}', f'BatchNorm_{j}'), f'{block}.conv_{j}.adn.N', 'bn'


def unet3d_levels(tree: dict) -> int:
  """Levels (pooled ones + the bottleneck) of a 3D U-Net encoder: from its Flax params
  (ConvBlock3D_<l>) or a state_dict's keys (conv_0, down_<l>)."""
  if any(key.startswith('ConvBlock3D_') for key in tree):
    return sum(key.startswith('ConvBlock3D_') for key in tree)
  return 1 + len({key.split('.')[0] for key in tree if key.startswith('down_')})


def _modules(backbone: str, levels: int | None = None
             ) -> Iterator[tuple[tuple[str, ...], str, str]]:
  """(Flax module path, torch module prefix, 'conv' | 'bn') of every layer, in network order.

  The shortcut of every ResNet block is listed; callers skip it where the variables have none.
  `levels` is the 3D U-Net's number of levels (unet3d_levels), unused for the ResNets.
  """
  if backbone == UNET3D:
    yield from _unet3d_modules(levels)
    return
  block, stage_sizes, convs = architecture(backbone)
  yield ('Conv_0',), 'conv1', 'conv'
  yield ('BatchNorm_0',), 'bn1', 'bn'
  i = 0
  for stage, blocks in enumerate(stage_sizes):
    for k in range(blocks):
      flax_block, torch_block = f'{block}_{i}', f'layer{stage + 1}.{k}'
      for j in range(convs):
        yield (flax_block, f'Conv_{j}'), f'{torch_block}.conv{j + 1}', 'conv'
        yield (flax_block, f'BatchNorm_{j}'), f'{torch_block}.bn{j + 1}', 'bn'
      yield (flax_block, f'Conv_{convs}'), f'{torch_block}.downsample.0', 'conv'
      yield (flax_block, f'BatchNorm_{convs}'), f'{torch_block}.downsample.1', 'bn'
      i += 1


def lookup(tree: Any, path: tuple[str, ...]) -> Any:
  """tree[path[0]][path[1]]..., or None where the path does not exist."""
  for key in path:
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def torch_name(backbone: str, collection: str, flax_path: tuple[str, ...],
               levels: int | None = None) -> str | None:
  """The torch key of one Flax variable ('params'/'batch_stats' + path), or None if unknown."""
  *module, leaf = flax_path
  names = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
           'var': 'running_var'}
  for flax_module, prefix, _ in _modules(backbone, levels):
    if tuple(module) == flax_module and leaf in names:
      return f'{prefix}.{names[leaf]}'
  return None


def torch_key_order(backbone: str, levels: int | None = None) -> dict[str, int]:
  """Every torch key a `backbone` can have (shortcuts included) -> its position in network order."""
  keys = []
  for _, prefix, kind in _modules(backbone, levels):
    leaves = ('weight',) if kind == 'conv' else ('weight', 'bias', 'running_mean', 'running_var')
    keys.extend(f'{prefix}.{leaf}' for leaf in leaves)
  return {key: i for i, key in enumerate(keys)}


def flax_to_torch(encoder: dict, backbone: str) -> 'OrderedDict[str, np.ndarray]':
  """{'params', 'batch_stats'} of a dsset encoder -> state_dict (numpy) in torchvision's layout
  (ResNets) or MONAI BasicUNet's (unet3d)."""
  out = OrderedDict()
  used = 0
  for path, prefix, kind in _modules(backbone, unet3d_levels(encoder['params'])):
    params = lookup(encoder['params'], path)
    if params is None:
      continue  # a block without a shortcut
    if kind == 'conv':
      kernel = np.asarray(params['kernel'], np.float32)
      # HWIO / DHWIO -> OIHW / OIDHW.
      order = (kernel.ndim - 1, kernel.ndim - 2, *range(kernel.ndim - 2))
      out[f'{prefix}.weight'] = np.ascontiguousarray(np.transpose(kernel, order))
      used += 1
    else:
      stats = lookup(encoder['batch_stats'], path)
      out[f'{prefix}.weight'] = np.asarray(params['scale'], np.float32)
      out[f'{prefix}.bias'] = np.asarray(params['bias'], np.float32)
      out[f'{prefix}.running_mean'] = np.asarray(stats['mean'], np.float32)
      out[f'{prefix}.running_var'] = np.asarray(stats['var'], np.float32)
      out[f'{prefix}.num_batches_tracked'] = np.asarray(0, np.int64)
      used += 2
  total = len(_leaves(encoder['params']))
  if used != total:
    raise ConversionError(f'the encoder has {total} parameters but a {backbone} has {used}: '
                          'backbone.json does not describe backbone.msgpack')
  return out


def _leaves(tree: dict) -> list:
  out = []
  for value in tree.values():
    out.extend(_leaves(value) if isinstance(value, dict) else [value])
  return out


def infer_model(state_dict: dict[str, np.ndarray]) -> dict[str, Any]:
  """The dsset model section a torchvision-layout state_dict describes: backbone (from the blocks
  per stage and the block type), small_stem (conv1's kernel), width_multiplier (conv1's width / 64)
  and in_channels; for a 3D U-Net encoder (MONAI BasicUNet's names: infer_unet3d) backbone
  'unet3d', filters, bottleneck and in_channels. Raises ConversionError naming what does not fit."""
  if UNET3D_FIRST_KEY in state_dict:
    return infer_unet3d(state_dict)
  if 'conv1.weight' not in state_dict:
    sample = ', '.join(list(state_dict)[:3])
    raise ConversionError(f'no conv1.weight: not a torchvision ResNet state_dict (keys: {sample}'
                          f'{", ..." if len(state_dict) > 3 else ""})')
  conv1 = np.shape(state_dict['conv1.weight'])
  if len(conv1) != 4 or conv1[2] != conv1[3] or conv1[2] not in (3, 7):
    raise ConversionError(f'conv1.weight has shape {conv1}; expected [width, channels, 7, 7] '
                          '(or 3, 3 for a small stem)')
  stage_sizes = []
  for stage in range(1, 5):
    blocks = {key.split('.')[1] for key in state_dict if key.startswith(f'layer{stage}.')}
    stage_sizes.append(len(blocks))
  bottleneck = 'layer1.0.conv3.weight' in state_dict
  for name in BACKBONES:
    block, sizes, convs = architecture(name)
    if tuple(stage_sizes) == sizes and (convs == 3) == bottleneck:
      backbone = name
      break
  else:
    kind = 'Bottleneck' if bottleneck else 'BasicBlock'
    known = {(3, 4, 6, 3): 'resnet34' if not bottleneck else 'resnet50',
             (3, 4, 23, 3): 'resnet101', (3, 8, 36, 3): 'resnet152'}
    guess = known.get(tuple(stage_sizes), 'an unknown ResNet')
    raise ConversionError(
        f'{kind} blocks per stage {tuple(stage_sizes)} ({guess}) are not a dsset backbone; dsset '
        'has resnet10 (BasicBlock 1,1,1,1), resnet18 (BasicBlock 2,2,2,2) and resnet50 '
        '(Bottleneck 3,4,6,3)')
  return {'backbone': backbone, 'small_stem': conv1[2] == 3,
          'width_multiplier': _width_multiplier(state_dict, len(stage_sizes)),
          'in_channels': int(conv1[1])}


UNET3D_FIRST_KEY = 'conv_0.conv_0.conv.weight'
# Keys of a whole MONAI BasicUNet that are not the encoder's: ignored on import, as a ResNet's fc.
UNET3D_DECODER_PREFIXES = ('upcat_', 'final_conv.')


def infer_unet3d(state_dict: dict[str, np.ndarray]) -> dict[str, Any]:
  """The model section of a 3D U-Net encoder state_dict: each level's width from its first conv."""
  levels = unet3d_levels(state_dict)
  widths = []
  for level in range(levels):
    key = UNET3D_FIRST_KEY if level == 0 else f'down_{level}.convs.conv_0.conv.weight'
    if key not in state_dict:
      raise ConversionError(f'missing {key} (a 3D U-Net encoder of {levels} levels needs it)')
    shape = np.shape(state_dict[key])
    if len(shape) != 5:
      raise ConversionError(f'{key} has shape {shape}; a 3D conv weight is 5D (OIDHW)')
    widths.append(int(shape[0]))
  if levels < 2:
    raise ConversionError('a 3D U-Net encoder has at least one down_<l> level; found none')
  return {'backbone': UNET3D, 'filters': widths[:-1], 'bottleneck': widths[-1],
          'in_channels': int(np.shape(state_dict[UNET3D_FIRST_KEY])[1])}


def _width_multiplier(state_dict: dict[str, np.ndarray], stages: int) -> float:
  """The multiplier m giving every stage's width w_s = max(1, int(64 * 2**s * m)): the largest of
  the lower bounds w_s / (64 * 2**s), which is 1.0 for torchvision's own models."""
  widths = [int(np.shape(state_dict[f'layer{s + 1}.0.conv1.weight'])[0]) for s in range(stages)]
  multiplier = max(w / (64 * 2**s) for s, w in enumerate(widths))
  if [max(1, int(64 * 2**s * multiplier)) for s in range(stages)] != widths:
    raise ConversionError(f'stage widths {widths} are not 64, 128, 256, 512 times one width '
                          'multiplier')
  return multiplier


def torch_to_flax(state_dict: dict[str, np.ndarray],
                  backbone: str) -> dict[str, dict]:
  """state_dict (numpy arrays) in torchvision's layout (ResNets) or MONAI BasicUNet's (unet3d) ->
  {'params', 'batch_stats'} of a dsset encoder.

  fc.* (a BasicUNet's upcat_* and final_conv.*) and num_batches_tracked are ignored; missing or
  unexpected keys raise ConversionError naming them. A conv bias before a BatchNorm (MONAI's
  default bias=True) is folded into the BatchNorm's running mean: BN(conv(x) + b) with mean m is
  BN(conv(x)) with mean m - b, exactly, and in training the batch mean absorbs b anyway. Shapes
  are checked later against the model (checkpointing.insert_backbone).
  """
  params, stats = {}, {}
  expected = set()
  levels = unet3d_levels(state_dict) if backbone == UNET3D else None
  ignored = UNET3D_DECODER_PREFIXES if backbone == UNET3D else ('fc.',)
  conv_bias = None
  for path, prefix, kind in _modules(backbone, levels):
    if f'{prefix}.weight' not in state_dict and '.downsample.' in prefix:
      continue  # a block without a shortcut
    if kind == 'conv':
      keys = [f'{prefix}.weight']
      if backbone == UNET3D and f'{prefix}.bias' in state_dict:
        keys.append(f'{prefix}.bias')
    else:
      keys = [f'{prefix}.{leaf}' for leaf in ('weight', 'bias', 'running_mean', 'running_var')]
    missing = [key for key in keys if key not in state_dict]
    if missing:
      hint = ('; a MONAI BasicUNet must use norm=\'batch\' (instance norm keeps no running '
              'statistics)' if backbone == UNET3D and kind == 'bn' else '')
      raise ConversionError(f'missing {", ".join(missing)} (a {backbone} needs them){hint}')
    expected.update(keys)
    value = {key: np.asarray(state_dict[key], np.float32) for key in keys}
    if kind == 'conv':
      weight = value[keys[0]]
      rank = 5 if backbone == UNET3D else 4
      if weight.ndim != rank:
        raise ConversionError(f'{keys[0]} has shape {weight.shape}; a conv weight here is '
                              f'{rank}D ({"OIDHW" if rank == 5 else "OIHW"})')
      # OIHW / OIDHW -> HWIO / DHWIO.
      order = (*range(2, rank), 1, 0)
      _set(params, path, {'kernel': np.ascontiguousarray(np.transpose(weight, order))})
      conv_bias = value[keys[1]] if len(keys) > 1 else None
    else:
      _set(params, path, {'scale': value[keys[0]], 'bias': value[keys[1]]})
      mean = value[keys[2]] if conv_bias is None else value[keys[2]] - conv_bias
      _set(stats, path, {'mean': mean, 'var': value[keys[3]]})
  unexpected = sorted(key for key in state_dict if key not in expected
                      and not key.startswith(ignored) and not key.endswith('.num_batches_tracked'))
  if unexpected:
    shown = ', '.join(unexpected[:5]) + (', ...' if len(unexpected) > 5 else '')
    raise ConversionError(f'unexpected keys for a {backbone}: {shown}')
  return {'params': params, 'batch_stats': stats}
