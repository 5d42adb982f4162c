"""The per-layer 3D benchmark covers exactly the 3D U-Net encoder's convolutions."""

import jax
import numpy as np

from benchmarks import conv3d_layers
from dsset import models


def test_conv_shapes_are_the_encoders():
  encoder = models.UNet3DEncoder()
  variables = jax.eval_shape(encoder.init, jax.random.key(0), np.zeros((1, 32, 32, 32, 1)))
  kernels = {tuple(leaf.shape) for leaf in jax.tree.leaves(variables['params'])
             if len(leaf.shape) == 5}
  layers = conv3d_layers.unet3d_layers(32)
  assert {(3, 3, 3, s['cin'], s['cout']) for s in layers if s['kind'] == 'conv'} == kernels
  sizes = {s['name']: s['size'] for s in layers}
  assert sizes['level1.conv1'] == 32 and sizes['bottleneck.conv2'] == 2


def test_measure_reports_all_three_paths():
  shape = dict(kind='conv', name='c', size=4, cin=2, cout=3, input_grad=True)
  result = conv3d_layers.measure(shape, batch=1, warmup=0, steps=1, with_torch=False)
  assert result['jax_plain_ms'] > 0 and result['jax_fast_ms'] > 0 and 'torch_ms' not in result
  assert result['gflop'] == round(3 * 2 * 64 * 2 * 3 * 27 / 1e9, 3)
