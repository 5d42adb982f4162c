"""3D augmentation and the rotations of the rotation pretext task, on the device from PRNG keys.

Volumes are cubes [S, S, S, C] (channels last), so every right-angle rotation keeps their shape and
all of this works under jit and vmap with one key per example. Geometric transforms move an optional
voxel mask with the volume. aug_config is the `augment3d` section of configs/base.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

# Spatial axes of one volume [D, H, W, C]; a rotation about one axis turns the plane of the other two.
_PLANES = {0: (1, 2), 1: (2, 0), 2: (0, 1)}

# The 10 classes of the rotation task (Taleb et al.): the identity, then 90, 180 and 270 degrees about
# the depth, height and width axes in turn: (axis, quarter turns) per class, axis None = identity.
ROTATIONS: tuple[tuple[int | None, int], ...] = ((None, 0),) + tuple(
    (axis, turns) for axis in range(3) for turns in (1, 2, 3))
NUM_ROTATIONS = len(ROTATIONS)

# uint8 voxels are scaled to [0, 1], then centred as the 2D path does (dsset.methods.contrastive).
INPUT_MEAN = 0.5
INPUT_STD = 0.25


def rotate(volume: jax.Array, rotation: jax.Array) -> jax.Array:
  """The volume [S, S, S, ...] turned by ROTATIONS[rotation] (a traced index: one branch runs)."""
  def branch(axis, turns):
    if axis is None:
      return lambda v: v
    return lambda v: jnp.rot90(v, turns, axes=_PLANES[axis])
  return jax.lax.switch(rotation, [branch(axis, turns) for axis, turns in ROTATIONS], volume)


def normalise(volumes: jax.Array) -> jax.Array:
  """uint8 (or [0, 1] float) volumes -> the centred float32 inputs of the 3D encoders."""
  if volumes.dtype == jnp.uint8:
    volumes = volumes.astype(jnp.float32) / 255.0
  return (volumes.astype(jnp.float32) - INPUT_MEAN) / INPUT_STD


def _quarter_turns(volume: jax.Array, turns: jax.Array, plane: tuple[int, int]) -> jax.Array:
  return jax.lax.switch(turns, [lambda v, k=k: jnp.rot90(v, k, axes=plane) for k in range(4)],
                        volume)


def augment_one(key: jax.Array, volume: jax.Array, mask: jax.Array | None,
                aug_config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array | None]:
  """One float volume [S, S, S, C] in [0, 1] (and its mask [S, S, S]): random flips per axis,
  right-angle turns in each plane (uniform over the 24 orientations of a cube when enabled), then
  intensity scale and shift (volume only)."""
  flip_key, turn_key, scale_key, shift_key = jax.random.split(key, 4)
  flips = jax.random.bernoulli(flip_key, float(aug_config.flip_prob), (3,))
  for axis in range(3):
    volume = jnp.where(flips[axis], jnp.flip(volume, axis), volume)
    if mask is not None:
      mask = jnp.where(flips[axis], jnp.flip(mask, axis), mask)
  if aug_config.rotate90:
    turns = jax.random.randint(turn_key, (3,), 0, 4)
    for axis in range(3):
      volume = _quarter_turns(volume, turns[axis], _PLANES[axis])
      if mask is not None:
        mask = _quarter_turns(mask, turns[axis], _PLANES[axis])
  low, high = aug_config.intensity_scale
  scale = jax.random.uniform(scale_key, (), minval=low, maxval=high)
  low, high = aug_config.intensity_shift
  shift = jax.random.uniform(shift_key, (), minval=low, maxval=high)
  return volume * scale + shift, mask


def augment_volumes(rng: jax.Array, volumes: jax.Array, aug_config: ml_collections.ConfigDict,
                    masks: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
  """A batch [B, S, S, S, C] (uint8 or [0, 1] float) -> augmented float32 volumes in [0, 1] units
  (not clipped after the intensity change), with the masks [B, S, S, S] moved alike; one key per
  example, so an example's draw does not depend on the batch size."""
  if volumes.dtype == jnp.uint8:
    volumes = volumes.astype(jnp.float32) / 255.0
  keys = jax.random.split(rng, volumes.shape[0])
  if masks is None:
    out, _ = jax.vmap(lambda k, v: augment_one(k, v, None, aug_config))(keys, volumes)
    return out, None
  return jax.vmap(lambda k, v, m: augment_one(k, v, m, aug_config))(keys, volumes, masks)
