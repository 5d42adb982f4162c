"""The per-layer convolution benchmark covers exactly ResNet-18's convolutions and reports timings."""

import jax
import numpy as np
import pytest

from benchmarks import conv_layers
from dsset import models


@pytest.mark.parametrize('image_size', [32, 64])
def test_shapes_are_the_convolutions_of_resnet18(image_size):
  encoder = models.BACKBONES['resnet18']()
  images = np.zeros((1, image_size, image_size, 1), np.float32)
  variables = jax.eval_shape(encoder.init, jax.random.key(0), images)
  kernels = {tuple(leaf.shape) for leaf in jax.tree.leaves(variables['params'])
             if len(leaf.shape) == 4}
  listed = {(s['kernel'], s['kernel'], s['cin'], s['cout'])
            for s in conv_layers.resnet18_convs(image_size)}
  assert listed == kernels
  # Each input map is the previous stage's output: the stem halves the image, the max-pool halves
  # it again, and every stride-2 stage halves it once more.
  maps = {s['name']: s['size'] for s in conv_layers.resnet18_convs(image_size)}
  assert maps['stem'] == image_size and maps['layer1.3x3'] == image_size // 4
  assert maps['layer4.3x3'] == image_size // 32


def test_flops_count_forward_and_backward():
  shape = dict(name='c', size=8, cin=4, cout=6, kernel=3, stride=2, input_grad=True)
  forward = 2 * 2 * 4 * 4 * 4 * 6 * 9  # batch 2, 4x4 output map
  assert conv_layers._flops(shape, 2) == 3 * forward
  assert conv_layers._flops(dict(shape, input_grad=False), 2) == 2 * forward


def test_measure_reports_timings():
  shape = conv_layers.resnet18_convs(32)[1]
  result = conv_layers.measure(shape, batch=2, warmup=1, steps=1, with_torch=False)
  assert result['jax_ms'] > 0 and result['jax_gflop_per_s'] > 0
  assert result['name'] == 'layer1.3x3' and 'torch_ms' not in result
