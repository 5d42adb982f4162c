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

The two views of intra-inter clustering (intra_inter_views) apply the released code's TorchIO
transforms (flip, affine, anisotropy, noise, blur, bias field, gamma) to volumes of any shape
[D, H, W, C]; their section below says where they follow TorchIO and where not.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

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
  # `second` from minus the input's `first`. Built from static patterns, not scatters (which
  # compile several times slower under vmap): each entry has one nonzero term, so the values are
  # the same.
  plane = np.zeros((3, 3), np.float32)
  plane[first, first] = plane[second, second] = 1.0
  skew = np.zeros((3, 3), np.float32)
  skew[first, second], skew[second, first] = 1.0, -1.0
  return (np.eye(3, dtype=np.float32) - plane) + cos * plane + sin * skew


def zoom_matrix(factors) -> jax.Array:
  """The inverse-map matrix [3, 3] of a zoom by factors (one per spatial axis, or one for all)."""
  return jnp.diag(1.0 / jnp.broadcast_to(jnp.asarray(factors, jnp.float32), (3,)))


def resample_about_centre(volume: jax.Array, matrix: jax.Array,
                          translation: jax.Array | None = None) -> jax.Array:
  """Output voxel p of the volume [D, H, W, C] takes the value at c + matrix @ (p - c - t), c the
  volume's centre and t the translation [3] in voxels (none by default), by trilinear
  interpolation; 0 where that point is outside the volume."""
  shape = volume.shape[:3]
  centre = [(side - 1) / 2.0 for side in shape]
  offsets = [jnp.arange(side, dtype=jnp.float32) - c for side, c in zip(shape, centre)]
  if translation is not None:
    offsets = [offset - translation[i] for i, offset in enumerate(offsets)]
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


# Intra-inter augmentation ----------------------------------------------------------------------
#
# The two views of a volume whose features the 3D clustering of Nguyen et al. (AAAI 2023) makes
# agree. Their released code (ssl_swav_3D.py, utils/dataset.py) gives each view ONE of seven
# TorchIO transforms at TorchIO's defaults, the two views two different ones:
# RandomFlip, RandomAffine, RandomAnisotropy, RandomNoise, RandomBlur, RandomBiasField,
# RandomGamma. Here each is a function of a key and one volume [D, H, W, C] (any D, H, W: the
# slice stacks of that method are not cubes), with TorchIO's semantics in voxels (the released
# code hands TorchIO bare tensors, whose spacing is 1 mm). `aug` is the ConfigDict of
# default_intra_inter_augment3d().

# scipy.ndimage.gaussian_filter's default kernel half-width in standard deviations (TorchIO blurs
# with it).
_BLUR_TRUNCATE = 4.0


def default_intra_inter_augment3d() -> ml_collections.ConfigDict:
  """The augmentation section of intra-inter clustering, every range a (low, high) pair drawn
  uniformly (the same range for each spatial axis):

    transforms          names of the transforms a view may get, applied in this order
                        (the released code's list and order);
    num_transforms      how many of them each view gets, drawn without replacement (released: 1);
    distinct_views      the two views of a volume never share a transform (released: True; needs
                        2 * num_transforms <= len(transforms));
    flip_axes, flip_prob         each of these axes mirrored with flip_prob (TorchIO RandomFlip:
                                 axis 0, the slice axis, 0.5);
    affine_scales                per-axis zoom factor (TorchIO RandomAffine scales=0.1);
    affine_degrees               turn about each axis in degrees (degrees=10);
    affine_translation           shift along each axis in voxels (translation=0);
    anisotropy_axes              the axis to make coarse is one of these (TorchIO
                                 RandomAnisotropy: 0, 1, 2);
    anisotropy_factor            its downsampling factor, >= 1 (downsampling=(1.5, 5));
    noise_std                    standard deviation of zero-mean Gaussian noise (TorchIO
                                 RandomNoise std=(0, 0.25), mean=0);
    blur_sigma                   Gaussian blur standard deviation per axis in voxels (TorchIO
                                 RandomBlur std=(0, 2));
    bias_order, bias_coefficients  order of the bias field polynomial and the range of its
                                 coefficients (TorchIO RandomBiasField order=3,
                                 coefficients=0.5);
    log_gamma                    the exponent is exp(log_gamma) (TorchIO RandomGamma (-0.3, 0.3)).
  """
  return ml_collections.ConfigDict({
      'transforms': ('flip', 'affine', 'anisotropy', 'noise', 'blur', 'bias_field', 'gamma'),
      'num_transforms': 1,
      'distinct_views': True,
      'flip_axes': (0,),
      'flip_prob': 0.5,
      'affine_scales': (0.9, 1.1),
      'affine_degrees': (-10.0, 10.0),
      'affine_translation': (0.0, 0.0),
      'anisotropy_axes': (0, 1, 2),
      'anisotropy_factor': (1.5, 5.0),
      'noise_std': (0.0, 0.25),
      'blur_sigma': (0.0, 2.0),
      'bias_order': 3,
      'bias_coefficients': (-0.5, 0.5),
      'log_gamma': (-0.3, 0.3),
  })


