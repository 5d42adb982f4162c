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
  size = 32
  assert augment.blur_kernel_size(size) == 3
  assert augment.blur_kernel_size(224) == 23
  blur = augment.blur_matrix(jnp.float32(1.0), size)
  chex.assert_trees_all_close(blur.sum(axis=1), jnp.ones(size), atol=1e-6)
  # Gaussian weights away from the border; the reflected border folds weight back inside.
  weights = np.exp(-0.5 * np.arange(-1, 2)**2)
  chex.assert_trees_all_close(blur[10, 9:12], weights / weights.sum(), atol=1e-6)
  chex.assert_trees_all_close(blur[0, :2], np.array([weights[1], 2 * weights[2]]) / weights.sum(),
                              atol=1e-6)
  chex.assert_trees_all_close(augment.blur_matrix(jnp.float32(1e-3), size), jnp.eye(size),
                              atol=1e-6)
