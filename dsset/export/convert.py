"""dsset's Flax ResNet variables <-> torchvision-layout state_dicts, as numpy arrays (no torch).

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


class ConversionError(ValueError):
  """A state_dict that does not describe a dsset encoder; the message names the keys."""


def architecture(backbone: str) -> tuple[str, tuple[int, ...], int]:
  """backbone -> (Flax block class name, blocks per stage, convs per block)."""
  if backbone not in BACKBONES:
    raise ConversionError(f'unknown backbone {backbone!r}; dsset has {sorted(BACKBONES)}')
  keywords = BACKBONES[backbone].keywords
  block = keywords['block']
  return block.__name__, tuple(keywords['stage_sizes']), 2 if block.expansion == 1 else 3


def _modules(backbone: str) -> Iterator[tuple[tuple[str, ...], str, str]]:
  """(Flax module path, torch module prefix, 'conv' | 'bn') of every layer, in network order.

  The shortcut of every block is listed; callers skip it where the variables have none.
  """
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


def torch_name(backbone: str, collection: str, flax_path: tuple[str, ...]) -> str | None:
  """The torch key of one Flax variable ('params'/'batch_stats' + path), or None if unknown."""
  *module, leaf = flax_path
  names = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
           'var': 'running_var'}
  for flax_module, prefix, _ in _modules(backbone):
    if tuple(module) == flax_module and leaf in names:
      return f'{prefix}.{names[leaf]}'
  return None


def torch_key_order(backbone: str) -> dict[str, int]:
  """Every torch key a `backbone` can have (shortcuts included) -> its position in network order."""
  keys = []
  for _, prefix, kind in _modules(backbone):
    leaves = ('weight',) if kind == 'conv' else ('weight', 'bias', 'running_mean', 'running_var')
    keys.extend(f'{prefix}.{leaf}' for leaf in leaves)
  return {key: i for i, key in enumerate(keys)}


def flax_to_torch(encoder: dict, backbone: str) -> 'OrderedDict[str, np.ndarray]':
  """{'params', 'batch_stats'} of a dsset encoder -> torchvision-layout state_dict (numpy)."""
  out = OrderedDict()
  used = 0
  for path, prefix, kind in _modules(backbone):
    params = lookup(encoder['params'], path)
    if params is None:
      continue  # a block without a shortcut
    if kind == 'conv':
      out[f'{prefix}.weight'] = np.ascontiguousarray(
          np.transpose(np.asarray(params['kernel'], np.float32), (3, 2, 0, 1)))
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
  and in_channels. Raises ConversionError naming what does not fit."""
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
  """torchvision-layout state_dict (numpy arrays) -> {'params', 'batch_stats'} of a dsset encoder.

  fc.* and num_batches_tracked are ignored; missing or unexpected keys raise ConversionError
  naming them. Shapes are checked later against the model (checkpointing.insert_backbone).
  """
  params, stats = {}, {}
  expected = set()
  for path, prefix, kind in _modules(backbone):
    if f'{prefix}.weight' not in state_dict and '.downsample.' in prefix:
      continue  # a block without a shortcut
    if kind == 'conv':
      keys = [f'{prefix}.weight']
    else:
      keys = [f'{prefix}.{leaf}' for leaf in ('weight', 'bias', 'running_mean', 'running_var')]
    missing = [key for key in keys if key not in state_dict]
    if missing:
      raise ConversionError(f'missing {", ".join(missing)} (a {backbone} needs them)')
    expected.update(keys)
    value = {key: np.asarray(state_dict[key], np.float32) for key in keys}
    if kind == 'conv':
      weight = value[keys[0]]
      if weight.ndim != 4:
        raise ConversionError(f'{keys[0]} has shape {weight.shape}; a conv weight is 4D (OIHW)')
      _set(params, path, {'kernel': np.ascontiguousarray(np.transpose(weight, (2, 3, 1, 0)))})
    else:
      _set(params, path, {'scale': value[keys[0]], 'bias': value[keys[1]]})
      _set(stats, path, {'mean': value[keys[2]], 'var': value[keys[3]]})
  unexpected = sorted(key for key in state_dict if key not in expected
                      and not key.startswith('fc.') and not key.endswith('.num_batches_tracked'))
  if unexpected:
    shown = ', '.join(unexpected[:5]) + (', ...' if len(unexpected) > 5 else '')
    raise ConversionError(f'unexpected keys for a {backbone}: {shown}')
  return {'params': params, 'batch_stats': stats}
