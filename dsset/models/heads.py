"""Heads put on top of encoder features: the SimCLR projection head and a linear classifier."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class ProjectionHead(nn.Module):
  """SimCLR's g: Dense(hidden) - BatchNorm - ReLU - Dense(out); returns float32 [N, out]."""
  hidden: int
  out: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = nn.Dense(self.hidden, dtype=self.dtype)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                     dtype=self.dtype)(x)
    return nn.Dense(self.out, dtype=self.dtype)(nn.relu(x)).astype(jnp.float32)


class LinearHead(nn.Module):
  """Linear classifier: features [N, D] -> float32 logits [N, num_classes]."""
  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Dense(self.num_classes)(x.astype(jnp.float32))
