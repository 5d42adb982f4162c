"""Throughput of dsset's real models on synthetic data: one JSON line per workload.

    python benchmarks/throughput.py --workload simclr dsset encode [--backbone resnet18]
        [--image-size 64] [--cpu-fast-path auto|on|off]
    python benchmarks/throughput.py --workload unet3d [--image-size 32]

Workloads (docs/performance.md): simclr (train step, 128 images), dsset (train step, 16 scans x 2
views x 8 slices), encode (eval forward, 256 images); unet3d (a 3D rotation-like train step: 8
volumes of 32^3 through the 3D U-Net encoder, the pretext head and a 10-way cross-entropy, Adam;
--image-size is then the volume's side and --backbone is ignored). Model FLOPs come from XLA's cost analysis of
the step lowered with the plain ops (before backend optimisation), so they do not depend on the CPU
rewrites; MFU divides the achieved model FLOP/s by the best float32 matmul rate measured in the
same process.
"""

import pathlib
import sys

if __package__ in (None, ''):  # run as a script from a checkout: make `dsset` importable.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import dsset  # noqa: E402  (first: it puts dsset's XLA:CPU flag in place before JAX starts)
import argparse  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from benchmarks import conv3d_layers, timing  # noqa: E402
from dsset import losses, models  # noqa: E402

del dsset


class _MLP(nn.Module):
  """Linear - ReLU - Linear, the Deep Set's phi and rho in the dsset workload."""
  width: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Dense(self.width)(nn.relu(nn.Dense(self.width)(x)))


class _EncoderWithPhi(nn.Module):
  """ResNet features followed by phi, per slice; called by SetEncoder like a bare encoder."""
  backbone: nn.Module

  @nn.compact
  def __call__(self, x, train: bool = False, mask=None):
    features = self.backbone(x, train=train, mask=mask)
    return _MLP(features.shape[-1])(features)


class _DeepSetModel(nn.Module):
  """Set encoder (phi per slice, mean pooling), rho, then the projection head."""
  backbone: nn.Module

  @nn.compact
  def __call__(self, sets: jax.Array, train: bool = True) -> jax.Array:
    pooled = models.SetEncoder(_EncoderWithPhi(self.backbone), pooling='mean')(sets, train=train)
    rho = _MLP(pooled.shape[-1])(pooled)
    return models.ProjectionHead(timing.HEAD_HIDDEN, timing.HEAD_OUT)(rho, train=train)


class _SimCLRModel(nn.Module):
  backbone: nn.Module

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = True) -> jax.Array:
    features = self.backbone(images, train=train)
    return models.ProjectionHead(timing.HEAD_HIDDEN, timing.HEAD_OUT)(features, train=train)


def _train_step_fn(model: nn.Module, optimizer: optax.GradientTransformation):
  """SGD step on NT-Xent between the two halves of the batch (view a, view b)."""
  def step(state, inputs):
    params, batch_stats, opt_state = state

    def loss_fn(params):
      z, updates = model.apply({'params': params, 'batch_stats': batch_stats}, inputs,
                               train=True, mutable=['batch_stats'])
      z_a, z_b = jnp.split(z, 2)
      return losses.nt_xent(z_a, z_b, timing.TEMPERATURE), updates['batch_stats']

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), new_stats, opt_state), loss
  return step


class _Rotation3DModel(nn.Module):
  """3D U-Net encoder, Taleb et al.'s pretext head and a 10-way classifier."""
  backbone: nn.Module

  @nn.compact
  def __call__(self, volumes: jax.Array, train: bool = True) -> jax.Array:
    features = self.backbone(volumes, train=train)
    return nn.Dense(conv3d_layers.UNET3D_CLASSES)(models.PretextHead()(features, train=train))


def _unet3d_workload(backbone: nn.Module, side: int, scale: int):
  """Adam step on the cross-entropy of random rotation labels (the data do not change the cost)."""
  key_init, key_data, key_labels, key_dropout = jax.random.split(jax.random.key(0), 4)
  volumes = conv3d_layers.volumes_per_step(scale)
  inputs = (jax.random.uniform(key_data, (volumes, side, side, side, 1)),
            jax.random.randint(key_labels, (volumes,), 0, conv3d_layers.UNET3D_CLASSES))
  model = _Rotation3DModel(backbone)
  variables = model.init(key_init, inputs[0][:2], train=False)
  optimizer = optax.adam(conv3d_layers.UNET3D_LEARNING_RATE)

  def step(state, batch):
    params, batch_stats, opt_state, key = state
    key, dropout_key = jax.random.split(key)

    def loss_fn(params):
      logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, batch[0],
                                    train=True, mutable=['batch_stats'],
                                    rngs={'dropout': dropout_key})
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()
      return loss, updates['batch_stats']

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), new_stats, opt_state, key), loss

  state = (variables['params'], variables['batch_stats'], optimizer.init(variables['params']),
           key_dropout)
  return jax.jit(step, donate_argnums=0), state, inputs


def _unet3d_backbone(fast: bool, filters=None, bottleneck=None) -> nn.Module:
  return models.UNet3DEncoder(tuple(filters or conv3d_layers.UNET3D_FILTERS),
                              bottleneck or conv3d_layers.UNET3D_BOTTLENECK,
                              layers=models.Layers(cpu_fast_path=fast))


