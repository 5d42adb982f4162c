"""Contrastive losses as pure functions of embeddings."""

import jax
import jax.numpy as jnp


def nt_xent(z_a: jax.Array, z_b: jax.Array, temperature: float,
            ids: jax.Array | None = None) -> jax.Array:
  """NT-Xent (SimCLR) loss over the 2N embeddings of two views.

  Every embedding is L2-normalised; row i of the 2N x 2N cosine-similarity matrix (divided by the
  temperature, self-similarity excluded) is a softmax over all other rows. Without `ids` the
  positive of item i is its other view. With `ids`, every other row with the same id is a positive
  and the row's loss is the mean over its positives of -log softmax (SupCon's L_out), which covers
  several sets of one scan in a batch; with all ids distinct both forms agree.

  Args:
    z_a: embeddings of the first views [N, D].
    z_b: embeddings of the second views [N, D].
    temperature: softmax temperature (> 0).
    ids: optional integer [N] (e.g. scan ids); equal ids mark positives.

  Returns:
    The mean loss over the 2N rows, a scalar in float32 (or wider if the inputs are wider).
  """
  # bfloat16 logits lose the differences that the softmax needs: accumulate in at least float32.
  dtype = jnp.promote_types(jnp.result_type(z_a, z_b), jnp.float32)
  z = jnp.concatenate([z_a, z_b]).astype(dtype)
  z = z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=-1, keepdims=True), 1e-24))
  logits = z @ z.T / temperature
  rows = z.shape[0]
  is_self = jnp.eye(rows, dtype=bool)
  logits = jnp.where(is_self, -jnp.inf, logits)
  log_prob = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
  if ids is None:
    index = jnp.arange(rows)
    positives = index[None, :] == (index[:, None] + rows // 2) % rows
  else:
    both = jnp.concatenate([ids, ids])
    positives = (both[:, None] == both[None, :]) & ~is_self
  per_row = -jnp.sum(jnp.where(positives, log_prob, 0.0), axis=-1) / jnp.sum(positives, axis=-1)
  return jnp.mean(per_row)
