"""A pretraining workdir's encoder as a PyTorch state_dict, with a sidecar: 2D ResNets in
torchvision's layout, the 3D U-Net encoder in MONAI BasicUNet's (dsset.export.torch_unet3d).

    python -m dsset.export --workdir=W --format=torch --out=encoder.pt

reads W/backbone.msgpack + W/backbone.json (and W/config.json for the data settings), writes
encoder.pt (torch.save of an OrderedDict of float32 tensors; no fc) and encoder.json beside it
(SIDECAR_FORMAT): the model, which torchvision (MONAI) class takes the state_dict (or that only the
plain module dsset.export.torch_resnet / torch_unet3d does), and the input the encoder expects.
docs/pytorch.md.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Any

import numpy as np

from dsset import augment3d, checkpointing
from dsset.config_validation import ConfigError
from dsset.export import convert
from dsset.methods.contrastive import INPUT_MEAN, INPUT_STD
from dsset.models.unet3d import BACKBONE as UNET3D

SIDECAR_FORMAT = 'dsset-torch-encoder/1'
TORCHVISION_BACKBONES = ('resnet18', 'resnet50')  # dsset backbones torchvision has a class for


def sidecar_path(out: str) -> str:
  """encoder.pt -> encoder.json (as dsset.export.torch_resnet.sidecar_path)."""
  return os.path.splitext(out)[0] + '.json'


def _import_torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ConfigError('--format=torch needs PyTorch: pip install torch (or pip install -e '
                      '".[torch]")') from None
  return torch


def _read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def torchvision_recipe(model: dict[str, Any], in_channels: int) -> dict[str, Any] | None:
  """How torchvision's own class takes the state_dict, or None when it has no such class."""
  if model['backbone'] not in TORCHVISION_BACKBONES or float(model['width_multiplier']) != 1.0:
    return None
  replace = {}
  kernel, stride = (3, 1) if model['small_stem'] else (7, 2)
  if in_channels != 3 or model['small_stem']:
    replace['conv1'] = (f'torch.nn.Conv2d({in_channels}, 64, kernel_size={kernel}, '
                        f'stride={stride}, padding={kernel // 2}, bias=False)')
  if model['small_stem']:
    replace['maxpool'] = 'torch.nn.Identity()'
  return {
      'class': f'torchvision.models.{model["backbone"]}',
      'replace': replace,
      'load': 'model.load_state_dict(state_dict, strict=False): the only missing keys are '
              'fc.weight and fc.bias (train fc, or set model.fc = torch.nn.Identity() for the '
              'features)',
  }


def _intensity(data: dict, resize: str) -> dict[str, Any] | None:
  """How raw voxels became the encoder's uint8 input, from the run's data settings."""
  if not data:
    return None
  return {
      'policy': data.get('intensity'),
      'ct_window': data.get('ct_window'),
      'mri_percentiles': data.get('mri_percentiles'),
      'slice_axis': data.get('slice_axis'),
      'target_spacing': data.get('target_spacing'),
      'pipeline': 'raw voxels -> [0, 1] by the policy (ct: HU window (low, high) -> [0, 1], '
                  'clipped; mri: each scan clipped at its percentiles and rescaled; minmax: each '
                  f'scan\'s range) -> {resize} -> uint8 round(x * 255)',
      'note': ('policy \'auto\' was chosen per source at start-up (ct for HU-like voxels, else '
               'mri or minmax); the run\'s log names the choice'
               if data.get('intensity') == 'auto' else None),
  }


def _normalisation(mean: float, std: float, what: str) -> dict[str, Any]:
  return {'formula': f'x = (uint8_{what} / 255 - {mean}) / {std}', 'scale': 1 / 255,
          'mean': mean, 'std': std}


