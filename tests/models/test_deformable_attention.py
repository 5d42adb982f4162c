"""1D deformable attention and its transformer block, against plain numpy references.

Parameters are drawn with numpy into the shapes jax.eval_shape gives, so no test compiles an
initialiser; each module is applied through one jit per (module, shape).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsset.models.deformable_attention import (DeformableAttention1D, DeformableTransformerBlock,
                                               linear_interpolate, reference_points)

CHANNELS, HEADS = 16, 2


def random_params(module, *inputs, scale=0.3, seed=0, **kwargs):
  """Variables of `module` for `inputs`, every parameter drawn from N(0, scale^2)."""
  shapes = jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.key(0), *inputs)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, scale, s.shape), s.dtype), shapes)


@functools.partial(jax.jit, static_argnums=0)
def apply_with_positions(module, variables, x):
  out, state = module.apply(variables, x, mutable=['intermediates'])
  return out, state['intermediates']['positions'][0]


def zero_offsets(variables):
  """The offset network's last projection set to zero: tanh(0) = 0, every offset is zero."""
  params = dict(variables['params'])
  params['offset'] = {'kernel': jnp.zeros_like(params['offset']['kernel'])}
  return {'params': params}


def tokens(batch, length, seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, length, CHANNELS)),
                     jnp.float32)


def interp_zero_padded(values, positions):
  """np.interp of each column of values [N, C] at positions [P], zero outside, as grid_sample's
  zero padding: the samples at -1 and N are zeros."""
  n = values.shape[0]
  grid = np.arange(-1, n + 1)
  padded = np.concatenate([np.zeros((1, values.shape[1])), values, np.zeros((1, values.shape[1]))])
  return np.stack([np.interp(positions, grid, padded[:, c], left=0, right=0)
                   for c in range(values.shape[1])], axis=-1)


def reference_attention(params, x, key_source, positions, groups, position_bias=True):
  """Multi-head attention written out per batch element, head and query.

  key_source [B, G, K, C / G]: each group's token features at its K sampling positions
  [B, G, K] (token units); keys and values are projected from them.
  """
  x = np.asarray(x, np.float64)
  batch, length, channels = x.shape
  head_channels = channels // HEADS
  dense = lambda name, h: h @ np.asarray(params[name]['kernel']) + np.asarray(params[name]['bias'])
  q = dense('query', x)
  source = np.asarray(key_source).transpose(0, 2, 1, 3).reshape(batch, -1, channels)
  k, v = dense('key', source), dense('value', source)
  out = np.zeros_like(x)
  for b in range(batch):
    for h in range(HEADS):
      cols = slice(h * head_channels, (h + 1) * head_channels)
      group = h // (HEADS // groups)
      for i in range(length):
        logits = k[b, :, cols] @ q[b, i, cols] / np.sqrt(head_channels)
        if position_bias:  # one table entry per integer displacement, zero beyond the table
          displacement = i - np.asarray(positions[b, group]) + length - 1
          logits += np.interp(displacement, np.arange(-1, 2 * length),
                              np.concatenate([[0], params['position_bias'][h], [0]]))
        weights = np.exp(logits - logits.max())
        out[b, i, cols] = weights / weights.sum() @ v[b, :, cols]
  return dense('out', out)


def group_tokens(x, groups):
  batch, length, channels = x.shape
  return np.asarray(x).reshape(batch, length, groups, channels // groups).transpose(0, 2, 1, 3)


def test_interpolation_at_integer_positions_returns_the_tokens():
  values = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 3)), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(7.0), (2, 7))
  np.testing.assert_array_equal(jax.jit(linear_interpolate)(values, positions), values)


