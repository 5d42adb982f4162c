"""Forward+backward time of each ResNet-18 convolution shape, JAX against PyTorch in one process.

Answers one question about the speed gap of the training steps (docs/performance.md): are XLA's
CPU convolutions slower than PyTorch's oneDNN ones, or is the time lost elsewhere? Every distinct
convolution of ResNet-18 at the simclr workload's shapes (batch 128, 64 px by default) is timed as
forward + gradients of input and kernel (the stem only of the kernel: its input is data), through
dsset's own `Conv` layer with the CPU fast path on, so layout copies XLA adds for the weight gradient
are counted on the JAX side. PyTorch runs the same shape in its default NCHW memory format, as
benchmarks/torch_reference.py does. The two alternate per shape; each prints one JSON line.

    python benchmarks/conv_layers.py [--image-size 64] [--batch 128] [--steps 7]
"""

import pathlib
import sys

if __package__ in (None, ''):  # run as a script: make `benchmarks` and `dsset` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import dsset  # noqa: E402,F401  (sets the XLA:CPU flag before JAX starts)

import argparse  # noqa: E402
import statistics  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import timing  # noqa: E402
from dsset.models import layers  # noqa: E402


def resnet18_convs(image_size: int) -> list[dict]:
  """(name, input map, in/out channels, kernel, stride) of every distinct ResNet-18 convolution."""
  size = image_size // 4  # after the stem's stride and the max-pool
  shapes = [dict(name='stem', size=image_size, cin=1, cout=64, kernel=7, stride=2, input_grad=False)]
  cin = 64
  for stage, width in enumerate((64, 128, 256, 512)):
    stride = 1 if stage == 0 else 2
    if stride == 2:
      shapes.append(dict(name=f'layer{stage + 1}.down3x3', size=size, cin=cin, cout=width,
                         kernel=3, stride=2, input_grad=True))
      shapes.append(dict(name=f'layer{stage + 1}.shortcut1x1', size=size, cin=cin, cout=width,
                         kernel=1, stride=2, input_grad=True))
      size //= 2
    shapes.append(dict(name=f'layer{stage + 1}.3x3', size=size, cin=width, cout=width, kernel=3,
                       stride=1, input_grad=True))
    cin = width
  return shapes


def _flops(shape: dict, batch: int) -> float:
  out = shape['size'] // shape['stride']
  forward = 2 * batch * out * out * shape['cin'] * shape['cout'] * shape['kernel'] ** 2
  return forward * (3 if shape['input_grad'] else 2)


def jax_step(shape: dict, batch: int):
  pad = shape['kernel'] // 2
  conv = layers.Layers(cpu_fast_path=True).conv(
      shape['cout'], (shape['kernel'],) * 2, (shape['stride'],) * 2, ((pad, pad), (pad, pad)))
  x = jax.random.normal(jax.random.key(0), (batch, shape['size'], shape['size'], shape['cin']))
  params = conv.init(jax.random.key(1), x)
  argnums = (0, 1) if shape['input_grad'] else (0,)

  def loss(p, inputs):
    return jnp.sum(conv.apply(p, inputs) ** 2)

  grad = jax.jit(jax.grad(loss, argnums=argnums))
  return lambda: jax.block_until_ready(grad(params, x))


def torch_step(shape: dict, batch: int):
  import torch  # optional: only this comparison needs it
  x = torch.randn(batch, shape['cin'], shape['size'], shape['size'])
  x = x.requires_grad_(shape['input_grad'])
  conv = torch.nn.Conv2d(shape['cin'], shape['cout'], shape['kernel'], shape['stride'],
                         shape['kernel'] // 2, bias=False)

  def step():
    conv.zero_grad(set_to_none=True)
    conv(x).pow(2).sum().backward()

  return step


def measure(shape: dict, batch: int, warmup: int, steps: int, with_torch: bool) -> dict:
  """The JSON record of one convolution shape."""
  gflop = _flops(shape, batch) / 1e9
  result = {'benchmark': 'conv_layers', **shape, 'batch': batch, 'gflop': round(gflop, 3)}
  seconds = statistics.median(timing.step_seconds(jax_step(shape, batch), warmup, steps))
  result['jax_ms'] = round(1e3 * seconds, 2)
  result['jax_gflop_per_s'] = round(gflop / seconds, 1)
  if with_torch:
    seconds = statistics.median(timing.step_seconds(torch_step(shape, batch), warmup, steps))
    result['torch_ms'] = round(1e3 * seconds, 2)
    result['jax_speedup'] = round(result['torch_ms'] / result['jax_ms'], 3)
  result['jax_version'] = jax.__version__
  return result


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--image-size', type=int, default=64)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--steps', type=int, default=7)
  args = parser.parse_args(argv)
  try:
    import torch  # noqa: F401
    with_torch = True
  except ImportError:
    with_torch = False
  for shape in resnet18_convs(args.image_size):
    timing.emit(measure(shape, args.batch, args.warmup, args.steps, with_torch)
                | {'image_size': args.image_size})


if __name__ == '__main__':
  main()