def _uniform(key: jax.Array, bounds, shape=()) -> jax.Array:
  low, high = bounds
  return _flat(jax.random.uniform, key, shape, minval=low, maxval=high)


def _flat(sample, key: jax.Array, shape, **kwargs) -> jax.Array:
  # Drawn flat and reshaped: the same numbers, but XLA:CPU compiles threefry over a
  # multidimensional shape up to 10 times slower (a [4, 4, 4] draw: 1 s, flat: 0.1 s).
  return sample(key, (math.prod(shape),), **kwargs).reshape(shape)


def random_flip(key: jax.Array, volume: jax.Array, aug: ml_collections.ConfigDict) -> jax.Array:
  """The volume mirrored along each axis of aug.flip_axes with aug.flip_prob."""
  allowed = jnp.asarray([axis in tuple(aug.flip_axes) for axis in range(3)])
  return flip_axes(volume, jax.random.bernoulli(key, float(aug.flip_prob), (3,)) & allowed)


def affine(volume: jax.Array, scales: jax.Array, degrees: jax.Array,
           translation: jax.Array) -> jax.Array:
  """The volume [D, H, W, C] zoomed by scales [3] about its centre (1.5: the content looks 1.5
  times larger, as TorchIO's scales), turned by degrees [3] about axes 0, 1 and 2 in turn, then
  shifted by translation [3] voxels: one trilinear resampling, the outside filled with the
  volume's minimum (TorchIO's default pad value)."""
  matrix = zoom_matrix(scales)
  for axis in range(3):
    matrix = _matmul(matrix, turn_matrix(jnp.deg2rad(degrees[axis]), axis))
  # Resampling volume - minimum fills the outside with 0, i.e. the minimum once it is added back
  # (map_coordinates takes its fill value only as a static constant).
  low = jnp.min(volume)
  return resample_about_centre(volume - low, matrix, translation) + low


def random_affine(key: jax.Array, volume: jax.Array, aug: ml_collections.ConfigDict) -> jax.Array:
  """affine with per-axis scales, degrees and translation drawn from aug.affine_*."""
  low, high = np.asarray([aug.affine_scales, aug.affine_degrees, aug.affine_translation],
                         np.float32).T
  # One draw for all nine: each threefry call costs compile time.
  scales, degrees, translation = (low[:, None] + (high - low)[:, None]
                                  * _flat(jax.random.uniform, key, (3, 3)))
  return affine(volume, scales, degrees, translation)


