"""nt_xent against a plain double-loop reference."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util

from dsset import losses


def reference_nt_xent(z_a, z_b, temperature, ids=None):
  """NT-Xent / SupCon written out row by row in float64 Python."""
  z = np.concatenate([z_a, z_b]).astype(np.float64)
  z = z / np.linalg.norm(z, axis=1, keepdims=True)
  rows, n = len(z), len(z_a)
  row_ids = None if ids is None else list(ids) + list(ids)
  total = 0.0
  for i in range(rows):
    others = [j for j in range(rows) if j != i]
    log_denominator = math.log(sum(math.exp(z[i] @ z[j] / temperature) for j in others))
    if row_ids is None:
      positives = [(i + n) % rows]
    else:
      positives = [j for j in others if row_ids[j] == row_ids[i]]
    total += sum(log_denominator - z[i] @ z[j] / temperature for j in positives) / len(positives)
  return total / rows


def _embeddings(seed, n, dim):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, dim)).astype(np.float32),
          rng.normal(size=(n, dim)).astype(np.float32))


def _ids(pattern, n, seed):
  if pattern == 'none':
    return None
  if pattern == 'distinct':
    return np.random.default_rng(seed).permutation(n).astype(np.int32)
  if pattern == 'same':
    return np.zeros(n, np.int32)
  return np.random.default_rng(seed).integers(0, max(1, n // 2), size=n).astype(np.int32)


@pytest.mark.parametrize('n, dim', [(1, 3), (2, 8), (5, 16), (8, 4), (16, 32)])
@pytest.mark.parametrize('temperature', [0.05, 0.1, 0.5, 1.0])
@pytest.mark.parametrize('pattern', ['none', 'distinct', 'same', 'repeats'])
def test_matches_loop_reference(n, dim, temperature, pattern):
  seed = n * 1000 + dim
  z_a, z_b = _embeddings(seed, n, dim)
  ids = _ids(pattern, n, seed)
  got = losses.nt_xent(z_a, z_b, temperature, None if ids is None else jnp.asarray(ids))
  chex.assert_shape(got, ())
  np.testing.assert_allclose(got, reference_nt_xent(z_a, z_b, temperature, ids), rtol=2e-5,
                             atol=2e-5)


def test_distinct_ids_equal_plain_nt_xent():
  z_a, z_b = _embeddings(0, 12, 16)
  plain = losses.nt_xent(z_a, z_b, 0.2)
  with_ids = losses.nt_xent(z_a, z_b, 0.2, jnp.arange(12) * 7)
  np.testing.assert_allclose(plain, with_ids, rtol=1e-6)


def test_scale_invariant_and_jittable():
  z_a, z_b = _embeddings(1, 6, 8)
  loss = jax.jit(losses.nt_xent, static_argnums=2)
  np.testing.assert_allclose(loss(z_a, z_b, 0.1), loss(3.0 * z_a, 0.5 * z_b, 0.1), rtol=1e-5)


def test_bfloat16_inputs_accumulate_in_float32():
  z_a, z_b = _embeddings(2, 32, 64)
  low = losses.nt_xent(jnp.asarray(z_a, jnp.bfloat16), jnp.asarray(z_b, jnp.bfloat16), 0.1)
  assert low.dtype == jnp.float32
  # Only the bfloat16 rounding of the inputs separates the two.
  rounded = [np.asarray(jnp.asarray(z, jnp.bfloat16), np.float32) for z in (z_a, z_b)]
  np.testing.assert_allclose(low, reference_nt_xent(*rounded, 0.1), rtol=1e-5)


@pytest.mark.parametrize('pattern', ['none', 'repeats'])
def test_gradients(pattern):
  z_a, z_b = _embeddings(3, 6, 5)
  ids = _ids(pattern, 6, 3)
  with jax.enable_x64(True):
    ids = None if ids is None else jnp.asarray(ids)
    loss = lambda a, b: losses.nt_xent(a, b, 0.3, ids)
    test_util.check_grads(loss, (z_a.astype(np.float64), z_b.astype(np.float64)), order=2,
                          modes=['rev'])
