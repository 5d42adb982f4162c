"""3D augmentation and the rotations of the rotation pretext task, on the device from PRNG keys.

Volumes are cubes [S, S, S, C] (channels last), so every right-angle rotation keeps their shape and
all of this works under jit and vmap with one key per example. Geometric transforms move an optional
voxel mask with the volume. aug_config is the `augment3d` section of configs/base.py.

The exemplar task (dsset.methods.exemplar3d) has augmentations of its own, after the released code
of Taleb et al. (HealthML/self-supervised-3d-tasks, preprocess_exemplar.py, augment_exemplar_3d):
flips, quarter and free-angle turns per plane, brightness/contrast and zoom, drawn with that code's
probabilities (exemplar_draw) and applied by exemplar_apply. Where it differs from that code:
- one trilinear resampling for all the geometric transforms together (their matrices composed),
  where that code interpolates with cubic splines (scipy.ndimage) after each free turn and zoom;
- the intensity change comes first (there, between the turns and the zoom);
- a zoom keeps the cube's centre (there, a random crop of a zoomed-in volume);
- the planes turn about axes 0, 1, 2 in that order (there 2, 0, 1).
rotate_plane and zoom are the single transforms.
"""

from __future__ import annotations

import math

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


def to_unit_float(volumes: jax.Array) -> jax.Array:
  """uint8 volumes -> float32 in [0, 1]; float volumes as float32 (already in [0, 1] units)."""
  if volumes.dtype == jnp.uint8:
    return volumes.astype(jnp.float32) / 255.0
  return volumes.astype(jnp.float32)


def normalise(volumes: jax.Array) -> jax.Array:
  """uint8 (or [0, 1] float) volumes -> the centred float32 inputs of the 3D encoders."""
  return (to_unit_float(volumes) - INPUT_MEAN) / INPUT_STD


def flip_axes(volume: jax.Array, flips: jax.Array) -> jax.Array:
  """The volume [D, H, W, ...] mirrored along each spatial axis whose flag in flips [3] is set."""
  for axis in range(3):
    volume = jnp.where(flips[axis], jnp.flip(volume, axis), volume)
  return volume


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
  volume = flip_axes(volume, flips)
  if mask is not None:
    mask = flip_axes(mask, flips)
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
  volumes = to_unit_float(volumes)
  if masks is None:
    out, _ = _per_example(rng, lambda k, v: augment_one(k, v, None, aug_config), volumes)
    return out, None
  return _per_example(rng, lambda k, v, m: augment_one(k, v, m, aug_config), volumes, masks)


def _per_example(rng: jax.Array, augment, *batches: jax.Array):
  """augment(key, *examples) over a batch with one key per example, so that an example's draw
  does not depend on the batch size."""
  keys = jax.random.split(rng, batches[0].shape[0])
  return jax.vmap(augment)(keys, *batches)


# Exemplar augmentation -------------------------------------------------------------------------
#
# Geometric transforms are 3x3 matrices acting on voxel coordinates centred on the volume's centre:
# the output voxel p reads the input at matrix @ p (the inverse of the transform). Composing
# transforms multiplies their matrices, so a chain of them costs one resampling and one
# interpolation.


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  # Full float32: a TPU's default matmul passes would round the entries to bfloat16 (0.4 %).
  return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _snap_to_integer(x: jax.Array) -> jax.Array:
  # float32 cos(pi / 2) is -4.4e-8, not 0: snapped, a quarter turn samples whole voxels and moves
  # them exactly as rot90 does, and angle 0 is the identity, instead of a blur of 1e-7.
  return jnp.where(jnp.abs(x - jnp.round(x)) < 1e-6, jnp.round(x), x)


def turn_matrix(angle: jax.Array, axis: int) -> jax.Array:
  """The inverse-map matrix [3, 3] of a turn by `angle` (radians) in the plane of the two spatial
  axes other than `axis`, in the sense of jnp.rot90(v, 1, axes=_PLANES[axis]) for pi / 2."""
  first, second = _PLANES[axis]
  cos, sin = _snap_to_integer(jnp.cos(angle)), _snap_to_integer(jnp.sin(angle))
  # A quarter turn takes the output's `first` coordinate from the input's `second`, and its
  # `second` from minus the input's `first`.
  return (jnp.eye(3).at[first, first].set(cos).at[first, second].set(sin)
          .at[second, first].set(-sin).at[second, second].set(cos))


def zoom_matrix(factors) -> jax.Array:
  """The inverse-map matrix [3, 3] of a zoom by factors (one per spatial axis, or one for all)."""
  return jnp.diag(1.0 / jnp.broadcast_to(jnp.asarray(factors, jnp.float32), (3,)))


