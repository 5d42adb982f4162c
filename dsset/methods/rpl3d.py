"""Relative 3D patch location (Taleb et al., NeurIPS 2020; Doersch et al.'s task in 3D): which of
its 26 neighbours a patch is, seen beside the centre patch of a 3^3 grid.

Per example one class c is drawn uniformly from the n^3 - 1 neighbours (26 for n = 3); the tuple
is (centre patch, patch c'), where c' = c below the centre's index and c + 1 from it on (the
released code's numbering, HealthML/self-supervised-3d-tasks preprocess_rpl.py), so class c is the
neighbour's position in row-major order over (depth, height, width) with the centre left out. The
shared encoder, pretext head and (n^3 - 1)-way classifier are dsset.methods.patch_tasks3d's; the
online probe reads the centre patch's encoder features. The encoder is exported for downstream 3D
runs (configs/segment3d.py, configs/linear_eval3d.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsset.config_validation import ConfigError
from dsset.methods.patch_tasks3d import PatchTask3DMethod, grid_rules


def neighbour_index(label: jax.Array, centre: int) -> jax.Array:
  """Grid index of the neighbour of class `label` (the centre's index is skipped)."""
  return label + (label >= centre)


class Rpl3DMethod(PatchTask3DMethod):
  """rpl3d: config keys under config.rpl3d (configs/rpl3d.py)."""

  section = 'rpl3d'
  config_rules = grid_rules(section)

  @classmethod
  def check_config(cls, config):
    per_side = config.rpl3d.patches_per_side
    if per_side < 3 or per_side % 2 == 0:
      raise ConfigError(f'config key rpl3d.patches_per_side={per_side} is invalid: expected an odd '
                        'integer >= 3 (the grid needs a centre patch with neighbours)')
    super().check_config(config)

  @property
  def tuple_length(self) -> int:
    return 2

  @property
  def num_classes(self) -> int:
    return self.grid.count - 1

  def draw_tuples(self, key, batch_size, method_state):
    del method_state
    labels = jax.random.randint(key, (batch_size,), 0, self.num_classes)
    centre = jnp.full((batch_size,), self.grid.centre)
    return jnp.stack([centre, neighbour_index(labels, self.grid.centre)], axis=1), labels

  def monitor_features(self, features, indices):
    del indices  # the centre patch is always first
    return features[:, 0]
