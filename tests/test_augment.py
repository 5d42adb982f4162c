"""On-device augmentations: shapes, ranges, determinism, shared crops, the building blocks."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from dsset import augment


def aug_config(**overrides):
  config = base.get_config().augment
  config.update(overrides)
  return config


# Every random step switched off and the crop forced to the whole image.
IDENTITY = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0, jitter_prob=0.0,
                blur_prob=0.0)


def jitted_set(config, out_size):
  return jax.jit(functools.partial(augment.augment_set, aug_config=config, out_size=out_size))


@pytest.fixture(scope='module')
def slices():
  """Three different uint8 slices [3, 24, 20, 1] (non-square, to catch swapped axes)."""
  return jax.random.randint(jax.random.key(0), (3, 24, 20, 1), 0, 256).astype(jnp.uint8)


@pytest.fixture(scope='module')
def default_set():
  return jitted_set(aug_config(), 16)


def test_views_shapes_dtype_range():
  views = jax.random.randint(jax.random.key(0), (2, 2, 3, 20, 20, 3), 0, 256).astype(jnp.uint8)
  augment_views = jax.jit(functools.partial(augment.augment_views, aug_config=aug_config(),
                                            out_size=12))
  out = augment_views(jax.random.key(1), views)
  chex.assert_shape(out, (2, 2, 3, 12, 12, 3))
  chex.assert_type(out, jnp.float32)
  assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
  # Every (example, view) draws its own augmentation.
  flat = out.reshape(4, -1)
  assert len({tuple(np.asarray(row[:50]).round(5)) for row in flat}) == 4


def test_float_and_uint8_inputs_agree(slices, default_set):
  key = jax.random.key(3)
  chex.assert_trees_all_close(default_set(key, slices),
                              default_set(key, slices.astype(jnp.float32) / 255.0), atol=1e-6)


def test_deterministic_per_key(slices, default_set):
  first = default_set(jax.random.key(5), slices)
  chex.assert_trees_all_equal(first, default_set(jax.random.key(5), slices))
  assert not np.allclose(first, default_set(jax.random.key(6), slices))


def test_image_is_a_set_of_one(slices, default_set):
  augment_image = jax.jit(functools.partial(augment.augment_image, aug_config=aug_config(),
                                            out_size=16))
  out = augment_image(jax.random.key(2), slices[0])
  chex.assert_shape(out, (16, 16, 1))
  chex.assert_trees_all_close(out, default_set(jax.random.key(2), slices[:1])[0])


def test_identity_settings_return_the_input(slices):
  out = jitted_set(aug_config(**IDENTITY), 20)(jax.random.key(0), slices[:, :20])
  chex.assert_trees_all_close(out, slices[:, :20] / 255.0, atol=1e-6)


def test_flip_mirrors():
  image = jax.random.uniform(jax.random.key(0), (1, 16, 16, 1))
  out = jitted_set(aug_config(**{**IDENTITY, 'flip_prob': 1.0}), 16)(jax.random.key(0), image)
  chex.assert_trees_all_close(out, image[:, :, ::-1], atol=1e-6)


def test_crop_box_shared_across_the_set(slices):
  # With only the crop random, the set is one linear map of its slices: scaled slices give scaled
  # outputs, so a second box would show up as a mismatch.
  config = aug_config(flip_prob=0.0, jitter_prob=0.0, blur_prob=0.0)
  image = slices[0].astype(jnp.float32) / 255.0
  stack = jnp.stack([image, 0.5 * image, 0.25 * image])
  run = jitted_set(config, 16)
  for seed in range(5):
    out = run(jax.random.key(seed), stack)
    chex.assert_trees_all_close(out[1], 0.5 * out[0], atol=1e-6)
    chex.assert_trees_all_close(out[2], 0.25 * out[0], atol=1e-6)
  whole = jitted_set(aug_config(**IDENTITY), 16)(jax.random.key(0), stack)
  assert not np.allclose(out[0], whole[0])  # the crop really cut something out


@pytest.mark.parametrize('random_part', ['flip_prob', 'jitter_prob', 'blur_prob'])
def test_other_augmentations_drawn_per_slice(random_part):
  identical = jnp.tile(jax.random.uniform(jax.random.key(0), (1, 16, 16, 1)), (8, 1, 1, 1))
  config = aug_config(**{**IDENTITY, 'crop_scale': (0.3, 1.0), random_part: 0.5})
  out = jitted_set(config, 16)(jax.random.key(4), identical)
  distinct = {tuple(np.asarray(slice_).ravel().round(5)) for slice_ in out}
  # A flip has two outcomes; jitter factors and blur sigmas are continuous draws.
  assert len(distinct) == 2 if random_part == 'flip_prob' else len(distinct) > 2


def test_jitter_factors_stay_in_range():
  # A constant grey image: contrast cannot change it, brightness scales it by U[1 - 0.8s, 1 + 0.8s].
  grey = jnp.full((64, 8, 8, 1), 0.5)
  config = aug_config(**{**IDENTITY, 'jitter_prob': 1.0, 'jitter_strength': 0.5})
  out = jitted_set(config, 8)(jax.random.key(0), grey)
  factors = np.asarray(out[:, 0, 0, 0]) / 0.5
  chex.assert_trees_all_close(out, jnp.broadcast_to(out[:, :1, :1], out.shape), atol=1e-6)
  assert factors.min() >= 0.6 - 1e-6 and factors.max() <= 1.4 + 1e-6
  assert factors.max() - factors.min() > 0.5  # the whole range is used


def test_crop_boxes_follow_scale_and_ratio():
  keys = jax.random.split(jax.random.key(0), 500)
  scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
  boxes = jax.jit(jax.vmap(lambda k: augment.sample_crop_box(k, 40, 30, scale, ratio)))(keys)
  top, left, height, width = np.asarray(boxes).T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + height <= 40 + 1e-4).all() and (left + width <= 30 + 1e-4).all()
  area = height * width / (40 * 30)
  assert (area >= scale[0] - 1e-5).all() and (area <= scale[1] + 1e-5).all()
  aspect = width / height
  assert (aspect >= ratio[0] - 1e-5).all() and (aspect <= ratio[1] + 1e-5).all()
  assert area.max() - area.min() > 0.5


def test_crop_box_falls_back_to_centre():
  # No 2:1 box holds the whole area of a square image: torchvision's centred fallback.
  box = augment.sample_crop_box(jax.random.key(0), 20, 20, (1.0, 1.0), (2.0, 3.0))
  chex.assert_trees_all_close(box, jnp.array([5.0, 0.0, 10.0, 20.0]))


@pytest.mark.parametrize('in_size, out_size', [(16, 40), (40, 16), (31, 31)])
def test_resize_matrix_matches_jax_image_resize(in_size, out_size):
  image = jax.random.uniform(jax.random.key(0), (in_size, in_size))
  rows = augment.resize_matrix(0.0, float(in_size), in_size, out_size)
  chex.assert_trees_all_close(rows @ image @ rows.T,
                              jax.image.resize(image, (out_size, out_size), 'linear'), atol=1e-5)


def test_blur_matrix():
  size, radius = 32, 3
  blur = augment.blur_matrix(jnp.float32(1.0), size, radius)
  chex.assert_trees_all_close(blur.sum(axis=1), jnp.ones(size), atol=1e-6)
  # Gaussian weights away from the border; the reflected border folds weight back inside.
  weights = np.exp(-0.5 * np.arange(-radius, radius + 1)**2)
  chex.assert_trees_all_close(blur[10, 7:14], weights / weights.sum(), atol=1e-6)
  chex.assert_trees_all_close(
      blur[0, :4], np.array([weights[3], 2 * weights[4], 2 * weights[5], 2 * weights[6]]) /
      weights.sum(), atol=1e-6)
  chex.assert_trees_all_close(augment.blur_matrix(jnp.float32(1e-3), size, radius), jnp.eye(size),
                              atol=1e-6)


def test_blur_kernel_covers_three_sigma_at_small_sizes():
  # blur_sigma up to 2 (the default): the kernel reaches 6 pixels each side even at 16 px, where
  # torchvision's 10 % rule gives 3 taps (7 at 64 px).
  for size in (16, 32, 64):
    assert augment.blur_radius(size, 2.0) == 6
    assert augment.blur_radius(size, 100.0) == size - 1  # capped: one reflection must cover it
  # The whole augmentation with sigma fixed at 2: a point in the middle of a 16 px image spreads
  # into the separable Gaussian of radius 6, normalised over its 13 taps.
  point = jnp.zeros((1, 16, 16, 1)).at[0, 8, 8, 0].set(1.0)
  config = aug_config(**{**IDENTITY, 'blur_prob': 1.0, 'blur_sigma': (2.0, 2.0)})
  out = jitted_set(config, 16)(jax.random.key(0), point)[0, :, :, 0]
  taps = np.exp(-0.5 * (np.arange(-6, 7) / 2.0)**2)
  taps /= taps.sum()
  expected = np.zeros((16, 16))
  expected[2:15, 2:15] = np.outer(taps, taps)
  chex.assert_trees_all_close(out, expected, atol=1e-6)


def test_default_jitter_factors_span_the_reference_range():
  # ColorJitter(brightness=0.8, contrast=0.8): both factors uniform in [0.2, 1.8].
  keys = jax.random.split(jax.random.key(0), 2000)
  factors = np.asarray(jax.vmap(lambda k: augment.jitter_factors(k, aug_config().jitter_strength))(
      keys))
  assert factors.shape == (2000, 2)
  assert factors.min() >= 0.2 and factors.max() <= 1.8
  assert (factors.min(axis=0) < 0.21).all() and (factors.max(axis=0) > 1.79).all()


def test_crop_from_the_native_slice_keeps_its_detail():
  # The sampler ships slices larger than the model's input (samplers.ship_size). Cropping there and
  # resizing the box equals resizing the whole slice first only when the box is the whole slice
  # (and cropping the whole shrunk slice is the identity: test_identity_settings_return_the_input).
  whole = aug_config(**IDENTITY)
  small = aug_config(**{**IDENTITY, 'crop_scale': (1 / 16, 1 / 16)})

  @jax.jit
  def crops(native):
    # One key: the box scales with the image, so it covers the same region at both sizes.
    key = jax.random.key(1)
    shrunk = jax.image.resize(native, (1, 16, 16, 1), 'linear')
    return (shrunk, augment.augment_set(key, native, whole, 16),
            augment.augment_set(key, native, small, 16), augment.augment_set(key, shrunk, small, 16))

  native = jax.random.uniform(jax.random.key(0), (1, 64, 64, 1))  # pixel-level detail
  shrunk, whole_native, small_native, small_shrunk = crops(native)
  chex.assert_trees_all_close(whole_native, shrunk, atol=1e-5)
  # A 16 x 16 pixel box of the native slice keeps its noise; the same box of the shrunk slice is
  # 4 x 4 pixels, already averaged, then stretched.
  assert float(small_native.std()) > 2 * float(small_shrunk.std())
  assert float(jnp.abs(small_native - small_shrunk).max()) > 0.2