def _resnet_entries(model: dict[str, Any], state_dict: dict[str, np.ndarray],
                    data: dict) -> dict[str, Any]:
  in_channels = int(state_dict['conv1.weight'].shape[1])
  widths = [max(1, int(64 * 2**s * float(model['width_multiplier']))) for s in range(4)]
  _, stage_sizes, convs = convert.architecture(model['backbone'])
  torchvision = torchvision_recipe(model, in_channels)
  return {
      'model': {
          'backbone': model['backbone'],
          'in_channels': in_channels,
          'small_stem': bool(model['small_stem']),
          'width_multiplier': float(model['width_multiplier']),
          'block': 'Bottleneck' if convs == 3 else 'BasicBlock',
          'stage_sizes': list(stage_sizes),
          'num_features': widths[-1] * (4 if convs == 3 else 1),
          'stem': ('conv1 3x3 stride 1 padding 1, no max-pool (small stem)'
                   if model['small_stem'] else
                   'conv1 7x7 stride 2 padding 3, max-pool 3x3 stride 2 padding 1'),
          'output': 'layer4 averaged over height and width: float32 [N, num_features]',
      },
      'torchvision': torchvision,
      'torchvision_note': None if torchvision else (
          f'torchvision has no class for a {model["backbone"]} with width_multiplier='
          f'{float(model["width_multiplier"])}; use the plain module'),
      'module': (f"dsset.export.torch_resnet.ResNet('{model['backbone']}', "
                 f"in_channels={in_channels}, small_stem={bool(model['small_stem'])}, "
                 f"width_multiplier={float(model['width_multiplier'])})"),
      'plain_module': 'dsset.export.torch_resnet (torch only; load_encoder(path) reads this file)',
      'input': {
          'layout': f'float32 [N, {in_channels}, H, W]; a grey slice repeated to {in_channels} '
                    'channel(s)',
          'image_size': data.get('image_size'),
          'normalisation': _normalisation(INPUT_MEAN, INPUT_STD, 'slice'),
          'intensity': _intensity(data, 'slice resized to image_size (bilinear, antialiased)'),
      },
  }


def monai_recipe(filters: list[int], bottleneck: int, in_channels: int) -> dict[str, Any] | None:
  """How MONAI's BasicUNet takes a 3D U-Net encoder state_dict, or None when its fixed depth
  (4 pooled levels) does not fit."""
  if len(filters) != 4:
    return None
  features = (*filters, bottleneck, filters[0])
  return {
      'class': 'monai.networks.nets.BasicUNet',
      'construct': (f'BasicUNet(spatial_dims=3, in_channels={in_channels}, out_channels=<classes>, '
                    f'features={features}, act=\'relu\', norm=\'batch\', bias=False, '
                    'dropout=0.0)'),
      'load': 'model.load_state_dict(state_dict, strict=False): the only missing keys are the '
              'decoder\'s (upcat_*, final_conv.*), which fine-tuning trains',
      'note': 'features[5] (the last decoder level\'s width) is free; BasicUNet\'s decoder is not '
              'dsset\'s segment3d decoder (its last up-level keeps more channels)',
  }


def _unet3d_entries(model: dict[str, Any], state_dict: dict[str, np.ndarray],
                    data: dict) -> dict[str, Any]:
  inferred = convert.infer_unet3d(state_dict)
  filters, bottleneck, in_channels = (inferred['filters'], inferred['bottleneck'],
                                      inferred['in_channels'])
  monai = monai_recipe(filters, bottleneck, in_channels)
  voxel_mm = data.get('voxel_mm')
  return {
      'model': {
          'backbone': model['backbone'],
          'in_channels': in_channels,
          'filters': filters,
          'bottleneck': bottleneck,
          'num_features': bottleneck,
          'levels': ('per level [3^3 conv (padding 1, no bias) - BatchNorm - ReLU] x 2; a 2^3 '
                     'max-pool before every level but the first'),
          'output': 'bottleneck map averaged over depth, height and width: float32 '
                    '[N, num_features]',
      },
      'monai': monai,
      'monai_note': None if monai else (
          f'MONAI\'s BasicUNet has 4 pooled levels; this encoder has {len(filters)}: use the '
          'plain module'),
      'module': (f'dsset.export.torch_unet3d.UNet3DEncoder(in_channels={in_channels}, '
                 f'filters={tuple(filters)}, bottleneck={bottleneck})'),
      'plain_module': 'dsset.export.torch_unet3d (torch only; load_encoder(path) reads this '
                      'file)',
      'input': {
          'layout': (f'float32 [N, {in_channels}, D, H, W] (torch\'s channels-first; dsset holds '
                     'volumes channels-last), each side a multiple of '
                     f'{2 ** len(filters)}; D runs along the first axis of the scan\'s voxel array'),
          'volume_size': data.get('volume_size'),
          'voxel_mm': voxel_mm,
          'resampling': (None if not data else
                         'the scan\'s own voxels (voxel_mm 0)' if not voxel_mm else
                         f'isotropic {voxel_mm} mm voxels (separable linear interpolation)'),
          'normalisation': _normalisation(augment3d.INPUT_MEAN, augment3d.INPUT_STD, 'volume'),
          'intensity': _intensity(data, 'volume resampled as \'resampling\' says'),
      },
  }


