"""Forward+backward time of each 3D U-Net encoder layer, plain XLA vs dsset's CPU path vs PyTorch.

The 3D counterpart of benchmarks/conv_layers.py, for issue 22 (docs/performance.md, "3D U-Net on
XLA:CPU"). Every distinct convolution of the default UNet3DEncoder (16-32-64-128 + 256) on the
unet3d workload's volumes (batch 8, 32^3 by default) is timed as forward + gradients of input and
kernel (the first conv only of the kernel: its input is data) through dsset's `Conv` layer, once
with the CPU fast path off (XLA's own 3D convolution) and once on (dsset.ops.cpu_conv3d), and as a
PyTorch Conv3d in its default NCDHW format; BatchNorm + ReLU and the 2^3 max-pool of each level
are timed the same way. All three alternate per shape in one process; one JSON line per shape.

This module also holds the constants of the unet3d throughput workload, which
benchmarks/throughput.py and benchmarks/torch_reference.py share.

    python benchmarks/conv3d_layers.py [--side 32] [--batch 8] [--steps 7]
"""

import pathlib
import sys

if __package__ in (None, ''):  # run as a script: make `benchmarks` and `dsset` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import dsset  # noqa: E402,F401  (sets the XLA:CPU flag before JAX starts)

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import timing  # noqa: E402
from dsset.models import layers  # noqa: E402

# The unet3d workload (a rotation3d-like train step, issue 22): encoder + pretext head + 10-way
# cross-entropy, Adam, on one channel volumes of UNET3D_SIDE^3.
UNET3D_VOLUMES = 8
UNET3D_SIDE = 32
UNET3D_FILTERS = (16, 32, 64, 128)
UNET3D_BOTTLENECK = 256
UNET3D_CLASSES = 10
UNET3D_LEARNING_RATE = 1e-4


def volumes_per_step(scale: int = 1) -> int:
  """Volumes per unet3d step; `scale` divides the batch for quick checks (2 at least, for BN)."""
  return max(2, UNET3D_VOLUMES // scale)


def unet3d_layers(side: int, filters=UNET3D_FILTERS, bottleneck=UNET3D_BOTTLENECK) -> list[dict]:
  """(kind, name, map side, in/out channels) of every distinct layer of the encoder."""
  shapes, cin = [], 1
  for level, width in enumerate((*filters, bottleneck)):
    name = f'level{level + 1}' if level < len(filters) else 'bottleneck'
    shapes.append(dict(kind='conv', name=f'{name}.conv1', size=side, cin=cin, cout=width,
                       input_grad=cin != 1))
    shapes.append(dict(kind='conv', name=f'{name}.conv2', size=side, cin=width, cout=width,
                       input_grad=True))
    shapes.append(dict(kind='bn_relu', name=f'{name}.bn_relu', size=side, cin=width, cout=width,
                       input_grad=True))
    if level < len(filters):
      shapes.append(dict(kind='max_pool', name=f'{name}.pool', size=side, cin=width, cout=width,
                         input_grad=True))
      side //= 2
    cin = width
  return shapes


def _flops(shape: dict, batch: int) -> float:
  if shape['kind'] != 'conv':
    return 0.0
  forward = 2 * batch * shape['size'] ** 3 * shape['cin'] * shape['cout'] * 27
  return forward * (3 if shape['input_grad'] else 2)


def jax_step(shape: dict, batch: int, fast: bool):
  lay = layers.Layers(cpu_fast_path=fast)
  x = jax.random.normal(jax.random.key(0), (batch, *(shape['size'],) * 3, shape['cin']))
  if shape['kind'] == 'conv':
    module = lay.conv(shape['cout'], (3, 3, 3), padding=((1, 1),) * 3)
    apply = module.apply
  elif shape['kind'] == 'bn_relu':
    module = lay.norm(train=True)

    def apply(p, inputs):
      y, _ = module.apply(p, inputs, mutable=['batch_stats'])
      return jax.nn.relu(y)
  else:
    module = None
    apply = lambda p, inputs: lay.max_pool(inputs, (2, 2, 2), (2, 2, 2), ((0, 0),) * 3)
  params = module.init(jax.random.key(1), x) if module is not None else {}
  argnums = (0, 1) if shape['input_grad'] else (0,)

  def loss(p, inputs):
    return jnp.sum(apply(p, inputs) ** 2)

  grad = jax.jit(jax.grad(loss, argnums=argnums))
  return lambda: jax.block_until_ready(grad(params, x))


def torch_step(shape: dict, batch: int):
  import torch  # optional: only this comparison needs it
  x = torch.randn(batch, shape['cin'], *(shape['size'],) * 3)
  x = x.requires_grad_(shape['input_grad'])
  if shape['kind'] == 'conv':
    module = torch.nn.Conv3d(shape['cin'], shape['cout'], 3, 1, 1, bias=False)
  elif shape['kind'] == 'bn_relu':
    module = torch.nn.Sequential(torch.nn.BatchNorm3d(shape['cin']), torch.nn.ReLU())
  else:
    module = torch.nn.MaxPool3d(2)

  def step():
    module.zero_grad(set_to_none=True)
    x.grad = None
    module(x).pow(2).sum().backward()

  return step


def measure(shape: dict, batch: int, warmup: int, steps: int, with_torch: bool) -> dict:
  """The JSON record of one layer shape: plain and fast JAX paths, PyTorch if available."""
  result = {'benchmark': 'conv3d_layers', **shape, 'batch': batch}
  gflop = _flops(shape, batch) / 1e9
  if gflop:
    result['gflop'] = round(gflop, 3)
  runners = {'jax_plain': jax_step(shape, batch, False), 'jax_fast': jax_step(shape, batch, True)}
  if with_torch:
    runners['torch'] = torch_step(shape, batch)
  times = {name: [] for name in runners}
  for name, run in runners.items():
    timing.step_seconds(run, warmup, 0)
  # Alternate the three one step at a time, so that load from other jobs hits them alike.
  for _ in range(steps):
    for name, run in runners.items():
      times[name] += timing.step_seconds(run, 0, 1)
  for name, values in times.items():
    result[f'{name}_ms'] = round(1e3 * statistics.median(values), 2)
  if with_torch:
    result['fast_vs_torch'] = round(result['torch_ms'] / result['jax_fast_ms'], 3)
  result['fast_vs_plain'] = round(result['jax_plain_ms'] / result['jax_fast_ms'], 3)
  result['jax_version'] = jax.__version__
  return result


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--side', type=int, default=UNET3D_SIDE)
  parser.add_argument('--batch', type=int, default=UNET3D_VOLUMES)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--steps', type=int, default=7)
  parser.add_argument('--only', nargs='*', default=None, help='layer names to time (all if unset)')
  args = parser.parse_args(argv)
  try:
    import torch  # noqa: F401
    with_torch = True
  except ImportError:
    with_torch = False
  for shape in unet3d_layers(args.side):
    if args.only and shape['name'] not in args.only:
      continue
    timing.emit(measure(shape, args.batch, args.warmup, args.steps, with_torch)
                | {'side': args.side, 'machine': platform.processor() or platform.machine(),
                   'date': time.strftime('%Y-%m-%d')})


if __name__ == '__main__':
  main()
