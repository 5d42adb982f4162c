"""Slice embedding, the slice transformer, the volume feature and the ResNet's stage pools."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from dsset import models
from dsset.models import resnet
from dsset.models.slice_transformer import SliceEmbedding, SliceTransformer, volume_feature
from tests.models.test_deformable_attention import random_params, zero_offsets


def unit_rows(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_resnet_stage_pools_come_from_the_same_forward_pass():
  net = models.ResNet(stage_sizes=(1, 1), block=resnet.BasicBlock, width_multiplier=0.125,
                      small_stem=True)
  x = jax.random.uniform(jax.random.key(1), (3, 16, 16, 1))
  variables = random_params(net, x, scale=0.5)
  variables['batch_stats'] = jax.tree.map(jnp.abs, variables['batch_stats'])  # variances > 0
  apply = jax.jit(lambda v, x: net.apply(v, x, method=models.ResNet.features_and_stage_pools,
                                         capture_intermediates=True))
  (features, pools), state = apply(variables, x)
  # The method's variables are the module's: its init builds the same tree.
  chex.assert_trees_all_equal_shapes_and_dtypes(
      jax.eval_shape(lambda: net.init(jax.random.key(0), x,
                                      method=models.ResNet.features_and_stage_pools)), variables)
  blocks = state['intermediates']
  stage_outputs = [blocks[f'BasicBlock_{i}']['__call__'][0] for i in range(2)]
  assert [p.shape for p in pools] == [(3, 8), (3, 16)]
  for pool, output in zip(pools, stage_outputs):
    chex.assert_type(pool, jnp.float32)
    np.testing.assert_allclose(pool, np.asarray(output).mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(features, jax.jit(net.apply)(variables, x), rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(features, pools[-1])


def test_slice_embedding_normalises_concatenates_and_projects():
  rng = np.random.default_rng(0)
  features = [jnp.asarray(rng.normal(size=(2, 5, width)), jnp.float32) for width in (4, 8, 8)]
  embed = SliceEmbedding(d_model=16)
  variables = random_params(embed, features)
  tokens = jax.jit(embed.apply)(variables, features)
  params = variables['params']['project']
  joined = np.concatenate([unit_rows(f) for f in features], axis=-1)
  chex.assert_shape(tokens, (2, 5, 16))
  chex.assert_type(tokens, jnp.float32)
  np.testing.assert_allclose(tokens, joined @ np.asarray(params['kernel']) + params['bias'],
                             rtol=1e-5, atol=1e-5)


def test_volume_feature_is_the_unit_mean_token():
  tokens = jnp.asarray(np.random.default_rng(0).normal(size=(3, 7, 16)), jnp.float32)
  np.testing.assert_allclose(volume_feature(tokens), unit_rows(np.asarray(tokens).mean(axis=1)),
                             rtol=1e-5, atol=1e-6)


def test_default_encoder_has_four_post_ln_blocks():
  encoder = SliceTransformer(num_heads=2, ffn_hidden=24)
  out, variables = jax.eval_shape(encoder.init_with_output, jax.random.key(0),
                                  jnp.zeros((2, 12, 16)))
  chex.assert_shape(out, (2, 12, 16))
  chex.assert_type(out, jnp.float32)
  assert sorted(variables['params']) == [f'block_{i}' for i in range(4)]
  assert sorted(variables['params']['block_0']) == [
      'attention', 'attention_norm', 'ffn_in', 'ffn_norm', 'ffn_out']
  pre_ln = SliceTransformer(num_layers=2, num_heads=2, ffn_hidden=24, pre_ln=True,
                            dtype=jnp.bfloat16)
  out, variables = jax.eval_shape(pre_ln.init_with_output, jax.random.key(0),
                                  jnp.zeros((2, 10, 16)))
  chex.assert_type(out, jnp.float32)
  assert sorted(variables['params']) == ['block_0', 'block_1', 'final_norm']


def test_reversing_the_slices_changes_the_volume_feature_only_through_the_position_bias():
  """With zero offsets the keys sit at the cell centres, which reversal maps onto each other, so
  only the relative position bias (asymmetric in the displacement) tells the orders apart."""
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 8, 16)), jnp.float32)
  both_orders = jnp.concatenate([x, x[:, ::-1]])
  for position_bias, reverse_equal in [(True, False), (False, True)]:
    encoder = SliceTransformer(num_layers=1, num_heads=2, ffn_hidden=24,
                               position_bias=position_bias)
    variables = {'params': {
        name: {**block, 'attention': zero_offsets({'params': block['attention']})['params']}
        for name, block in random_params(encoder, both_orders)['params'].items()}}
    forward, backward = volume_feature(jax.jit(encoder.apply)(variables, both_orders))
    assert np.allclose(forward, backward, atol=1e-5) == reverse_equal