def sidecar(workdir: str, model: dict[str, Any], encoder_path: list[str] | None,
            state_dict: dict[str, np.ndarray], config: dict | None, out: str) -> dict[str, Any]:
  """The JSON written beside the state_dict."""
  data = (config or {}).get('data', {})
  entries = (_unet3d_entries if model['backbone'] == UNET3D else _resnet_entries)(
      model, state_dict, data)
  entries['input']['note'] = (None if data else
                              'no config.json in the workdir: intensity settings unknown')
  return {
      'format': SIDECAR_FORMAT,
      'state_dict': os.path.basename(out),
      **entries,
      'batchnorm': {'eps': 1e-5, 'momentum': 0.1,
                    'num_batches_tracked': 'written as 0 (unused with momentum 0.1)'},
      'source': {
          'workdir': os.path.abspath(workdir),
          'method': (config or {}).get('method'),
          'encoder_path': encoder_path,
          'dsset_model': model,
      },
  }


def export_torch(workdir: str, out: str) -> tuple[str, str]:
  """Writes the encoder of `workdir` to `out` (state_dict) and its sidecar; returns both paths."""
  if checkpointing.is_torch_file(workdir):
    raise ConfigError(f'--workdir={workdir!r} is a PyTorch file; pass a pretraining workdir')
  if not os.path.isdir(workdir):
    raise ConfigError(f'--workdir={workdir!r}: no such folder')
  if not (os.path.isfile(os.path.join(workdir, checkpointing.BACKBONE_FILE))
          and os.path.isfile(os.path.join(workdir, checkpointing.BACKBONE_INFO_FILE))):
    raise ConfigError(f'--workdir={workdir!r}: no {checkpointing.BACKBONE_FILE} + '
                      f'{checkpointing.BACKBONE_INFO_FILE} there (a pretraining run writes them '
                      'when it finishes)')
  if sidecar_path(out) == out:
    raise ConfigError(f'--out={out!r} would be overwritten by its .json sidecar; name it '
                      'encoder.pt (or .pth)')
  torch = _import_torch()
  encoder, model = checkpointing.load_backbone(workdir)
  try:
    arrays = convert.flax_to_torch(encoder, model['backbone'])
  except convert.ConversionError as e:
    raise ConfigError(f'--workdir={workdir!r}: {e}') from None
  info = _read_json(os.path.join(workdir, checkpointing.BACKBONE_INFO_FILE)) or {}
  config = _read_json(os.path.join(workdir, 'config.json'))
  meta = sidecar(workdir, model, info.get('encoder_path'), arrays, config, out)

  state_dict = OrderedDict(
      (key, torch.from_numpy(np.array(value))) for key, value in arrays.items())
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  torch.save(state_dict, out + '.tmp')
  os.replace(out + '.tmp', out)
  meta_path = sidecar_path(out)
  with open(meta_path + '.tmp', 'w') as f:
    json.dump(meta, f, indent=2)
  os.replace(meta_path + '.tmp', meta_path)
  return out, meta_path