def anisotropy(volume: jax.Array, factor: jax.Array, axis: int) -> jax.Array:
  """The volume as if scanned `factor` (>= 1) times coarser along `axis` and resampled back, as
  TorchIO's RandomAnisotropy: floor(n / factor) samples `factor` voxels apart, centred on the
  axis, each the nearest voxel (halves rounded up); then back at every voxel by linear
  interpolation between the two samples about it. Unlike TorchIO, voxels beyond the outermost
  samples take their value (TorchIO puts 0 where they lie more than half a sample beyond)."""
  size = volume.shape[axis]
  centre = (size - 1) / 2.0
  num_samples = jnp.maximum(jnp.floor(size / factor), 1.0)
  middle = (num_samples - 1) / 2.0

  def sampled_voxel(sample):
    return jnp.floor(centre + (sample - middle) * factor + 0.5).astype(jnp.int32)

  # Each voxel's position in units of samples, held to the samples' span.
  position = jnp.clip((jnp.arange(size) - centre) / factor + middle, 0.0, num_samples - 1)
  lower = jnp.floor(position)
  upper = jnp.minimum(lower + 1, num_samples - 1)
  below = jnp.take(volume, sampled_voxel(lower), axis=axis)
  above = jnp.take(volume, sampled_voxel(upper), axis=axis)
  weight = (position - lower).reshape([size if a == axis else 1 for a in range(volume.ndim)])
  # below + w (above - below), not (1 - w) below + w above: equal samples give themselves exactly.
  return below + weight * (above - below)


def random_anisotropy(key: jax.Array, volume: jax.Array,
                      aug: ml_collections.ConfigDict) -> jax.Array:
  """anisotropy along one of aug.anisotropy_axes, by a factor drawn from aug.anisotropy_factor."""
  axes = tuple(aug.anisotropy_axes)
  # One draw for both choices (compiles faster than a randint and a uniform).
  pick, fraction = jax.random.uniform(key, (2,))
  chosen = jnp.asarray(axes)[jnp.floor(pick * len(axes)).astype(jnp.int32)]
  low, high = aug.anisotropy_factor
  factor = low + (high - low) * fraction
  # Factor 1 along the other axes is exactly the identity: cheaper under vmap than a switch,
  # which would compute every axis' branch and select among whole volumes.
  for axis in axes:
    volume = anisotropy(volume, jnp.where(chosen == axis, factor, 1.0), axis)
  return volume


def random_noise(key: jax.Array, volume: jax.Array, aug: ml_collections.ConfigDict) -> jax.Array:
  """The volume plus zero-mean Gaussian noise, its standard deviation drawn from aug.noise_std."""
  std_key, noise_key = jax.random.split(key)
  return volume + _uniform(std_key, aug.noise_std) * _flat(jax.random.normal, noise_key,
                                                           volume.shape)


def gaussian_radius(max_sigma: float) -> int:
  """Taps each side of a Gaussian blur of standard deviation up to max_sigma: scipy's
  int(truncate * sigma + 0.5) with truncate 4."""
  return int(_BLUR_TRUNCATE * max_sigma + 0.5)


def gaussian_blur_matrix(sigma: jax.Array, size: int, radius: int) -> jax.Array:
  """[size, size] matrix of scipy.ndimage.gaussian_filter1d along an axis of `size` voxels with
  standard deviation sigma (0 is the identity) and the default mode 'reflect' and truncate 4:
  taps out to int(4 sigma + 0.5) (at most `radius`, gaussian_radius of the largest sigma), the axis
  extended by mirroring about its end faces (... c b a | a b c ... c b a | a b ...), periodically
  when the kernel is longer than the axis."""
  taps = np.arange(-radius, radius + 1)
  source = np.mod(np.arange(size)[:, None] + taps[None, :], 2 * size)
  source = np.where(source < size, source, 2 * size - 1 - source)
  # The tiny floor keeps the centre tap at exp(0 / tiny) = 1 when sigma is 0; the rest are cut.
  weights = jnp.exp(-0.5 * taps**2 / jnp.maximum(sigma**2, 1e-12))
  weights = jnp.where(np.abs(taps) <= jnp.floor(_BLUR_TRUNCATE * sigma + 0.5), weights, 0.0)
  weights = jnp.broadcast_to(weights / jnp.sum(weights), source.shape)
  return jnp.zeros((size, size), jnp.float32).at[np.arange(size)[:, None], source].add(weights)


