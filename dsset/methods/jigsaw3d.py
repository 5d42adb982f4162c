"""3D jigsaw puzzles (Taleb et al., NeurIPS 2020; Noroozi & Favaro's task in 3D): which of P fixed
permutations shuffled the 27 patches of a 3^3 grid.

The P permutations (jigsaw3d.num_permutations, 100 in the paper) are chosen once, greedily by
maximal Hamming distance among seeded random candidates (dsset.patches3d.max_hamming_permutations,
seed jigsaw3d.permutation_seed). They live in the method state, so every checkpoint holds them and
a resumed run solves the same puzzles whatever numpy it runs under. Per example a label l is
drawn uniformly; input position i holds grid patch permutations[l][i] (the released code's
convention, HealthML/self-supervised-3d-tasks preprocess_jigsaw.py), each patch with its own jitter.
The shared encoder, pretext head and P-way classifier are dsset.methods.patch_tasks3d's; the online
probe reads the mean of the 27 patches' encoder features (the whole cube, whatever the order). The
encoder is exported for downstream 3D runs (configs/segment3d.py, configs/linear_eval3d.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dsset import patches3d
from dsset.config_validation import ConfigError
from dsset.methods.clustering import non_negative_int, positive_int
from dsset.methods.patch_tasks3d import PatchTask3DMethod, grid_rules

# Seeded random permutations the greedy choice picks from.
PERMUTATION_CANDIDATES = 4096


class Jigsaw3DMethod(PatchTask3DMethod):
  """jigsaw3d: config keys under config.jigsaw3d (configs/jigsaw3d.py)."""

  section = 'jigsaw3d'
  config_rules = {
      **grid_rules(section),
      'jigsaw3d.num_permutations': (positive_int, 'an integer > 0'),
      'jigsaw3d.permutation_seed': (non_negative_int, 'an integer >= 0'),
  }

  @classmethod
  def check_config(cls, config):
    s = config.jigsaw3d
    count = s.patches_per_side ** 3
    most = min(math.factorial(count), PERMUTATION_CANDIDATES)
    if count < 2 or s.num_permutations > most:
      raise ConfigError(f'config keys jigsaw3d.num_permutations={s.num_permutations} and '
                        f'jigsaw3d.patches_per_side={s.patches_per_side} do not fit: a grid needs '
                        f'at least 2 patches per side and at most {most} permutations are drawn '
                        f'from {count} patches')
    super().check_config(config)

  @property
  def tuple_length(self) -> int:
    return self.grid.count

  @property
  def num_classes(self) -> int:
    return int(self.config.jigsaw3d.num_permutations)

  def permutations(self):
    """The puzzle set [P, 27] (int32), as a new run chooses it."""
    s = self.config.jigsaw3d
    return patches3d.max_hamming_permutations(self.num_classes, self.grid.count,
                                              int(s.permutation_seed), PERMUTATION_CANDIDATES)

  def init_method_state(self, variables):
    del variables
    return {'permutations': jnp.asarray(self.permutations())}

  def draw_tuples(self, key, batch_size, method_state):
    labels = jax.random.randint(key, (batch_size,), 0, self.num_classes)
    return method_state['permutations'][labels], labels

  def monitor_features(self, features, indices):
    del indices
    return jnp.mean(features, axis=1)
