"""The throughput workloads in PyTorch eager (CPU), for comparison: same models, same JSON fields.

    python benchmarks/torch_reference.py --workload simclr dsset encode [--backbone resnet18]
        [--image-size 64]
    python benchmarks/torch_reference.py --workload unet3d [--image-size 32]

Needs torch (the `torch` extra); exits with a message if it is missing. Model FLOPs are counted by
torch.utils.flop_counter (convolutions and matmuls, padding taps included), so MFU is comparable
between the two frameworks only roughly; images_per_s is the figure to compare.
"""

import pathlib
import sys

if __package__ in (None, ''):  # run as a script from a checkout: make `benchmarks` importable.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402

from benchmarks import conv3d_layers, timing  # noqa: E402

try:
  import torch  # noqa: E402
  from torch import nn  # noqa: E402
  from torch.nn import functional as F  # noqa: E402
  from torch.utils import flop_counter  # noqa: E402
except ImportError:
  torch = None


def _conv_bn(cin, cout, kernel, stride):
  return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)]


def _shortcut(cin, cout, stride):
  if stride == 1 and cin == cout:
    return nn.Identity()
  return nn.Sequential(*_conv_bn(cin, cout, 1, stride))


class _Residual(nn.Module):
  def __init__(self, body, shortcut):
    super().__init__()
    self.body, self.shortcut = body, shortcut

  def forward(self, x):
    return F.relu(self.body(x) + self.shortcut(x))


def _basic(cin, width, stride):
  body = nn.Sequential(*_conv_bn(cin, width, 3, stride), nn.ReLU(), *_conv_bn(width, width, 3, 1))
  return _Residual(body, _shortcut(cin, width, stride)), width


def _bottleneck(cin, width, stride):
  out = 4 * width
  body = nn.Sequential(*_conv_bn(cin, width, 1, 1), nn.ReLU(), *_conv_bn(width, width, 3, stride),
                       nn.ReLU(), *_conv_bn(width, out, 1, 1))
  return _Residual(body, _shortcut(cin, out, stride)), out


def resnet(backbone: str) -> 'nn.Module':
  """torchvision's ResNet-18/50 layout for one input channel, without the classifier."""
  block, stages = {'resnet18': (_basic, (2, 2, 2, 2)),
                   'resnet50': (_bottleneck, (3, 4, 6, 3))}[backbone]
  layers = [*_conv_bn(1, 64, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
  channels = 64
  for stage, blocks in enumerate(stages):
    for index in range(blocks):
      layer, channels = block(channels, 64 * 2**stage, 2 if stage > 0 and index == 0 else 1)
      layers.append(layer)
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
  net = nn.Sequential(*layers)
  net.num_features = channels
  return net


def _mlp(width):
  return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))


def _head(width):
  return nn.Sequential(nn.Linear(width, timing.HEAD_HIDDEN), nn.BatchNorm1d(timing.HEAD_HIDDEN),
                       nn.ReLU(), nn.Linear(timing.HEAD_HIDDEN, timing.HEAD_OUT))


class _DeepSet(nn.Module):
  def __init__(self, encoder):
    super().__init__()
    width = encoder.num_features
    self.encoder, self.phi, self.rho, self.head = encoder, _mlp(width), _mlp(width), _head(width)

  def forward(self, sets):
    batch, set_size = sets.shape[:2]
    per_slice = self.phi(self.encoder(sets.flatten(0, 1)))
    return self.head(self.rho(per_slice.view(batch, set_size, -1).mean(1)))


def nt_xent(z_a, z_b, temperature):
  z = F.normalize(torch.cat([z_a, z_b]), dim=1)
  logits = z @ z.T / temperature
  rows = z.shape[0]
  logits = logits.masked_fill(torch.eye(rows, dtype=torch.bool), float('-inf'))
  targets = (torch.arange(rows) + rows // 2) % rows
  return F.cross_entropy(logits, targets)


def unet3d_encoder(filters=conv3d_layers.UNET3D_FILTERS,
                   bottleneck=conv3d_layers.UNET3D_BOTTLENECK) -> 'nn.Module':
  """dsset.models.UNet3DEncoder in PyTorch: [Conv3d 3^3 - BN - ReLU] x 2 per level, max-pool 2^3
  between levels, global average pool of the bottleneck."""
  layers, cin = [], 1
  for level, width in enumerate((*filters, bottleneck)):
    for _ in range(2):
      layers += [nn.Conv3d(cin, width, 3, 1, 1, bias=False), nn.BatchNorm3d(width), nn.ReLU()]
      cin = width
    if level < len(filters):
      layers.append(nn.MaxPool3d(2))
  layers += [nn.AdaptiveAvgPool3d(1), nn.Flatten()]
  return nn.Sequential(*layers)


def pretext_head(width, hidden=(2048, 1024), dropout=0.5):
  """dsset.models.PretextHead: [Linear - ReLU - BatchNorm - Dropout] per hidden width."""
  layers = []
  for out in hidden:
    layers += [nn.Linear(width, out), nn.ReLU(), nn.BatchNorm1d(out), nn.Dropout(dropout)]
    width = out
  return nn.Sequential(*layers)


def _unet3d_workload(side, scale, filters=None, bottleneck=None):
  torch.manual_seed(0)
  volumes = conv3d_layers.volumes_per_step(scale)
  bottleneck = bottleneck or conv3d_layers.UNET3D_BOTTLENECK
  model = nn.Sequential(unet3d_encoder(tuple(filters or conv3d_layers.UNET3D_FILTERS), bottleneck),
                        pretext_head(bottleneck), nn.Linear(1024, conv3d_layers.UNET3D_CLASSES))
  model.train()
  inputs = torch.rand(volumes, 1, side, side, side)
  labels = torch.randint(0, conv3d_layers.UNET3D_CLASSES, (volumes,))
  optimizer = torch.optim.Adam(model.parameters(), lr=conv3d_layers.UNET3D_LEARNING_RATE)

  def step():
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(inputs), labels).backward()
    optimizer.step()
  return step