def _along_axis(matrix: jax.Array, volume: jax.Array, axis: int) -> jax.Array:
  """matrix [n, n] applied to the volume's axis `axis` of length n, in full float32 (_matmul)."""
  moved = jnp.tensordot(matrix, volume, axes=([1], [axis]), precision=jax.lax.Precision.HIGHEST)
  return jnp.moveaxis(moved, 0, axis)


def gaussian_blur(volume: jax.Array, sigmas: jax.Array, radius: int) -> jax.Array:
  """The volume [D, H, W, C] blurred with standard deviations sigmas [3] (voxels) along its
  spatial axes: scipy.ndimage.gaussian_filter's separable kernels (gaussian_blur_matrix)."""
  for axis in range(3):
    volume = _along_axis(gaussian_blur_matrix(sigmas[axis], volume.shape[axis], radius), volume,
                         axis)
  return volume


def random_blur(key: jax.Array, volume: jax.Array, aug: ml_collections.ConfigDict) -> jax.Array:
  """gaussian_blur with each axis' standard deviation drawn from aug.blur_sigma."""
  return gaussian_blur(volume, _uniform(key, aug.blur_sigma, (3,)),
                       gaussian_radius(aug.blur_sigma[1]))


def bias_field(volume: jax.Array, coefficients: jax.Array) -> jax.Array:
  """The volume [D, H, W, C] times exp(sum over a, b, c of coefficients[a, b, c] x^a y^b z^c), a
  smooth multiplicative field, x, y and z the voxel coordinates along axes 0, 1 and 2 scaled to
  run from -1 at the first voxel to 1 at the last (TorchIO's RandomBiasField); coefficients
  [K, K, K] with K - 1 the highest power."""
  powers = np.arange(coefficients.shape[0])
  axes = []
  for size in volume.shape[:3]:
    coordinate = (np.arange(size) - (size - 1) / 2.0) / max((size - 1) / 2.0, 1.0)
    axes.append(jnp.asarray(coordinate[:, None]**powers, jnp.float32))
  exponent = jnp.einsum('abc,ia,jb,kc->ijk', coefficients, *axes,
                        precision=jax.lax.Precision.HIGHEST)
  return volume * jnp.exp(exponent)[..., None]


def random_bias_field(key: jax.Array, volume: jax.Array,
                      aug: ml_collections.ConfigDict) -> jax.Array:
  """bias_field of order aug.bias_order: each coefficient of a term x^a y^b z^c with
  a + b + c <= order drawn from aug.bias_coefficients, the others 0."""
  order = int(aug.bias_order)
  powers = np.arange(order + 1)
  in_order = powers[:, None, None] + powers[None, :, None] + powers[None, None, :] <= order
  return bias_field(volume, jnp.where(in_order, _uniform(key, aug.bias_coefficients,
                                                         in_order.shape), 0.0))


def gamma(volume: jax.Array, log_gamma: jax.Array) -> jax.Array:
  """volume ** exp(log_gamma) (log_gamma a scalar or one per channel [C]), which keeps [0, 1] in
  [0, 1]; sign(v) |v| ** gamma for negative voxels, as TorchIO's RandomGamma."""
  return jnp.sign(volume) * jnp.abs(volume)**jnp.exp(log_gamma)


def random_gamma(key: jax.Array, volume: jax.Array, aug: ml_collections.ConfigDict) -> jax.Array:
  """gamma with one log_gamma per channel drawn from aug.log_gamma (TorchIO draws per channel)."""
  return gamma(volume, _uniform(key, aug.log_gamma, volume.shape[-1:]))


INTRA_INTER_TRANSFORMS = {
    'flip': random_flip,
    'affine': random_affine,
    'anisotropy': random_anisotropy,
    'noise': random_noise,
    'blur': random_blur,
    'bias_field': random_bias_field,
    'gamma': random_gamma,
}


