"""The layer factories: variables that checkpoints depend on, and convs of any spatial rank."""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from dsset import models
from dsset.models import layers, unet

# (number of variables, sha256[:16] of the sorted 'path shape dtype' lines), recorded with the
# models as they were before `Layers` existed (dtype and cpu_fast_path threaded through every
# block). Saved checkpoints and exported encoders load only while these stay the same.
VARIABLE_FINGERPRINTS = {
    ('resnet10', False): (60, '0e659abb08152e70'),
    ('resnet10', True): (60, '51343ae0641f412a'),
    ('resnet18', False): (100, '3c528bef7868cecb'),
    ('resnet18', True): (100, '333ea17797028dcf'),
    ('resnet50', False): (265, '0d696c9746a4015a'),
    ('resnet50', True): (265, 'efc984db1fdd5b33'),
    ('segmentation on resnet18', False): (152, '91235229b8dd1b19'),
    ('segmentation on resnet18', True): (142, '6f5404677ec54e0b'),
}


def variable_lines(module, **kwargs):
  variables = jax.eval_shape(
      lambda: module.init(jax.random.key(0), jnp.zeros((2, 32, 32, 1)), **kwargs))
  return sorted('/'.join(key.key for key in path) + f' {leaf.shape} {leaf.dtype}'
                for path, leaf in jax.tree_util.tree_leaves_with_path(variables))


def fingerprint(lines):
  return len(lines), hashlib.sha256('\n'.join(lines).encode()).hexdigest()[:16]


@pytest.mark.parametrize('dtype, cpu_fast_path', [('float32', 'off'), ('bfloat16', 'on')])
@pytest.mark.parametrize('name, small_stem', list(VARIABLE_FINGERPRINTS))
def test_variables_keep_their_names_and_shapes(name, small_stem, dtype, cpu_fast_path):
  config = base.get_config().model
  config.backbone = name.removeprefix('segmentation on ')
  config.width_multiplier = 1.0  # the fingerprints are of the full-width networks
  config.small_stem, config.dtype, config.cpu_fast_path = small_stem, dtype, cpu_fast_path
  model = models.make_backbone(config)
  kwargs = {}
  if name.startswith('segmentation'):
    model, kwargs = unet.SegmentationModel(model, num_classes=3), {'train': False}
  lines = variable_lines(model, **kwargs)
  assert fingerprint(lines) == VARIABLE_FINGERPRINTS[name, small_stem], '\n'.join(lines)


def test_layers_for_model_resolves_the_config():
  config = base.get_config().model
  config.dtype, config.cpu_fast_path = 'bfloat16', 'off'
  assert layers.Layers.for_model(config) == layers.Layers(jnp.bfloat16, cpu_fast_path=False)
  assert hash(layers.Layers.for_model(config)) == hash(layers.Layers(jnp.bfloat16, False))


@pytest.mark.parametrize('cpu_fast_path', [False, True])
def test_three_element_kernel_convolves_volumes(cpu_fast_path):
  # A (1, 3, 3) kernel over a depth-1 volume is the 2D conv with that kernel's only slice.
  x = jax.random.normal(jax.random.key(0), (2, 1, 5, 5, 3))
  conv = layers.Layers(cpu_fast_path=cpu_fast_path).conv(4, (1, 3, 3), (1, 2, 2),
                                                          ((0, 0), (1, 1), (1, 1)))
  variables = conv.init(jax.random.key(1), x)
  assert variables['params']['kernel'].shape == (1, 3, 3, 3, 4)
  volume = conv.apply(variables, x)
  assert volume.shape == (2, 1, 3, 3, 4)
  flat = layers.Conv(4, (3, 3), (2, 2), ((1, 1), (1, 1)), fast=cpu_fast_path)
  image = flat.apply({'params': {'kernel': variables['params']['kernel'][0]}}, x[:, 0])
  np.testing.assert_allclose(volume[:, 0], image, rtol=1e-5, atol=1e-5)