def _workload(name, backbone, image_size, scale):
  if name == 'unet3d':
    return _unet3d_workload(image_size, scale)
  torch.manual_seed(0)
  images = timing.images_per_step(name, scale)
  encoder = resnet(backbone)
  if name == 'encode':
    encoder.eval()
    inputs = torch.rand(images, 1, image_size, image_size)

    def step():
      with torch.no_grad():
        encoder(inputs)
    return step
  if name == 'simclr':
    model = nn.Sequential(encoder, _head(encoder.num_features))
    inputs = torch.rand(images, 1, image_size, image_size)
  else:
    model = _DeepSet(encoder)
    inputs = torch.rand(images // timing.DSSET_SET_SIZE, timing.DSSET_SET_SIZE, 1, image_size,
                        image_size)
  model.train()
  optimizer = torch.optim.SGD(model.parameters(), lr=timing.LEARNING_RATE,
                              momentum=timing.MOMENTUM, weight_decay=timing.WEIGHT_DECAY)

  def step():
    optimizer.zero_grad(set_to_none=True)
    z_a, z_b = model(inputs).chunk(2)
    nt_xent(z_a, z_b, timing.TEMPERATURE).backward()
    optimizer.step()
  return step


def _model_flops(step):
  counter = flop_counter.FlopCounterMode(display=False)
  with counter:
    step()
  return float(counter.get_total_flops())


def matmul_peak() -> float:
  a = torch.ones(timing.MATMUL_PEAK_SIZE, timing.MATMUL_PEAK_SIZE)
  return timing.best_flop_rate(lambda: torch.mm(a, a))


def run(name: str, backbone: str = 'resnet18', image_size: int = 64, warmup: int = 3,
        steps: int = 15, scale: int = 1, peak_flops: float | None = None,
        unet3d_filters=None, unet3d_bottleneck=None) -> dict:
  """Benchmarks one workload and returns its JSON record (unet3d: image_size is the side)."""
  if name == 'unet3d':
    backbone = 'unet3d'
    step = _unet3d_workload(image_size, scale, unet3d_filters, unet3d_bottleneck)
  else:
    step = _workload(name, backbone, image_size, scale)
  model_flops = _model_flops(step)  # also the first warm-up step.
  step_times = timing.step_seconds(step, warmup, steps)
  return timing.record(
      'torch', name, step_times,
      conv3d_layers.volumes_per_step(scale) if name == 'unet3d'
      else timing.images_per_step(name, scale), model_flops,
      peak_flops if peak_flops is not None else matmul_peak(), compile_s=0.0, backend='cpu',
      device_count=1, torch_version=torch.__version__, threads=torch.get_num_threads(),
      backbone=backbone, image_size=image_size)


def main(argv=None) -> None:
  if torch is None:
    sys.exit('benchmarks/torch_reference.py needs torch: pip install torch (CPU build).')
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workload', nargs='+', choices=(*timing.WORKLOADS, 'unet3d'),
                      default=list(timing.WORKLOADS))
  parser.add_argument('--backbone', choices=('resnet18', 'resnet50'), default='resnet18')
  parser.add_argument('--image-size', type=int, default=None,
                      help='image side (default 64); for unet3d the volume side (default 32)')
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--steps', type=int, default=15)
  args = parser.parse_args(argv)
  peak = matmul_peak()
  for name in args.workload:
    size = args.image_size or (conv3d_layers.UNET3D_SIDE if name == 'unet3d' else 64)
    timing.emit(run(name, args.backbone, size, args.warmup, args.steps,
                    peak_flops=peak))


if __name__ == '__main__':
  main()