def test_interpolation_matches_numpy_with_zero_padding():
  values = np.random.default_rng(0).normal(size=(5, 3))
  positions = np.array([-1.5, -0.25, 0.0, 0.4, 2.5, 3.999, 4.0, 4.3, 5.2])
  got = jax.jit(linear_interpolate)(jnp.asarray(values, jnp.float32),
                                    jnp.asarray(positions, jnp.float32))
  np.testing.assert_allclose(got, interp_zero_padded(values, positions), rtol=1e-5, atol=1e-6)
  # The gradient with respect to a position is the slope between its two neighbours.
  slope = jax.jit(jax.grad(
      lambda p: linear_interpolate(jnp.asarray(values, jnp.float32), p)[0, 0]))(jnp.array([1.25]))
  np.testing.assert_allclose(slope, [values[2, 0] - values[1, 0]], rtol=1e-5)


def test_reference_points_are_cell_centres():
  np.testing.assert_array_equal(reference_points(8, 4), [1.5, 5.5])
  np.testing.assert_array_equal(reference_points(10, 4), [1.5, 5.5, 8.5])  # last cell: 8, 9
  np.testing.assert_array_equal(reference_points(5, 1), np.arange(5))


@pytest.mark.parametrize('length, groups', [(8, 2), (10, 1)])
def test_zero_offsets_equal_attention_over_the_downsampled_positions(length, groups):
  module = DeformableAttention1D(HEADS, offset_groups=groups, downsample=4, offset_kernel=6)
  x = tokens(2, length)
  variables = zero_offsets(random_params(module, x))
  out, positions = apply_with_positions(module, variables, x)
  centres = reference_points(length, 4)
  np.testing.assert_array_equal(positions, np.broadcast_to(centres, (2, groups, len(centres))))
  # Tokens at the cell centres, written out: 1.5 is the mean of tokens 1 and 2, and so on.
  grouped = group_tokens(x, groups)
  source = np.stack([(grouped[:, :, int(c)] + grouped[:, :, int(np.ceil(c))]) / 2
                     for c in centres], axis=2)
  expected = reference_attention(variables['params'], x, source, positions, groups)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_downsample_one_with_zero_offsets_is_full_attention():
  module = DeformableAttention1D(HEADS, downsample=1, offset_kernel=3)
  x = tokens(2, 8)
  variables = zero_offsets(random_params(module, x))
  out, positions = apply_with_positions(module, variables, x)
  np.testing.assert_array_equal(positions, np.broadcast_to(np.arange(8.0), (2, HEADS, 8)))
  expected = reference_attention(variables['params'], x, group_tokens(x, HEADS), positions, HEADS)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_learned_offsets_sample_keys_where_the_positions_say():
  module = DeformableAttention1D(HEADS, downsample=4, offset_kernel=6, offset_scale=0.5)
  x = tokens(2, 10)
  variables = random_params(module, x)
  out, positions = apply_with_positions(module, variables, x)
  offsets = np.asarray(positions) - reference_points(10, 4)
  assert np.all(np.abs(offsets) <= 0.5 * 4) and np.any(np.abs(offsets) > 0.1)
  grouped = group_tokens(x, HEADS)
  source = np.stack([np.stack([interp_zero_padded(grouped[b, g], np.asarray(positions[b, g]))
                               for g in range(HEADS)]) for b in range(2)])
  expected = reference_attention(variables['params'], x, source, positions, HEADS)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_gradients_reach_the_offset_network():
  module = DeformableAttention1D(HEADS, downsample=4, offset_kernel=6, offset_scale=0.5)
  x = tokens(2, 10)
  variables = random_params(module, x)
  weights = jnp.asarray(np.random.default_rng(2).normal(size=(2, 10, CHANNELS)), jnp.float32)
  loss = lambda v: jnp.sum(apply_with_positions(module, v, x)[0] * weights)
  grads = jax.jit(jax.grad(loss))(variables)['params']
  for name in ('offset_conv', 'offset_norm', 'offset'):
    for leaf in jax.tree.leaves(grads[name]):
      assert np.abs(leaf).max() > 1e-6, name


