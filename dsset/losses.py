"""Contrastive losses as pure functions of embeddings."""

from collections.abc import Sequence

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


def sinkhorn(scores: jax.Array, epsilon: float, iterations: int) -> jax.Array:
  """SwAV's Sinkhorn-Knopp codes of a batch of prototype scores.

  Alternately rescales exp(scores / epsilon) so that every prototype gets an equal share of the
  batch (rows of the K x B transport plan sum to 1/K) and every sample a share of 1/B; the result is
  returned per sample, so each row sums to 1 and each column to about B/K. Written over the whole
  array: under jit with a batch-sharded input the sums span every device, as SwAV's all_reduce does.

  Args:
    scores: prototype scores [B, K] (cosine similarities).
    epsilon: entropic regularisation (SwAV: 0.05).
    iterations: Sinkhorn iterations (SwAV: 3).

  Returns:
    Soft codes [B, K] in float32 (or wider).
  """
  dtype = jnp.promote_types(scores.dtype, jnp.float32)
  logits = scores.astype(dtype) / epsilon
  # exp(20) is fine in float32 but lower temperatures overflow; the global shift cancels out in
  # the first normalisation.
  plan = jnp.exp(logits - jnp.max(logits)).T
  plan = plan / jnp.sum(plan)
  num_prototypes, batch = plan.shape
  for _ in range(iterations):
    plan = plan / jnp.sum(plan, axis=1, keepdims=True) / num_prototypes
    plan = plan / jnp.sum(plan, axis=0, keepdims=True) / batch
  return (plan * batch).T


def swapped_prediction(scores_a: jax.Array, scores_b: jax.Array, codes_a: jax.Array,
                       codes_b: jax.Array, temperature: float,
                       small_scores: Sequence[jax.Array] = ()) -> jax.Array:
  """SwAV's loss: each view's scores predict the other view's codes (cross-entropy of the softmax
  of scores / temperature against the soft codes), averaged over both directions and the batch.

  With multi-crop, the small views have no codes of their own and predict both: each large view's
  codes are predicted by every other view (the other large one and all small ones), the loss is
  the mean over those predicting views, then over the two codes. With no small views that is the
  two directions above.

  Args:
    scores_a, scores_b: prototype scores of the two (large) views [B, K].
    codes_a, codes_b: their codes [B, K] (rows sum to 1; treated as constants).
    temperature: softmax temperature (SwAV: 0.1).
    small_scores: prototype scores [B, K] of each further (small) view.
  """
  views = (scores_a, scores_b, *small_scores)
  dtype = jnp.promote_types(jnp.result_type(*views), jnp.float32)
  log_p = [jax.nn.log_softmax(scores.astype(dtype) / temperature, axis=-1) for scores in views]
  total = 0.0
  for coded, codes in enumerate((codes_a, codes_b)):
    codes = jax.lax.stop_gradient(codes)
    predicting = [log_p_view for view, log_p_view in enumerate(log_p) if view != coded]
    total += sum(-jnp.mean(jnp.sum(codes * log_p_view, axis=-1))
                 for log_p_view in predicting) / len(predicting)
  return total / 2


def cluster_cross_entropy(scores: jax.Array, targets: jax.Array, temperature: float) -> jax.Array:
  """DeepCluster-v2's loss: mean cross-entropy of softmax(scores / temperature) [B, K] against
  integer cluster targets [B]."""
  dtype = jnp.promote_types(scores.dtype, jnp.float32)
  log_p = jax.nn.log_softmax(scores.astype(dtype) / temperature, axis=-1)
  return -jnp.mean(jnp.take_along_axis(log_p, targets[:, None], axis=-1))
