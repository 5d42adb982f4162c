"""Heads put on top of encoder features: the SimCLR projection head, a linear classifier and the
3D proxy tasks' pretext head."""

from typing import Any, Sequence

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


class PretextHead(nn.Module):
  """The pretext head of Taleb et al.'s 3D proxy tasks: [Dense - ReLU - BatchNorm - Dropout] per
  hidden width (2048, 1024); returns float32 [N, hidden[-1]] (the task's classifier goes on top).

  Order as in the released code (HealthML/self-supervised-3d-tasks,
  self_supervised_3d_tasks/models/fully_connected.py, `fully_connected_big`, the default
  `top_architecture='big_fully'`): `Dense(2048, activation='relu')`, `BatchNormalization()`,
  `Dropout(0.5)`, `Dense(1024, activation='relu')`, `BatchNormalization()`, `Dropout(0.5)`. So the
  paper's "Dense 2048 - BN - Dropout" has a ReLU inside each Dense, before the BatchNorm. Two
  deliberate differences: BatchNorm uses this project's torch-like settings (momentum 0.9 in Flax
  terms, epsilon 1e-5) rather than Keras' defaults (0.99, 1e-3); and the released rotation model
  flattens the encoder's bottleneck map into the head, where dsset feeds it the globally averaged
  features (UNet3DEncoder's default output), which keep the head's size independent of the input.

  Dropout needs rngs={'dropout': key} in train mode.
  """
  hidden: Sequence[int] = (2048, 1024)
  dropout: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for width in self.hidden:
      x = nn.relu(nn.Dense(width, dtype=self.dtype)(x))
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                       dtype=self.dtype)(x)
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return x.astype(jnp.float32)