def test_attention_without_position_bias_has_no_table():
  module = DeformableAttention1D(HEADS, position_bias=False)
  params = jax.eval_shape(module.init, jax.random.key(0), tokens(1, 8))['params']
  assert 'position_bias' not in params
  x = tokens(2, 8)
  variables = zero_offsets(random_params(module, x))
  out, positions = apply_with_positions(module, variables, x)
  grouped = group_tokens(x, HEADS)
  source = np.stack([(grouped[:, :, int(c)] + grouped[:, :, int(c) + 1]) / 2
                     for c in reference_points(8, 4)], axis=2)
  expected = reference_attention(variables['params'], x, source, positions, HEADS,
                                 position_bias=False)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_attention_parameters_and_dtypes():
  module = DeformableAttention1D(HEADS, offset_groups=1, dtype=jnp.bfloat16)
  out, variables = jax.eval_shape(module.init_with_output, jax.random.key(0), tokens(3, 12))
  chex.assert_shape(out, (3, 12, CHANNELS))
  chex.assert_type(out, jnp.bfloat16)
  assert jax.tree.map(jnp.shape, variables['params']) == {
      'query': {'kernel': (16, 16), 'bias': (16,)}, 'key': {'kernel': (16, 16), 'bias': (16,)},
      'value': {'kernel': (16, 16), 'bias': (16,)}, 'out': {'kernel': (16, 16), 'bias': (16,)},
      'offset_conv': {'kernel': (6, 1, 16), 'bias': (16,)},
      'offset_norm': {'scale': (16,), 'bias': (16,)}, 'offset': {'kernel': (16, 1)},
      'position_bias': (HEADS, 23)}
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize('settings, message', [
    (dict(num_heads=3), 'multiple of the number of heads'),
    (dict(num_heads=2, offset_groups=4), 'multiple of offset_groups'),
    (dict(num_heads=2, downsample=4, offset_kernel=3), 'offset_kernel 3 must be at least')])
def test_invalid_settings_are_named(settings, message):
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(DeformableAttention1D(**settings).init, jax.random.key(0), tokens(1, 8))


def layer_norm(x, params):
  x = np.asarray(x, np.float64)
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-5) * np.asarray(params['scale']) + np.asarray(params['bias'])


@pytest.mark.parametrize('pre_ln', [False, True])
def test_block_is_post_or_pre_ln_around_attention_and_gelu_ffn(pre_ln):
  attention = DeformableAttention1D(HEADS, parent=None)
  block = DeformableTransformerBlock(attention, ffn_hidden=24, dropout=0.5, pre_ln=pre_ln)
  x = tokens(2, 8)
  variables = random_params(block, x)
  params = variables['params']
  out = jax.jit(block.apply)(variables, x)  # eval mode: dropout is the identity
  attend = lambda h: np.asarray(
      jax.jit(DeformableAttention1D(HEADS).apply)({'params': params['attention']}, h))

  def ffn(h):
    h = h @ np.asarray(params['ffn_in']['kernel']) + np.asarray(params['ffn_in']['bias'])
    h = np.asarray(jax.nn.gelu(jnp.asarray(h), approximate=False), np.float64)
    return h @ np.asarray(params['ffn_out']['kernel']) + np.asarray(params['ffn_out']['bias'])

  h = np.asarray(x, np.float64)
  if pre_ln:
    h = h + attend(jnp.asarray(layer_norm(h, params['attention_norm']), jnp.float32))
    expected = h + ffn(layer_norm(h, params['ffn_norm']))
  else:
    h = layer_norm(h + attend(x), params['attention_norm'])
    expected = layer_norm(h + ffn(h), params['ffn_norm'])
  chex.assert_type(out, jnp.float32)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_block_dropout_in_train_mode_follows_the_key():
  """(Eval mode is checked against the dropout-free reference above.)"""
  block = DeformableTransformerBlock(DeformableAttention1D(HEADS, parent=None), ffn_hidden=24,
                                     dropout=0.5)
  x = tokens(2, 8)
  variables = random_params(block, x)
  train = jax.jit(lambda key: block.apply(variables, x, train=True, rngs={'dropout': key}))
  np.testing.assert_array_equal(train(jax.random.key(3)), train(jax.random.key(3)))
  assert not np.allclose(train(jax.random.key(3)), train(jax.random.key(4)), atol=1e-3)
