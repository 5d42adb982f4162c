"""dsset's 2D ResNet encoders as a plain PyTorch module with torchvision's layout (torch only).

This file imports nothing but torch (and the standard library), so it can be copied next to a
PyTorch project on its own. Its module names and parameter shapes are torchvision's
(torchvision.models.resnet.ResNet without `fc`): a state_dict written by
`python -m dsset.export --format=torch` loads into it with strict=True, and into
torchvision.models.resnet18 / resnet50 (with conv1 replaced, see docs/pytorch.md), and vice versa.

    from dsset.export import torch_resnet
    encoder = torch_resnet.load_encoder('encoder.pt')   # reads encoder.json beside it; eval mode
    features = encoder(torch_resnet.normalise(uint8_slices))   # [N, C, H, W] -> [N, D]

Beyond torchvision it supports what dsset's encoders have:
  - in_channels: 1 for grey scans (dsset's default), 3 for grey repeated to RGB.
  - small_stem: conv1 is 3x3 with stride 1 (padding 1) and there is no max-pool (`maxpool` is an
    nn.Identity, so the keys are unchanged); for 28-64 px inputs.
  - width_multiplier: every width scaled (stage widths max(1, int(64 * 2**s * m))).
  - resnet10: one BasicBlock per stage (not in torchvision).
The forward pass returns the globally average-pooled features [N, D] (float32), as dsset's encoder.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

# Input normalisation of every dsset encoder: uint8 slices / 255, then (x - MEAN) / STD
# (dsset.methods.contrastive.INPUT_MEAN / INPUT_STD; encoder.json records the values used).
INPUT_MEAN = 0.5
INPUT_STD = 0.25

# backbone -> (block, blocks per stage); the same table as dsset.models.resnet.BACKBONES.
ARCHITECTURES = {
    'resnet10': ('basic', (1, 1, 1, 1)),
    'resnet18': ('basic', (2, 2, 2, 2)),
    'resnet50': ('bottleneck', (3, 4, 6, 3)),
}


def _conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Conv2d:
  # torchvision pads every conv symmetrically by kernel // 2 and uses no bias.
  return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)


def _downsample(cin: int, cout: int, stride: int) -> nn.Module | None:
  # torchvision projects the identity (1x1 conv + BN) only when the shape changes.
  if stride == 1 and cin == cout:
    return None
  return nn.Sequential(_conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
  """torchvision's BasicBlock: two 3x3 convs (the first strided); output width = `width`."""
  expansion = 1

  def __init__(self, cin: int, width: int, stride: int = 1):
    super().__init__()
    self.conv1 = _conv(cin, width, 3, stride)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = _conv(width, width, 3)
    self.bn2 = nn.BatchNorm2d(width)
    self.downsample = _downsample(cin, width, stride)
    self.stride = stride

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + identity)


class Bottleneck(nn.Module):
  """torchvision's Bottleneck (v1.5, stride in the 3x3 conv); output width = 4 * `width`."""
  expansion = 4

  def __init__(self, cin: int, width: int, stride: int = 1):
    super().__init__()
    out = width * self.expansion
    self.conv1 = _conv(cin, width, 1)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = _conv(width, width, 3, stride)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = _conv(width, out, 1)
    self.bn3 = nn.BatchNorm2d(out)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = _downsample(cin, out, stride)
    self.stride = stride

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(out + identity)


_BLOCKS = {'basic': BasicBlock, 'bottleneck': Bottleneck}


class ResNet(nn.Module):
  """torchvision's ResNet without `fc`: images [N, C, H, W] -> pooled features [N, num_features].

  Args:
    backbone: 'resnet10' | 'resnet18' | 'resnet50'.
    in_channels: channels of conv1's input (1 = grey).
    small_stem: 3x3/1 conv1 and no max-pool instead of 7x7/2 + 3x3/2 max-pool.
    width_multiplier: scales every width (base widths 64, 128, 256, 512).
  """

  def __init__(self, backbone: str = 'resnet18', in_channels: int = 1, small_stem: bool = False,
               width_multiplier: float = 1.0):
    super().__init__()
    if backbone not in ARCHITECTURES:
      raise ValueError(f'backbone must be one of {sorted(ARCHITECTURES)}, got {backbone!r}')
    if not width_multiplier > 0:
      raise ValueError(f'width_multiplier must be positive, got {width_multiplier}')
    block_name, stage_sizes = ARCHITECTURES[backbone]
    block = _BLOCKS[block_name]
    self.backbone, self.small_stem = backbone, bool(small_stem)
    self.width_multiplier = float(width_multiplier)
    widths = [max(1, int(64 * 2**stage * width_multiplier)) for stage in range(len(stage_sizes))]
    kernel, stride = (3, 1) if small_stem else (7, 2)
    self.conv1 = _conv(in_channels, widths[0], kernel, stride)
    self.bn1 = nn.BatchNorm2d(widths[0])
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.Identity() if small_stem else nn.MaxPool2d(3, stride=2, padding=1)
    channels = widths[0]
    for stage, (width, blocks) in enumerate(zip(widths, stage_sizes)):
      layers = []
      for index in range(blocks):
        layers.append(block(channels, width, 2 if stage > 0 and index == 0 else 1))
        channels = width * block.expansion
      self.add_module(f'layer{stage + 1}', nn.Sequential(*layers))
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.num_features = channels

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return torch.flatten(self.avgpool(x), 1)


def resnet10(**kwargs) -> ResNet:
  return ResNet('resnet10', **kwargs)


def resnet18(**kwargs) -> ResNet:
  return ResNet('resnet18', **kwargs)


def resnet50(**kwargs) -> ResNet:
  return ResNet('resnet50', **kwargs)


def from_model_config(model: dict[str, Any]) -> ResNet:
  """The module for an encoder.json 'model' entry (backbone, in_channels, small_stem,
  width_multiplier)."""
  return ResNet(model['backbone'], in_channels=int(model.get('in_channels', 1)),
                small_stem=bool(model.get('small_stem', False)),
                width_multiplier=float(model.get('width_multiplier', 1.0)))


def sidecar_path(state_dict_path: str) -> str:
  """encoder.pt -> encoder.json (the sidecar written beside every export)."""
  return os.path.splitext(state_dict_path)[0] + '.json'


def load_encoder(path: str, map_location: str = 'cpu') -> ResNet:
  """The exported encoder at `path` (a state_dict; its sidecar beside it), in eval mode."""
  with open(sidecar_path(path)) as f:
    info = json.load(f)
  model = from_model_config(info['model'])
  model.load_state_dict(torch.load(path, map_location=map_location, weights_only=True))
  return model.eval()


def normalise(images: torch.Tensor) -> torch.Tensor:
  """uint8 slices [N, C, H, W] (0..255, after the run's intensity mapping) -> encoder inputs."""
  return (images.float() / 255.0 - INPUT_MEAN) / INPUT_STD