def intra_inter_choices(key: jax.Array, aug: ml_collections.ConfigDict) -> jax.Array:
  """bool [2, T]: which of the T = len(aug.transforms) transforms each of a volume's two views
  gets, aug.num_transforms each, uniformly without replacement; with aug.distinct_views the two
  sets are disjoint (both drawn from one permutation), else drawn independently."""
  names = tuple(aug.transforms)
  unknown = sorted(set(names) - set(INTRA_INTER_TRANSFORMS))
  if unknown:
    raise ValueError(f'transforms: unknown {unknown}; known: {sorted(INTRA_INTER_TRANSFORMS)}')
  count, per_view = len(names), int(aug.num_transforms)
  needed = 2 * per_view if aug.distinct_views else per_view
  if per_view < 1 or needed > count:
    raise ValueError(f'num_transforms={per_view}: each view needs 1 to '
                     f'{count // 2 if aug.distinct_views else count} of the {count} transforms '
                     f'(distinct_views={aug.distinct_views})')
  # Random permutations as the order of uniform draws: jax.random.permutation's exact shuffle
  # compiles several times slower, and float ties (which would favour lower indices) are rare.
  if aug.distinct_views:
    picks = jnp.argsort(jax.random.uniform(key, (count,)))[:needed].reshape(2, per_view)
  else:
    picks = jnp.argsort(_flat(jax.random.uniform, key, (2, count)), axis=1)[:, :per_view]
  return jnp.zeros((2, count), bool).at[jnp.arange(2)[:, None], picks].set(True)


def intra_inter_view(key: jax.Array, volume: jax.Array, aug: ml_collections.ConfigDict,
                     chosen: jax.Array | None = None) -> jax.Array:
  """One view of a float volume [D, H, W, C]: the transforms of aug.transforms flagged in chosen
  [T] (by default aug.num_transforms of them drawn from the key) applied in the order listed.
  Transform i draws its parameters from jax.random.split(k, T)[i], k the second key of
  jax.random.split(key), so they do not depend on which others run. Every transform is computed
  and the chosen ones kept (a lax.cond would do the same under the vmap over examples, and
  compiles slower). Not clipped: noise and the bias field leave [0, 1]; the others keep within
  the input's range (gamma keeps [0, 1])."""
  choice_key, transforms_key = jax.random.split(key)
  names = tuple(aug.transforms)
  if chosen is None:
    chosen = intra_inter_choices(choice_key, aug)[0]
  for name, run, transform_key in zip(names, chosen, jax.random.split(transforms_key, len(names))):
    volume = jnp.where(run, INTRA_INTER_TRANSFORMS[name](transform_key, volume, aug), volume)
  return volume


def intra_inter_views(rng: jax.Array, volumes: jax.Array,
                      aug: ml_collections.ConfigDict) -> jax.Array:
  """A batch [B, D, H, W, C] (uint8 or [0, 1] float) -> float32 [B, 2, D, H, W, C], two views per
  volume (intra_inter_view) whose transforms come from intra_inter_choices, one key per volume."""
  keys = jax.random.split(rng, volumes.shape[0])

  def draws(key):
    choice_key, views_key = jax.random.split(key)
    return jax.random.split(views_key), intra_inter_choices(choice_key, aug)
  view_keys, chosen = jax.vmap(draws)(keys)
  # One vmap over the 2 B views (each volume twice) compiles faster than one nested in another.
  # (Raw uint32 keys, as the training loop's, carry a trailing key axis.)
  views = jax.vmap(lambda k, v, c: intra_inter_view(k, v, aug, c))(
      view_keys.reshape(-1, *view_keys.shape[2:]), jnp.repeat(to_unit_float(volumes), 2, axis=0),
      chosen.reshape(-1, chosen.shape[-1]))
  return views.reshape(volumes.shape[:1] + (2,) + volumes.shape[1:])
