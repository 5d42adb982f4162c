"""Projection and linear heads."""

import chex
import jax
import jax.numpy as jnp

from dsset import models


def test_projection_head_layout_and_modes():
  head = models.ProjectionHead(hidden=32, out=8)
  x = jax.random.normal(jax.random.key(1), (5, 16))
  variables = head.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, variables['params']) == {
      'Dense_0': {'kernel': (16, 32), 'bias': (32,)},
      'BatchNorm_0': {'scale': (32,), 'bias': (32,)},
      'Dense_1': {'kernel': (32, 8), 'bias': (8,)}}
  z, updates = head.apply(variables, x, train=True, mutable=['batch_stats'])
  chex.assert_shape(z, (5, 8))
  chex.assert_type(z, jnp.float32)
  chex.assert_trees_all_equal_shapes(updates['batch_stats'], variables['batch_stats'])
  # Eval mode uses the running statistics, so one row does not depend on the others.
  chex.assert_trees_all_close(head.apply(variables, x)[:1], head.apply(variables, x[:1]),
                              rtol=1e-6)


def test_projection_head_bfloat16_returns_float32():
  head = models.ProjectionHead(hidden=32, out=8, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(1), (5, 16))
  variables = head.init(jax.random.key(0), x)
  chex.assert_type(head.apply(variables, x), jnp.float32)
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


def test_linear_head():
  head = models.LinearHead(num_classes=3)
  x = jax.random.normal(jax.random.key(1), (4, 16), jnp.bfloat16)
  variables = head.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, variables) == {'params': {'Dense_0': {'kernel': (16, 3),
                                                                       'bias': (3,)}}}
  logits = head.apply(variables, x)
  chex.assert_shape(logits, (4, 3))
  chex.assert_type(logits, jnp.float32)
