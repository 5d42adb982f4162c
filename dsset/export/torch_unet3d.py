"""dsset's 3D U-Net encoder as a plain PyTorch module with MONAI BasicUNet's names (torch only).

This file imports nothing but torch (and the standard library), so it can be copied next to a
PyTorch project on its own. The layout is the encoder path of monai.networks.nets.BasicUNet: a
two-conv block `conv_0`, then `down_1` ... `down_L`, each a 2^3 max-pool followed by a two-conv
block `convs`; every conv is [3^3 conv (padding 1, no bias) - BatchNorm - ReLU] under the names
`conv_<j>.conv` and `conv_<j>.adn.N`. So a state_dict written by
`python -m dsset.export --format=torch` from a unet3d run loads into this module with strict=True,
and into MONAI's BasicUNet(spatial_dims=3, features=(16, 32, 64, 128, 256, ...), act='relu',
norm='batch', bias=False) with strict=False (only its decoder, upcat_* and final_conv, is left to
train): docs/pytorch.md.

    from dsset.export import torch_unet3d
    encoder = torch_unet3d.load_encoder('encoder.pt')   # reads encoder.json beside it; eval mode
    features = encoder(torch_unet3d.normalise(uint8_volumes))   # [N, C, D, H, W] -> [N, 256]

The forward pass returns the bottleneck map averaged over space [N, bottleneck] (float32), as
dsset's encoder; `features_and_skips` also returns each level's map before its pool, which is
what a U-Net decoder concatenates.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Any, Sequence

import torch
from torch import nn

# Input normalisation of dsset's 3D encoders: uint8 voxels / 255, then (x - MEAN) / STD
# (dsset.augment3d.INPUT_MEAN / INPUT_STD; encoder.json records the values used).
INPUT_MEAN = 0.5
INPUT_STD = 0.25


class ConvNormReLU(nn.Sequential):
  """3^3 conv (padding 1, no bias: a BatchNorm follows) - BatchNorm - ReLU, named as MONAI's
  Convolution block (`conv`, `adn.N`, `adn.A`)."""

  def __init__(self, cin: int, cout: int):
    super().__init__(OrderedDict(
        conv=nn.Conv3d(cin, cout, 3, padding=1, bias=False),
        adn=nn.Sequential(OrderedDict(N=nn.BatchNorm3d(cout), A=nn.ReLU()))))


class TwoConv(nn.Sequential):
  """Two ConvNormReLU: dsset's ConvBlock3D (MONAI's TwoConv)."""

  def __init__(self, cin: int, cout: int):
    super().__init__(OrderedDict(conv_0=ConvNormReLU(cin, cout),
                                 conv_1=ConvNormReLU(cout, cout)))


class Down(nn.Sequential):
  """2^3 max-pool, then TwoConv (MONAI's Down)."""

  def __init__(self, cin: int, cout: int):
    super().__init__(OrderedDict(max_pooling=nn.MaxPool3d(2), convs=TwoConv(cin, cout)))


class UNet3DEncoder(nn.Module):
  """The down path of dsset's 3D U-Net: volumes [N, C, D, H, W] -> features [N, bottleneck].

  Args:
    in_channels: channels of the input volume (1 = grey).
    filters: width of each pooled level (dsset's model.unet3d.filters).
    bottleneck: width of the deepest level (model.unet3d.bottleneck).
  Each spatial side must be a multiple of 2 ** len(filters).
  """

  def __init__(self, in_channels: int = 1, filters: Sequence[int] = (16, 32, 64, 128),
               bottleneck: int = 256):
    super().__init__()
    widths = [int(w) for w in filters] + [int(bottleneck)]
    if len(widths) < 2 or min(widths) < 1:
      raise ValueError(f'filters must be a non-empty sequence of positive widths and bottleneck '
                       f'positive, got filters={tuple(filters)}, bottleneck={bottleneck}')
    self.filters, self.bottleneck = tuple(widths[:-1]), widths[-1]
    self.conv_0 = TwoConv(in_channels, widths[0])
    for level in range(1, len(widths)):
      self.add_module(f'down_{level}', Down(widths[level - 1], widths[level]))
    self.num_features = widths[-1]

  def features_and_skips(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(bottleneck map [N, bottleneck, D/2^L, H/2^L, W/2^L], level maps before their pools,
    shallowest first)."""
    factor = 2 ** len(self.filters)
    if x.dim() != 5 or any(side % factor for side in x.shape[2:]):
      raise ValueError(f'expected volumes [N, C, D, H, W] with sides multiples of {factor}, '
                       f'got shape {tuple(x.shape)}')
    skips = []
    x = self.conv_0(x)
    for level in range(1, len(self.filters) + 1):
      skips.append(x)
      x = getattr(self, f'down_{level}')(x)
    return x, skips

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    bottleneck_map, _ = self.features_and_skips(x)
    return bottleneck_map.float().mean(dim=(2, 3, 4))


def from_model_config(model: dict[str, Any]) -> UNet3DEncoder:
  """The module for an encoder.json 'model' entry (in_channels, filters, bottleneck)."""
  return UNet3DEncoder(int(model.get('in_channels', 1)), tuple(model['filters']),
                       int(model['bottleneck']))


def sidecar_path(state_dict_path: str) -> str:
  """encoder.pt -> encoder.json (the sidecar written beside every export)."""
  return os.path.splitext(state_dict_path)[0] + '.json'


def load_encoder(path: str, map_location: str = 'cpu') -> UNet3DEncoder:
  """The exported 3D encoder at `path` (a state_dict; its sidecar beside it), in eval mode."""
  with open(sidecar_path(path)) as f:
    info = json.load(f)
  model = from_model_config(info['model'])
  model.load_state_dict(torch.load(path, map_location=map_location, weights_only=True))
  return model.eval()


def normalise(volumes: torch.Tensor) -> torch.Tensor:
  """uint8 volumes [N, C, D, H, W] (0..255, after the run's intensity mapping) -> encoder inputs."""
  return (volumes.float() / 255.0 - INPUT_MEAN) / INPUT_STD