def resample_about_centre(volume: jax.Array, matrix: jax.Array) -> jax.Array:
  """Output voxel p of the volume [D, H, W, C] takes the value at c + matrix @ (p - c), c the
  volume's centre, by trilinear interpolation; 0 where that point is outside the volume."""
  shape = volume.shape[:3]
  centre = [(side - 1) / 2.0 for side in shape]
  offsets = [jnp.arange(side, dtype=jnp.float32) - c for side, c in zip(shape, centre)]
  grid = jnp.meshgrid(*offsets, indexing='ij')
  # Multiply-adds, not a matmul, for the same reason as _matmul.
  coordinates = [centre[i] + sum(matrix[i, j] * grid[j] for j in range(3)) for i in range(3)]

  def channel(values):
    return jax.scipy.ndimage.map_coordinates(values, coordinates, order=1, mode='constant',
                                             cval=0.0)
  return jax.vmap(channel, in_axes=-1, out_axes=-1)(volume)


def rotate_plane(volume: jax.Array, angle: jax.Array, axis: int) -> jax.Array:
  """The volume [D, H, W, C] turned by `angle` (radians, any value) about its centre, in the plane
  of the two spatial axes other than `axis`: trilinear, 0 where the turn brings in the outside.
  Angle k * pi / 2 gives exactly jnp.rot90(volume, k, axes=_PLANES[axis]) (on a cube)."""
  return resample_about_centre(volume, turn_matrix(angle, axis))


def zoom(volume: jax.Array, factors) -> jax.Array:
  """The volume [D, H, W, C] scaled about its centre by factors (one per spatial axis, or one for
  all): resampled trilinearly, which is resizing it by the factor and then cropping its centre
  (factor > 1) or zero-padding it (factor < 1) back to its own size. Factor 1 is the identity."""
  return resample_about_centre(volume, zoom_matrix(factors))


def brightness_contrast(volume: jax.Array, delta: jax.Array, factor: jax.Array) -> jax.Array:
  """The volume plus `delta`, then its contrast about its mean scaled by `factor` (the mean over
  all voxels and channels; the released code's _distort_color)."""
  volume = volume + delta
  mean = jnp.mean(volume)
  return factor * (volume - mean) + mean


def exemplar_draw(key: jax.Array, aug: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  """One example's random transform for the exemplar task (exemplar_apply applies it), with the
  probabilities of the released code's augment_exemplar_3d:

    flips [3] bool   each axis mirrored with aug.flip_prob;
    angles [3]       per axis, the turn of its plane (radians): with aug.rotate_prob a turn, of
                     which aug.quarter_turn_prob a random quarter turn (0 to 3 quarters) and the
                     rest a free angle uniform in [0, 2 pi); else 0;
    color bool       with aug.color_prob, a brightness shift `delta` uniform in
                     +-aug.brightness_delta and a contrast factor `contrast` uniform in
                     aug.contrast_range are applied;
    zoom [3]         with aug.zoom_prob a factor per axis uniform in aug.zoom_range; else 1.
  """
  # One draw of uniforms, a row of three per choice: a single threefry call compiles far faster
  # than one per choice.
  flip, turn, quarter_or_free, quarters, free, color, zoomed, factors = jax.random.uniform(
      key, (8, 3))
  angles = jnp.where(quarter_or_free < aug.quarter_turn_prob,
                     jnp.floor(quarters * 4) * (math.pi / 2), free * (2 * math.pi))
  low, high = aug.contrast_range
  zoom_low, zoom_high = aug.zoom_range
  return {
      'flips': flip < aug.flip_prob,
      'angles': jnp.where(turn < aug.rotate_prob, angles, 0.0),
      'color': color[0] < aug.color_prob,
      'delta': (2 * color[1] - 1) * aug.brightness_delta,
      'contrast': low + (high - low) * color[2],
      'zoom': jnp.where(zoomed[0] < aug.zoom_prob, zoom_low + (zoom_high - zoom_low) * factors,
                        1.0),
  }


def exemplar_apply(volume: jax.Array, transform: dict[str, jax.Array]) -> jax.Array:
  """A float volume [S, S, S, C] in [0, 1] units with an exemplar_draw transform applied:
  brightness/contrast, then flips, the turns of the planes about axes 0, 1 and 2 in turn, and the
  zoom, all four composed into one trilinear resampling (0 outside; values not clipped).

  The released code resamples after each free turn and the zoom (up to four interpolations, each
  blurring the cube) and changes the intensities between the turns and the zoom, so that the
  zeros its turns bring in are shifted with the rest; here what comes from outside is 0.
  Untransformed examples cost the same (a resampling with the identity, which is exact).
  """
  volume = jnp.where(transform['color'],
                     brightness_contrast(volume, transform['delta'], transform['contrast']),
                     volume)
  matrix = jnp.diag(jnp.where(transform['flips'], -1.0, 1.0))
  for axis in range(3):
    matrix = _matmul(matrix, turn_matrix(transform['angles'][axis], axis))
  return resample_about_centre(volume, _matmul(matrix, zoom_matrix(transform['zoom'])))


def exemplar_augment(rng: jax.Array, volumes: jax.Array,
                     aug: ml_collections.ConfigDict) -> jax.Array:
  """A batch [B, S, S, S, C] (uint8 or [0, 1] float) -> float32 random views for the exemplar
  task (exemplar_draw, exemplar_apply), one key per example."""
  return _per_example(rng, lambda k, v: exemplar_apply(v, exemplar_draw(k, aug)),
                      to_unit_float(volumes))
