"""Grids of 3D patches for the patch-based proxy tasks (relative patch location, jigsaw), on the
device from PRNG keys; and the jigsaw's fixed set of permutations.

A cube of S voxels per side is split into a grid of n^3 cells of c = S // n voxels per side (the
grid starts at voxel 0; the last S - n * c voxels of each axis belong to no cell). Each cell gives
one patch of p voxels per side, placed at a uniformly random whole-voxel offset inside its cell, a
draw of its own for every patch (Taleb et al.'s "jitter", so that patches do not meet at shared
edges whose continuity would give the answer away). Patches are numbered in row-major order over
(depth, height, width): patch i sits in cell unravel(i, (n, n, n)); the centre patch of an odd grid
is n^3 // 2.

p is a multiple of the 3D encoder's input multiple (2 ** pooled levels): the largest one that leaves
at least `jitter` voxels of room in the cell (patch_size).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class PatchGrid(NamedTuple):
  """Geometry of the patches of one cube: n cells per side of `cell` voxels, patches of `patch`."""

  per_side: int
  cell: int
  patch: int

  @property
  def count(self) -> int:
    return self.per_side ** 3

  @property
  def centre(self) -> int:
    """Index of the middle patch (an odd grid's centre cell)."""
    return self.count // 2


def patch_size(cell: int, jitter: int, multiple: int) -> int:
  """The largest multiple of `multiple` at most cell - jitter (0 when there is none)."""
  return max(cell - jitter, 0) // multiple * multiple


def make_grid(volume_size: int, per_side: int, jitter: int, multiple: int) -> PatchGrid:
  """The grid of a cube of volume_size voxels; ValueError when no patch fits (patch size 0)."""
  cell = volume_size // per_side
  patch = patch_size(cell, jitter, multiple)
  if patch < multiple:
    raise ValueError(f'a {volume_size}^3 cube split {per_side} times per side has cells of {cell} '
                     f'voxels; with {jitter} voxels of jitter no patch whose side is a multiple of '
                     f'{multiple} fits (the 3D encoder needs one)')
  return PatchGrid(per_side, cell, patch)


def grid_starts(key: jax.Array, grid: PatchGrid) -> jax.Array:
  """Start voxel [count, 3] (int32) of every patch of one cube: its cell's corner plus a random
  offset in [0, cell - patch] per axis, drawn independently per patch and axis."""
  cells = jnp.stack(jnp.unravel_index(jnp.arange(grid.count), (grid.per_side,) * 3), axis=-1)
  offsets = jax.random.randint(key, (grid.count, 3), 0, grid.cell - grid.patch + 1)
  return (cells * grid.cell + offsets).astype(jnp.int32)


def cut_patches(volume: jax.Array, starts: jax.Array, patch: int) -> jax.Array:
  """Patches [K, p, p, p, C] of one volume [S, S, S, C] starting at starts [K, 3]."""
  channels = volume.shape[-1]

  def cut(start):
    return jax.lax.dynamic_slice(volume, (*start, 0), (patch, patch, patch, channels))
  return jax.vmap(cut)(starts)


def hamming_to(pool: np.ndarray, permutation: np.ndarray) -> np.ndarray:
  """Number of places where each row of pool [C, L] differs from permutation [L]."""
  return np.count_nonzero(pool != permutation[None, :], axis=1)


def max_hamming_permutations(count: int, length: int, seed: int,
                             candidates: int = 4096) -> np.ndarray:
  """`count` permutations of range(length) [count, length] (int32), far apart in Hamming distance.

  length! is far too many to search (27! for a 3^3 jigsaw), so the set is chosen greedily from
  `candidates` seeded random permutations: the first candidate, then each time the candidate whose
  distance to its nearest chosen permutation is the largest (ties: the lowest index), so the
  smallest distance between any two of the set is pushed up. A pure function of its arguments.
  """
  if not 1 <= count <= candidates:
    raise ValueError(f'count={count} must be in [1, candidates={candidates}]')
  rng = np.random.default_rng(seed)
  pool = np.argsort(rng.random((candidates, length)), axis=1)
  chosen = [0]
  nearest = hamming_to(pool, pool[0])
  for _ in range(count - 1):
    nearest[chosen] = -1  # never chosen twice
    best = int(np.argmax(nearest))
    chosen.append(best)
    nearest = np.minimum(nearest, hamming_to(pool, pool[best]))
  return pool[chosen].astype(np.int32)
