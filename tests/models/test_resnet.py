"""ResNet layout, parameter counts, shapes, dtypes and BatchNorm behaviour.

Full-size networks are checked through jax.eval_shape (no compute); behaviour is checked on a
two-stage, narrow ResNet that runs the same code at a fraction of the compile time.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from dsset import models
from dsset.models import layers
from dsset.models import resnet


def count_params(tree):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def torchvision_count(stage_sizes, expansion, in_channels):
  """Parameters of torchvision's ResNet without fc, counted layer by layer from its definition."""
  conv = lambda k, cin, cout: k * k * cin * cout  # bias-free
  bn = lambda c: 2 * c  # weight and bias
  total = conv(7, in_channels, 64) + bn(64)
  inplanes = 64
  for stage, blocks in enumerate(stage_sizes):
    planes = 64 * 2**stage
    for index in range(blocks):
      if expansion == 1:
        total += conv(3, inplanes, planes) + bn(planes) + conv(3, planes, planes) + bn(planes)
      else:
        total += (conv(1, inplanes, planes) + bn(planes) + conv(3, planes, planes) + bn(planes) +
                  conv(1, planes, planes * 4) + bn(planes * 4))
      if index == 0 and (stage > 0 or inplanes != planes * expansion):
        total += conv(1, inplanes, planes * expansion) + bn(planes * expansion)
      inplanes = planes * expansion
  return total


def abstract_init(net, x_shape, **kwargs):
  return jax.eval_shape(
      lambda: net.init_with_output(jax.random.key(0), jnp.zeros(x_shape), **kwargs))


def tiny(block=resnet.BasicBlock, **kwargs):
  return models.ResNet(stage_sizes=(1, 1), block=block, width_multiplier=0.125, **kwargs)


def train_fn(net, **kwargs):
  return jax.jit(lambda v, x: net.apply(v, x, train=True, mutable=['batch_stats'], **kwargs))


@pytest.fixture(scope='module')
def small():
  """A tiny small-stem net, a batch of 6 grey 16 px images and initialised variables."""
  net = tiny(small_stem=True)
  x = jax.random.uniform(jax.random.key(1), (6, 16, 16, 1))
  return net, x, jax.jit(net.init)(jax.random.key(0), x)


@pytest.mark.parametrize('model, stage_sizes, expansion', [
    (models.ResNet10, (1, 1, 1, 1), 1), (models.ResNet18, (2, 2, 2, 2), 1),
    (models.ResNet50, (3, 4, 6, 3), 4)])
@pytest.mark.parametrize('channels', [1, 3])
def test_parameter_count_matches_torchvision(model, stage_sizes, expansion, channels):
  _, variables = abstract_init(model(), (2, 64, 64, channels))
  assert count_params(variables['params']) == torchvision_count(stage_sizes, expansion, channels)


def test_single_channel_counts_from_issue():
  assert count_params(abstract_init(models.ResNet18(), (1, 64, 64, 1))[1]['params']) == 11_170_240
  assert count_params(abstract_init(models.ResNet50(), (1, 64, 64, 1))[1]['params']) == 23_501_760


@pytest.mark.parametrize('model, base_dim', [(models.ResNet18, 512), (models.ResNet50, 2048)])
@pytest.mark.parametrize('channels', [1, 3])
@pytest.mark.parametrize('small_stem', [True, False])
@pytest.mark.parametrize('width', [1.0, 0.5])
def test_full_size_output_shapes(model, base_dim, channels, small_stem, width):
  net = model(small_stem=small_stem, width_multiplier=width)
  features, _ = abstract_init(net, (4, 32, 32, channels), train=True)
  assert net.num_features == int(base_dim * width)
  chex.assert_shape(features, (4, net.num_features))
  assert features.dtype == jnp.float32


def test_small_stem_keeps_resolution():
  # 3x3/1 stem and no pool: the last stage sees 32 / 8 = 4 px instead of 32 / 32 = 1 px.
  def last_map_size(small_stem):
    _, state = abstract_init(models.ResNet18(small_stem=small_stem), (1, 32, 32, 1),
                             capture_intermediates=True)
    return state['intermediates']['BasicBlock_7']['__call__'][0].shape[1]
  assert last_map_size(True) == 4
  assert last_map_size(False) == 1


# The 1-channel small-stem BasicBlock net is exercised by the `small` fixture's tests below.
@pytest.mark.parametrize('block, channels, small_stem', [
    (resnet.BasicBlock, 3, False), (resnet.Bottleneck, 1, False)])
def test_forward_pass(block, channels, small_stem):
  net = tiny(block, small_stem=small_stem)
  x = jax.random.uniform(jax.random.key(1), (4, 32, 32, channels))
  variables = jax.jit(net.init)(jax.random.key(0), x)
  assert variables['params']['Conv_0']['kernel'].shape[2] == channels
  features, updates = train_fn(net)(variables, x)
  chex.assert_shape(features, (4, net.num_features))
  chex.assert_type(features, jnp.float32)
  chex.assert_tree_all_finite(features)
  assert set(updates) == {'batch_stats'}
  chex.assert_trees_all_equal_shapes(updates['batch_stats'], variables['batch_stats'])


