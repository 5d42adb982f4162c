"""The TorchIO-style augmentations of intra-inter clustering (dsset.augment3d) against numpy and
scipy references, on tiny volumes that are not cubes (so that axes cannot be mixed up)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from dsset import augment3d

SHAPE = (8, 10, 12)


def random_volume(seed=0, channels=1, low=0.0):
  """[8, 10, 12, C] float32 in [low, 1)."""
  rng = np.random.default_rng(seed)
  return (low + (1 - low) * rng.random(SHAPE + (channels,))).astype(np.float32)


def config(**overrides):
  aug = augment3d.default_intra_inter_augment3d()
  aug.update(overrides)
  return aug


@pytest.mark.parametrize('name', sorted(augment3d.INTRA_INTER_TRANSFORMS))
def test_each_transform_is_keyed_finite_and_in_its_documented_range(name):
  # All three flip axes, so that four keys cannot all draw the same flips by chance.
  aug = config(flip_axes=(0, 1, 2))
  volume = jnp.asarray(random_volume())
  keys = jax.random.split(jax.random.key(7), 4)
  keys = jnp.concatenate([keys[:1], keys])  # key 0 twice
  transform = augment3d.INTRA_INTER_TRANSFORMS[name]
  out = np.asarray(jax.jit(jax.vmap(lambda k: transform(k, volume, aug)))(keys))
  assert out.shape == (5,) + SHAPE + (1,) and out.dtype == np.float32
  assert np.isfinite(out).all()
  np.testing.assert_array_equal(out[0], out[1])
  if name == 'flip':
    assert len({o.tobytes() for o in out[1:]}) > 1
  else:
    for a, b in itertools.combinations(range(1, 5), 2):
      assert not np.array_equal(out[a], out[b]), (a, b)
  if name in ('flip', 'affine', 'anisotropy', 'blur'):  # convex combinations of voxels
    assert out.min() >= volume.min() - 1e-6 and out.max() <= volume.max() + 1e-6
  if name == 'gamma':
    assert out.min() >= 0 and out.max() <= 1


def test_identity_parameters_give_the_volume_back():
  volume = jnp.asarray(random_volume(low=0.2))
  key = jax.random.key(0)
  # Each under jit: one compilation instead of one per operation.
  np.testing.assert_allclose(
      jax.jit(augment3d.affine)(volume, jnp.ones(3), jnp.zeros(3), jnp.zeros(3)), volume,
      rtol=0, atol=1e-7)  # rounding of (v - min) + min only
  for axis in range(3):
    np.testing.assert_array_equal(
        jax.jit(augment3d.anisotropy, static_argnums=2)(volume, jnp.float32(1.0), axis), volume)
  np.testing.assert_array_equal(
      jax.jit(augment3d.gaussian_blur, static_argnums=2)(volume, jnp.zeros(3), 4), volume)
  np.testing.assert_array_equal(jax.jit(augment3d.bias_field)(volume, jnp.zeros((4, 4, 4))),
                                volume)
  np.testing.assert_allclose(jax.jit(augment3d.gamma)(volume, jnp.float32(0.0)), volume,
                             rtol=1e-6)
  no_noise = config(noise_std=(0.0, 0.0))
  np.testing.assert_array_equal(
      jax.jit(lambda k, v: augment3d.random_noise(k, v, no_noise))(key, volume), volume)
  no_flip = config(flip_prob=0.0)
  np.testing.assert_array_equal(
      jax.jit(lambda k, v: augment3d.random_flip(k, v, no_flip))(key, volume), volume)


def test_affine_translation_and_scale_move_the_content_as_documented():
  volume = np.zeros(SHAPE + (1,), np.float32)
  volume[3, 4, 5] = 1.0
  affine = jax.jit(augment3d.affine)
  shifted = np.asarray(affine(jnp.asarray(volume), jnp.ones(3), jnp.zeros(3),
                              jnp.asarray([1.0, -2.0, 3.0])))
  np.testing.assert_array_equal(shifted, np.roll(volume, (1, -2, 3), axis=(0, 1, 2)))
  # A zoom by 2 about the centre (3.5, 4.5, 5.5) takes the voxel at centre + d to centre + 2 d.
  ramp = np.broadcast_to(np.arange(12, dtype=np.float32), SHAPE)[..., None]
  zoomed = np.asarray(affine(jnp.asarray(ramp), jnp.asarray([1.0, 1.0, 2.0]), jnp.zeros(3),
                             jnp.zeros(3)))
  np.testing.assert_allclose(zoomed[0, 0, :, 0], 5.5 + (np.arange(12) - 5.5) / 2, rtol=1e-6)


def test_gamma_matches_numpy_per_channel_and_keeps_the_sign_of_negative_voxels():
  volume = random_volume(channels=2) - 0.25
  log_gamma = np.asarray([-0.3, 0.2], np.float32)
  out = np.asarray(augment3d.gamma(jnp.asarray(volume), jnp.asarray(log_gamma)))
  expected = np.sign(volume) * np.abs(volume)**np.exp(log_gamma)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-7)


def test_bias_field_matches_a_loop_over_the_polynomial_terms():
  volume = random_volume(channels=2)
  coefficients = np.random.default_rng(1).uniform(-0.5, 0.5, (4, 4, 4)).astype(np.float32)
  out = np.asarray(augment3d.bias_field(jnp.asarray(volume), jnp.asarray(coefficients)))
  # Coordinates from -1 at the first voxel to 1 at the last, per axis.
  x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing='ij')
  exponent = np.zeros(SHAPE)
  for a, b, c in itertools.product(range(4), repeat=3):
    exponent += coefficients[a, b, c] * x**a * y**b * z**c
  np.testing.assert_allclose(out, volume * np.exp(exponent)[..., None], rtol=2e-5)


def test_random_bias_field_keeps_only_the_terms_of_its_order():
  # Order 1 on a volume of ones: the log field is c + a x + b y + d z, a plane.
  ones = jnp.ones(SHAPE + (1,))
  field = np.log(np.asarray(augment3d.random_bias_field(jax.random.key(3), ones,
                                                        config(bias_order=1))))[..., 0]
  x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing='ij')
  design = np.stack([np.ones(field.size), x.ravel(), y.ravel(), z.ravel()], axis=1)
  coefficients, residual, *_ = np.linalg.lstsq(design, field.ravel(), rcond=None)
  assert residual[0] < 1e-8
  assert np.all(np.abs(coefficients) <= 0.5)


@pytest.mark.parametrize('sigmas', [(0.0, 0.7, 1.6), (2.0, 0.0, 0.3), (3.3, 2.6, 1.1)])
def test_blur_matches_scipy_gaussian_filter(sigmas):
  # (3.3, ...): 13 taps each side on an axis of 8, folded more than once by mode 'reflect'.
  volume = random_volume(channels=2)
  out = np.asarray(jax.jit(augment3d.gaussian_blur, static_argnums=2)(
      jnp.asarray(volume), jnp.asarray(sigmas), augment3d.gaussian_radius(3.3)))
  expected = scipy.ndimage.gaussian_filter(volume.astype(np.float64), sigmas + (0.0,),
                                           mode='reflect', truncate=4.0)
  np.testing.assert_allclose(out, expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize('axis', range(3))
def test_anisotropy_keeps_a_volume_constant_along_its_axis_and_interpolates_block_values(axis):
  resample = jax.jit(augment3d.anisotropy, static_argnums=2)
  size = SHAPE[axis]
  rng = np.random.default_rng(axis)
  # Constant along the axis: unchanged, whatever the factor.
  flat_shape = tuple(1 if a == axis else n for a, n in enumerate(SHAPE)) + (1,)
  constant = np.broadcast_to(rng.random(flat_shape, dtype=np.float32), SHAPE + (1,))
  for factor in (1.5, 2.7, 5.0):
    np.testing.assert_array_equal(resample(jnp.asarray(constant), jnp.float32(factor), axis),
                                  constant)
  # Constant in blocks of an integer factor m: the samples are the blocks' values, and every voxel
  # interpolates linearly between the centres of the blocks about it (the edge blocks' values
  # beyond the outermost centres).
  for factor in (m for m in range(2, size + 1) if size % m == 0):
    blocks = rng.random(size // factor)
    along = np.repeat(blocks, factor)
    volume = np.moveaxis(np.broadcast_to(along, SHAPE[:axis] + SHAPE[axis + 1:] + (size,)),
                         -1, axis)[..., None].astype(np.float32)
    centres = factor * np.arange(size // factor) + (factor - 1) / 2
    expected_along = np.interp(np.arange(size), centres, blocks)
    expected = np.moveaxis(np.broadcast_to(expected_along,
                                           SHAPE[:axis] + SHAPE[axis + 1:] + (size,)),
                           -1, axis)[..., None]
    out = np.asarray(resample(jnp.asarray(volume), jnp.float32(factor), axis))
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6, err_msg=f'factor {factor}')


def test_choices_pick_the_configured_number_per_view():
  keys = jax.random.split(jax.random.key(0), 200)
  distinct = config(num_transforms=2)
  chosen = np.asarray(jax.jit(jax.vmap(lambda k: augment3d.intra_inter_choices(k, distinct)))(
      keys))
  assert chosen.shape == (200, 2, 7)
  np.testing.assert_array_equal(chosen.sum(axis=2), 2)
  assert not (chosen[:, 0] & chosen[:, 1]).any()
  assert chosen.any(axis=(0, 1)).all()  # every transform is drawn now and then
  shared = config(num_transforms=4, distinct_views=False)
  chosen = np.asarray(jax.jit(jax.vmap(lambda k: augment3d.intra_inter_choices(k, shared)))(
      keys))
  np.testing.assert_array_equal(chosen.sum(axis=2), 4)
  assert (chosen[:, 0] & chosen[:, 1]).any()


@pytest.mark.parametrize('overrides', [{'num_transforms': 4}, {'num_transforms': 0},
                                       {'transforms': ('flip', 'elastic')}])
def test_choices_reject_impossible_configs(overrides):
  with pytest.raises(ValueError, match='num_transforms|elastic'):
    augment3d.intra_inter_choices(jax.random.key(0), config(**overrides))


def test_a_view_applies_exactly_the_chosen_transforms_with_their_own_keys():
  aug = config(transforms=('gamma', 'noise'))
  volume = jnp.asarray(random_volume())
  key = jax.random.key(5)
  transform_keys = jax.random.split(jax.random.split(key)[1], 2)
  view = jax.jit(lambda chosen: augment3d.intra_inter_view(key, volume, aug, chosen))
  np.testing.assert_array_equal(view(jnp.asarray([False, False])), volume)
  np.testing.assert_array_equal(view(jnp.asarray([True, False])),
                                augment3d.random_gamma(transform_keys[0], volume, aug))
  np.testing.assert_allclose(
      view(jnp.asarray([True, True])),
      augment3d.random_noise(transform_keys[1],
                             augment3d.random_gamma(transform_keys[0], volume, aug), aug),
      rtol=0, atol=1e-6)


def test_views_are_two_different_keyed_views_per_volume():
  aug = config(transforms=('flip', 'noise', 'gamma'))
  volumes = (np.stack([random_volume(seed) for seed in range(3)]) * 255).astype(np.uint8)
  views_of = jax.jit(lambda rng: augment3d.intra_inter_views(rng, jnp.asarray(volumes), aug))
  views = np.asarray(views_of(jax.random.key(0)))
  assert views.shape == (3, 2) + SHAPE + (1,) and views.dtype == np.float32
  assert np.isfinite(views).all()
  np.testing.assert_array_equal(views, views_of(jax.random.key(0)))
  assert not np.array_equal(views, views_of(jax.random.key(1)))
  for example in range(3):
    assert not np.array_equal(views[example, 0], views[example, 1])


@pytest.mark.slow
def test_default_views_compile_and_stay_finite():
  volumes = jnp.asarray(np.stack([random_volume(seed) for seed in range(4)]))
  aug = augment3d.default_intra_inter_augment3d()
  views = np.asarray(jax.jit(lambda r: augment3d.intra_inter_views(r, volumes, aug))(
      jax.random.key(0)))
  assert views.shape == (4, 2) + SHAPE + (1,)
  assert np.isfinite(views).all()
  for example in range(4):
    assert not np.array_equal(views[example, 0], views[example, 1])