def _images_per_step(name: str, scale: int) -> int:
  if name == 'unet3d':
    return conv3d_layers.volumes_per_step(scale)
  return timing.images_per_step(name, scale)


def _workload(name: str, backbone: nn.Module, image_size: int, scale: int):
  """(step function, initial carried state or None, inputs) of one workload."""
  if name == 'unet3d':
    return _unet3d_workload(backbone, image_size, scale)
  key_init, key_data = jax.random.split(jax.random.key(0))
  images = timing.images_per_step(name, scale)
  if name == 'encode':
    inputs = jax.random.uniform(key_data, (images, image_size, image_size, 1))
    variables = backbone.init(key_init, inputs[:2])
    return jax.jit(lambda v, x: backbone.apply(v, x, train=False)), variables, inputs
  if name == 'simclr':
    model = _SimCLRModel(backbone)
    inputs = jax.random.uniform(key_data, (images, image_size, image_size, 1))
  else:
    model = _DeepSetModel(backbone)
    inputs = jax.random.uniform(
        key_data, (images // timing.DSSET_SET_SIZE, timing.DSSET_SET_SIZE, image_size,
                   image_size, 1))
  variables = model.init(key_init, inputs[:2], train=False)
  optimizer = optax.chain(optax.add_decayed_weights(timing.WEIGHT_DECAY),
                          optax.sgd(timing.LEARNING_RATE, momentum=timing.MOMENTUM))
  state = (variables['params'], variables['batch_stats'],
           optimizer.init(variables['params']))
  return jax.jit(_train_step_fn(model, optimizer), donate_argnums=0), state, inputs


def _model_flops(name: str, backbone_name: str, image_size: int, scale: int,
                 unet3d_widths: tuple = (None, None)) -> float:
  if name == 'unet3d':
    plain = _unet3d_backbone(False, *unet3d_widths)
  else:
    plain = models.BACKBONES[backbone_name](layers=models.Layers(cpu_fast_path=False))
  step, state, inputs = _workload(name, plain, image_size, scale)
  return float(step.lower(state, inputs).cost_analysis()['flops'])


def matmul_peak() -> float:
  """Best float32 FLOP/s of a large jitted matmul on the default device."""
  a = jnp.ones((timing.MATMUL_PEAK_SIZE,) * 2, jnp.float32)
  matmul = jax.jit(jnp.dot)
  return timing.best_flop_rate(lambda: matmul(a, a).block_until_ready())


def run(name: str, backbone_name: str = 'resnet18', image_size: int = 64,
        cpu_fast_path: str = 'auto', warmup: int = 3, steps: int = 15, scale: int = 1,
        peak_flops: float | None = None, unet3d_filters=None, unet3d_bottleneck=None) -> dict:
  """Benchmarks one workload and returns its JSON record.

  For unet3d, image_size is the volume's side; unet3d_filters / unet3d_bottleneck override the
  encoder's widths (quick checks only).
  """
  fast = models.resolve_cpu_fast_path(cpu_fast_path)
  widths = (unet3d_filters, unet3d_bottleneck)
  if name == 'unet3d':
    backbone_name = 'unet3d'
    backbone = _unet3d_backbone(fast, *widths)
  else:
    backbone = models.BACKBONES[backbone_name](layers=models.Layers(cpu_fast_path=fast))
  step, state, inputs = _workload(name, backbone, image_size, scale)
  start = time.perf_counter()
  compiled = step.lower(state, inputs).compile()
  compile_s = time.perf_counter() - start
  carried = [state]

  def run_step():
    if name == 'encode':
      jax.block_until_ready(compiled(state, inputs))
    else:
      carried[0], loss = compiled(carried[0], inputs)
      jax.block_until_ready((carried[0], loss))

  step_times = timing.step_seconds(run_step, warmup, steps)
  return timing.record(
      'jax', name, step_times, _images_per_step(name, scale),
      _model_flops(name, backbone_name, image_size, scale, widths),
      peak_flops if peak_flops is not None else matmul_peak(),
      compile_s=round(compile_s, 2), backend=jax.default_backend(),
      device_count=jax.device_count(), jax_version=jax.__version__, backbone=backbone_name,
      image_size=image_size, cpu_fast_path=fast, xla_flags=os.environ.get('XLA_FLAGS', ''))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workload', nargs='+', choices=(*timing.WORKLOADS, 'unet3d'),
                      default=list(timing.WORKLOADS))
  parser.add_argument('--backbone', choices=sorted(models.BACKBONES), default='resnet18')
  parser.add_argument('--image-size', type=int, default=None,
                      help='image side (default 64); for unet3d the volume side (default 32)')
  parser.add_argument('--cpu-fast-path', choices=('auto', 'on', 'off'), default='auto')
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--steps', type=int, default=15)
  args = parser.parse_args(argv)
  peak = matmul_peak()
  for name in args.workload:
    size = args.image_size or (conv3d_layers.UNET3D_SIDE if name == 'unet3d' else 64)
    timing.emit(run(name, args.backbone, size, args.cpu_fast_path, args.warmup,
                    args.steps, peak_flops=peak))


if __name__ == '__main__':
  main()