def test_conv_uses_torchvision_kaiming_fan_out():
  conv = layers.Conv(512, (3, 3))
  kernel = conv.init(jax.random.key(0), jnp.zeros((1, 4, 4, 512)))['params']['kernel']
  np.testing.assert_allclose(np.std(kernel), math.sqrt(2.0 / (3 * 3 * 512)), rtol=0.02)
  assert abs(float(np.mean(kernel))) < 1e-3


def test_batch_norm_scales_start_at_one(small):
  _, _, variables = small
  # Including the last BatchNorm of each block: torchvision's default, no zero-init.
  scales = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(variables['params'])
            if path[-1].key == 'scale']
  assert len(scales) == 6  # stem, 2 per block, the projection shortcut
  assert all(bool(jnp.all(scale == 1.0)) for scale in scales)


def test_bfloat16_compute_keeps_float32_params_and_features(small):
  net, x, variables = small
  low = tiny(small_stem=True, layers=models.Layers(jnp.bfloat16))
  low_variables = jax.eval_shape(low.init, jax.random.key(0), x)
  assert {leaf.dtype for leaf in jax.tree.leaves(low_variables)} == {jnp.dtype(jnp.float32)}
  features, _ = train_fn(low)(variables, x)
  chex.assert_type(features, jnp.float32)
  reference, _ = train_fn(net)(variables, x)
  assert float(jnp.linalg.norm(features - reference) / jnp.linalg.norm(reference)) < 0.05


def test_eval_uses_running_averages(small):
  net, x, variables = small
  # In eval mode an image's features do not depend on the rest of the batch.
  evaluate = jax.jit(net.apply)
  np.testing.assert_allclose(evaluate(variables, x)[:1], evaluate(variables, x[:1]), rtol=1e-5,
                             atol=1e-6)
  _, updates = train_fn(net)(variables, x)
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), updates['batch_stats'],
                       variables['batch_stats'])
  assert min(jax.tree.leaves(moved)) > 0


def test_mask_keeps_images_out_of_batch_statistics(small):
  net, x, variables = small
  mask = jnp.array([True, False, True, True, False, True])
  other = x.at[~mask].set(jax.random.uniform(jax.random.key(2), (2, 16, 16, 1)))
  run = train_fn(net, mask=mask)
  (features_a, stats_a), (features_b, stats_b) = run(variables, x), run(variables, other)
  np.testing.assert_allclose(features_a[mask], features_b[mask], rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(stats_a, stats_b, rtol=1e-5, atol=1e-6)
  # The same as a batch of the valid images alone.
  features_valid, stats_valid = train_fn(net)(variables, x[mask])
  np.testing.assert_allclose(features_a[mask], features_valid, rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(stats_a, stats_valid, rtol=1e-4, atol=1e-5)


def test_jit_matches_eager(small):
  net, x, variables = small
  eager = net.apply(variables, x[:2], train=True, mutable=['batch_stats'])
  chex.assert_trees_all_close(train_fn(net)(variables, x[:2]), eager, rtol=1e-5, atol=1e-6)


def test_make_backbone_reads_model_config():
  config = base.get_config().model
  config.backbone, config.width_multiplier, config.small_stem = 'resnet50', 0.25, True
  config.dtype, config.cpu_fast_path = 'bfloat16', 'on'
  net = models.make_backbone(config)
  assert isinstance(net, models.ResNet)
  assert (net.block, net.small_stem, net.width_multiplier) == (resnet.Bottleneck, True, 0.25)
  assert net.layers == models.Layers(jnp.bfloat16, cpu_fast_path=True)
  assert models.feature_dim(config) == 512
  assert set(models.BACKBONES) == {'resnet10', 'resnet18', 'resnet50'}


def test_auto_settings_follow_the_backend():
  on_cpu = jax.default_backend() == 'cpu'
  assert models.resolve_dtype('auto') == (jnp.float32 if on_cpu else jnp.bfloat16)
  assert models.resolve_cpu_fast_path('auto') == on_cpu
  assert models.resolve_dtype('bfloat16') == jnp.bfloat16
  assert not models.resolve_cpu_fast_path('off')


@pytest.mark.parametrize('key, value', [('backbone', 'vgg'), ('dtype', 'float16'),
                                        ('cpu_fast_path', 'yes'), ('width_multiplier', 0.0)])
def test_bad_config_names_the_key(key, value):
  config = base.get_config().model
  config[key] = value
  with pytest.raises(ValueError, match=f'model.{key}'):
    models.make_backbone(config)


@pytest.mark.parametrize('size', [32, 64])
@pytest.mark.parametrize('small_stem, strides',
                         [(False, (2, 4, 8, 16, 32)), (True, (1, 1, 2, 4, 8))])
def test_stage_maps_shapes(size, small_stem, strides):
  net = models.ResNet10(small_stem=small_stem, width_multiplier=0.125)
  maps = jax.eval_shape(lambda: net.init_with_output(
      jax.random.key(0), jnp.zeros((2, size, size, 1)), stages=True))[0]
  widths = (8, 8, 16, 32, 64)
  assert [m.shape for m in maps] == [(2, size // s, size // s, w) for s, w in zip(strides, widths)]


def test_stage_maps_use_the_same_parameters_and_pool_to_the_features(small):
  net, x, variables = small
  maps = net.apply(variables, x, stages=True)  # the pooled model's variables apply unchanged
  np.testing.assert_allclose(maps[-1].mean(axis=(1, 2)), net.apply(variables, x),
                             rtol=1e-5, atol=1e-6)
