"""The 3D U-Net encoder/decoder, the pretext head and the CPU fast path of their layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dsset import models
from dsset.models import unet3d

FILTERS = (16, 32, 64, 128)


def _count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _block_params(cin: int, width: int) -> int:
  # Two bias-free 3^3 convs (cin -> width, width -> width), each followed by a BatchNorm's
  # scale and bias.
  return 27 * cin * width + 2 * width + 27 * width * width + 2 * width


def _expected_encoder_params(cin=1, filters=FILTERS, bottleneck=256) -> int:
  total = 0
  for width in (*filters, bottleneck):
    total += _block_params(cin, width)
    cin = width
  return total


def _expected_decoder_params(filters=FILTERS, bottleneck=256, classes=3) -> int:
  total, below = 0, bottleneck
  for width in reversed(filters):
    total += 8 * below * width + width  # 2^3 transposed conv with bias
    total += _block_params(2 * width, width)  # after concatenating the skip
    below = width
  return total + filters[0] * classes + classes  # 1^3 conv with bias


def test_default_encoder_shapes_and_parameter_count():
  encoder = models.UNet3DEncoder()
  volumes = jnp.zeros((2, 32, 32, 32, 1))
  variables = jax.eval_shape(encoder.init, jax.random.key(0), volumes)
  assert _count(variables['params']) == _expected_encoder_params()
  assert encoder.num_features == 256
  features = jax.eval_shape(lambda v: encoder.apply(v, volumes), variables)
  assert features.shape == (2, 256) and features.dtype == jnp.float32
  bottom, skips = jax.eval_shape(lambda v: encoder.apply(v, volumes, skips=True), variables)
  assert bottom.shape == (2, 2, 2, 2, 256)
  assert [s.shape for s in skips] == [(2, 32 // 2**i, 32 // 2**i, 32 // 2**i, w)
                                      for i, w in enumerate(FILTERS)]


def test_default_decoder_and_segmentation_model_shapes():
  model = models.Segmentation3DModel(models.UNet3DEncoder(), num_classes=3)
  volumes = jnp.zeros((1, 16, 32, 16, 1))  # uneven sides: each a multiple of 2^4
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), volumes, train=False))
  params = variables['params']
  assert set(params) == {'backbone', 'decoder'}
  assert _count(params['backbone']) == _expected_encoder_params()
  assert _count(params['decoder']) == _expected_decoder_params()
  logits = jax.eval_shape(lambda v: model.apply(v, volumes, train=False), variables)
  assert logits.shape == (1, 16, 32, 16, 3) and logits.dtype == jnp.float32
  assert unet3d.ENCODER_PATH == ('backbone',) and unet3d.BACKBONE == 'unet3d'


def test_sides_must_be_a_multiple_of_the_pooling():
  encoder = models.UNet3DEncoder(filters=(4, 8), bottleneck=8)
  with pytest.raises(ValueError, match='multiple of 4'):
    encoder.init(jax.random.key(0), jnp.zeros((1, 8, 8, 6, 1)))


def _tiny(fast: bool, dtype=jnp.float32, dropout=0.0):
  return models.UNet3DEncoder((2, 4), 4, dropout, models.Layers(dtype, cpu_fast_path=fast))


def _relative_l2(a, b):
  return float(jnp.linalg.norm((a - b).ravel()) / jnp.maximum(jnp.linalg.norm(b.ravel()), 1e-30))


def test_fast_path_matches_plain_path():
  # Every rewritten layer at once (3^3 convs in both forms, 1^3 conv, transposed conv, BatchNorm,
  # max-pool), values and gradients, in float64 where the rewrites are exact (as
  # tests/models/test_cpu_fast_path.py does for the ResNets).
  with jax.enable_x64(True):
    volumes = jax.random.uniform(jax.random.key(0), (2, 8, 8, 8, 1), jnp.float64)
    plain, fast = (models.Segmentation3DModel(_tiny(flag, jnp.float64), num_classes=2)
                   for flag in (False, True))
    variables = plain.init(jax.random.key(1), volumes, train=False)
    variables = jax.tree.map(lambda v: v.astype(jnp.float64), variables)
    # The two paths create the same variables (names, shapes).
    assert (jax.tree.map(jnp.shape, fast.init(jax.random.key(1), volumes, train=False))
            == jax.tree.map(jnp.shape, variables))
    weights = jax.random.normal(jax.random.key(2), (2, 8, 8, 8, 2), jnp.float64)

    def run(model):
      def loss(params):
        logits, _ = model.apply({**variables, 'params': params}, volumes, train=True,
                                mutable=['batch_stats'])
        return jnp.sum(logits * weights), logits
      return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])

    (_, logits_plain), grads_plain = run(plain)
    (_, logits_fast), grads_fast = run(fast)
    assert _relative_l2(logits_fast, logits_plain) < 1e-6  # logits are returned in float32
    errors = jax.tree.map(_relative_l2, grads_fast, grads_plain)
    assert max(jax.tree.leaves(errors)) < 1e-9, errors


def test_fast_path_replaces_every_3d_convolution():
  volumes = jnp.zeros((1, 8, 8, 8, 1))

  def lowered(fast):
    model = models.Segmentation3DModel(_tiny(fast), num_classes=2)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), volumes, train=False))
    return jax.jit(lambda v: model.apply(v, volumes, train=False)).lower(variables).as_text()

  # Only 2D convolutions remain (the depth-stacked form); no NDHWC convolution is left to XLA.
  three_d = '[b, 0, 1, 2, f]'
  assert three_d in lowered(False)
  fast = lowered(True)
  assert 'stablehlo.convolution' in fast and three_d not in fast


def test_frozen_encoder_gets_no_gradient_and_keeps_its_statistics():
  model = models.Segmentation3DModel(_tiny(False), num_classes=2)
  volumes = jax.random.uniform(jax.random.key(0), (2, 8, 8, 8, 1))
  variables = jax.jit(lambda: model.init(jax.random.key(1), volumes, train=False))()

  def loss(params):
    logits, updates = model.apply({**variables, 'params': params}, volumes, train=True,
                                  train_encoder=False, mutable=['batch_stats'])
    return jnp.sum(logits ** 2), updates

  grads, updates = jax.jit(jax.grad(loss, has_aux=True))(variables['params'])
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads['backbone']))
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads['decoder']))
  # Eval-mode encoder: its running statistics are not updated; the decoder's are.
  chex_equal = jax.tree.map(lambda a, b: bool(jnp.all(a == b)),
                            updates['batch_stats']['backbone'],
                            variables['batch_stats']['backbone'])
  assert all(jax.tree.leaves(chex_equal))


def test_dropout_is_active_only_in_train_mode():
  encoder = _tiny(False, dropout=0.5)
  volumes = jax.random.uniform(jax.random.key(0), (2, 8, 8, 8, 1))
  variables = jax.jit(lambda: encoder.init(jax.random.key(1), volumes))()
  evaluate = jax.jit(lambda: encoder.apply(variables, volumes))  # eval: no rng needed
  eval_a, eval_b = evaluate(), evaluate()
  assert eval_a.shape == (2, 4)
  np.testing.assert_array_equal(eval_a, eval_b)
  train = jax.jit(lambda key: encoder.apply(variables, volumes, train=True, mutable=['batch_stats'],
                                            rngs={'dropout': jax.random.key(key)})[0])
  assert not np.allclose(train(0), train(1))
  with pytest.raises(Exception, match='dropout'):
    jax.eval_shape(lambda: encoder.apply(variables, volumes, train=True, mutable=['batch_stats']))


def test_pretext_head_order_and_dropout():
  head = models.PretextHead(hidden=(8, 4))
  x = jax.random.normal(jax.random.key(0), (6, 5))
  variables = head.init(jax.random.key(1), x)
  params = variables['params']
  assert [params[f'Dense_{i}']['kernel'].shape for i in range(2)] == [(5, 8), (8, 4)]
  assert set(params) == {'Dense_0', 'BatchNorm_0', 'Dense_1', 'BatchNorm_1'}
  # Eval mode: Dense - ReLU - BatchNorm (running statistics 0/1) and no dropout.
  y = head.apply(variables, x)
  manual = x
  for i in range(2):
    manual = jax.nn.relu(manual @ params[f'Dense_{i}']['kernel'] + params[f'Dense_{i}']['bias'])
    manual = manual / jnp.sqrt(1 + 1e-5)
  np.testing.assert_allclose(y, manual, rtol=1e-5, atol=1e-6)
  out, _ = head.apply(variables, x, train=True, mutable=['batch_stats'],
                      rngs={'dropout': jax.random.key(2)})
  assert out.shape == (6, 4) and float(jnp.mean(out == 0)) > 0.25  # half the units dropped


def _model_config(**unet):
  options = dict(filters=(4, 8), bottleneck=16, dropout=0.0) | unet
  return ml_collections.ConfigDict(
      dict(backbone='unet3d', dtype='float32', cpu_fast_path='off', unet3d=options))


def test_make_unet3d_reads_the_config():
  encoder = models.make_unet3d(_model_config(dropout=0.1))
  assert encoder.filters == (4, 8) and encoder.bottleneck == 16 and encoder.dropout == 0.1
  assert encoder.layers == models.Layers(jnp.float32, cpu_fast_path=False)


@pytest.mark.parametrize('key,value', [
    ('filters', ()), ('filters', (4, 0)), ('filters', 'abc'), ('bottleneck', 0),
    ('bottleneck', 2.5), ('dropout', 1.0), ('dropout', -0.1)])
def test_make_unet3d_names_the_bad_key(key, value):
  with pytest.raises(ValueError, match=f'model.unet3d.{key}'):
    models.make_unet3d(_model_config(**{key: value}))


def test_layers_conv_transpose_shares_flax_variables():
  # Same auto-name, parameter names and computation as nn.ConvTranspose, on both paths.
  x = jax.random.normal(jax.random.key(0), (1, 2, 3, 2, 4))

  class Up(nn.Module):
    layers: models.Layers

    @nn.compact
    def __call__(self, x):
      return self.layers.conv_transpose(5, (2, 2, 2))(x)

  reference = nn.ConvTranspose(5, (2, 2, 2), (2, 2, 2))
  ref_vars = reference.init(jax.random.key(1), x)
  bias = {'kernel': ref_vars['params']['kernel'], 'bias': jnp.arange(5.0)}
  for fast in (False, True):
    up = Up(models.Layers(cpu_fast_path=fast))
    assert set(up.init(jax.random.key(1), x)['params']) == {'ConvTranspose_0'}
    y = up.apply({'params': {'ConvTranspose_0': bias}}, x)
    np.testing.assert_allclose(y, reference.apply({'params': bias}, x), rtol=1e-5, atol=1e-5)
