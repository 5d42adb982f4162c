"""SimCLR augmentations for grey slices and slice sets, run on the device from PRNG keys.

Everything works on fixed shapes under jit and vmap. Crop, resize and flip are one pair of small
interpolation matrices per slice (rows, columns), applied as two matmuls; Gaussian blur is likewise
a pair of blur matrices. The order follows SimCLR's torchvision pipeline: random resized crop,
horizontal flip, brightness/contrast jitter, Gaussian blur. Saturation, hue and random grayscale are
no-ops on grey images and are left out.

In pretraining the crop box is cut from the slices as the host ships them, at the ship size S
(data_pipelines.samplers.ship_size, capped by augment.crop_source_size), and only the box is resized
to the model's input size: a small crop keeps the detail of the larger slice, as in the reference,
which cuts it from the slice at its native resolution.

aug_config is the `augment` section of configs/base.py; its values are read when tracing.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

# torchvision's RandomResizedCrop tries this many random boxes before its central fallback.
_CROP_ATTEMPTS = 10


def to_unit_float(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [0, 1]; float inputs are taken to be in [0, 1] already."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def sample_crop_box(key: jax.Array, height: int, width: int, scale: tuple[float, float],
                    ratio: tuple[float, float]) -> jax.Array:
  """Draws a RandomResizedCrop box as float32 [top, left, box_height, box_width] in pixels.

  Like torchvision: area fraction ~ U(scale), log aspect ratio (w / h) ~ U(log ratio), the first of
  10 draws that fits the image wins, else a central crop clamped to the ratio range. Unlike
  torchvision the box is not rounded to whole pixels (the resize interpolates anyway).
  """
  area_key, ratio_key, offset_key = jax.random.split(key, 3)
  area = height * width * jax.random.uniform(area_key, (_CROP_ATTEMPTS,), minval=scale[0],
                                             maxval=scale[1])
  aspect = jnp.exp(jax.random.uniform(ratio_key, (_CROP_ATTEMPTS,), minval=np.log(ratio[0]),
                                      maxval=np.log(ratio[1])))
  box_w = jnp.sqrt(area * aspect)
  box_h = jnp.sqrt(area / aspect)
  fits = (box_w <= width) & (box_h <= height)
  first = jnp.argmax(fits)
  image_ratio = width / height
  if image_ratio < ratio[0]:
    fallback_w, fallback_h = width, width / ratio[0]
  elif image_ratio > ratio[1]:
    fallback_w, fallback_h = height * ratio[1], height
  else:
    fallback_w, fallback_h = width, height
  found = jnp.any(fits)
  box_h = jnp.where(found, box_h[first], fallback_h)
  box_w = jnp.where(found, box_w[first], fallback_w)
  # The fallback box is centred; a drawn box sits uniformly at random inside the image.
  offset = jnp.where(found, jax.random.uniform(offset_key, (2,)), 0.5)
  top = offset[0] * (height - box_h)
  left = offset[1] * (width - box_w)
  return jnp.stack([top, left, box_h, box_w]).astype(jnp.float32)


def resize_matrix(start: jax.Array, length: jax.Array, in_size: int, out_size: int) -> jax.Array:
  """[out_size, in_size] matrix that samples [start, start + length) of an axis at out_size points.

  Linear interpolation at pixel centres (align_corners=False); when shrinking, the triangle filter
  is widened by the shrink factor (antialiasing, as jax.image.resize). Rows sum to 1, so values stay
  in the input's range; samples near the border lean on the edge pixels.
  """
  step = length / out_size
  centres = start + (jnp.arange(out_size) + 0.5) * step - 0.5
  support = jnp.maximum(step, 1.0)
  weights = jax.nn.relu(1.0 - jnp.abs(jnp.arange(in_size)[None, :] - centres[:, None]) / support)
  return weights / jnp.sum(weights, axis=1, keepdims=True)


def blur_radius(image_size: int, max_sigma: float) -> int:
  """Half-width of the Gaussian kernel: 3 max_sigma, capped at image_size - 1.

  Not torchvision's 10 % of the image side: below 128 px that truncates sigma 2 short of 3 sigma
  (at 1.5 sigma with its 7 taps at 64 px), whereas the reference blurs with PIL, which does not
  truncate. 3 sigma keeps all but 0.3 % of the Gaussian's mass; image_size - 1 is the widest
  kernel that one reflection can pad.
  """
  return min(image_size - 1, math.ceil(3.0 * max_sigma))


def blur_matrix(sigma: jax.Array, size: int, radius: int) -> jax.Array:
  """[size, size] matrix of a 1D Gaussian blur with 2 radius + 1 taps and reflect padding
  (torchvision's GaussianBlur); radius <= size - 1."""
  taps = np.arange(-radius, radius + 1)
  # Static one-hot map from (output pixel, tap) to the reflected source pixel.
  source = np.arange(size)[:, None] + taps[None, :]
  source = np.where(source < 0, -source, source)
  source = np.where(source > size - 1, 2 * (size - 1) - source, source)
  one_hot = np.eye(size, dtype=np.float32)[source]  # [size, taps, size]
  weights = jnp.exp(-0.5 * (taps / sigma)**2)
  weights = weights / jnp.sum(weights)
  return jnp.einsum('t,ots->os', weights, one_hot)


def jitter_factors(key: jax.Array, strength: float) -> jax.Array:
  """[2] (brightness, contrast) factors of torchvision's ColorJitter(brightness=0.8 s,
  contrast=0.8 s): each uniform in [max(0, 1 - 0.8 s), 1 + 0.8 s], s = strength."""
  spread = 0.8 * strength
  return jax.random.uniform(key, (2,), minval=max(0.0, 1.0 - spread), maxval=1.0 + spread)


def _jitter(key: jax.Array, image: jax.Array, strength: float) -> jax.Array:
  """torchvision ColorJitter(brightness=0.8 s, contrast=0.8 s) on one grey image, random order."""
  factors_key, order_key = jax.random.split(key)
  brightness, contrast = jitter_factors(factors_key, strength)

  def adjust_brightness(x):
    return jnp.clip(x * brightness, 0.0, 1.0)

  def adjust_contrast(x):
    # Blend with the mean grey level (for grey or grey-repeated RGB, torchvision's mean).
    return jnp.clip(contrast * x + (1.0 - contrast) * jnp.mean(x), 0.0, 1.0)

  return jnp.where(jax.random.bernoulli(order_key),
                   adjust_contrast(adjust_brightness(image)),
                   adjust_brightness(adjust_contrast(image)))


def _augment_slice(key: jax.Array, image: jax.Array, rows: jax.Array, cols: jax.Array,
                   aug_config: ml_collections.ConfigDict) -> jax.Array:
  """Crop/resize with the shared matrices, then this slice's own flip, jitter and blur."""
  flip_key, jitter_on_key, jitter_key, blur_on_key, sigma_key = jax.random.split(key, 5)
  # Reversing the column matrix's rows mirrors the output: flip for free inside the resize.
  cols = jnp.where(jax.random.bernoulli(flip_key, aug_config.flip_prob), cols[::-1], cols)
  image = jnp.einsum('oh,hwc,pw->opc', rows, image, cols)
  image = jnp.where(jax.random.bernoulli(jitter_on_key, aug_config.jitter_prob),
                    _jitter(jitter_key, image, aug_config.jitter_strength), image)
  sigma = jax.random.uniform(sigma_key, minval=aug_config.blur_sigma[0],
                             maxval=aug_config.blur_sigma[1])
  size = image.shape[0]
  blur = blur_matrix(sigma, size, blur_radius(size, aug_config.blur_sigma[1]))
  image = jnp.where(jax.random.bernoulli(blur_on_key, aug_config.blur_prob),
                    jnp.einsum('oh,hwc,pw->opc', blur, image, blur), image)
  return jnp.clip(image, 0.0, 1.0)


def augment_set(key: jax.Array, images: jax.Array, aug_config: ml_collections.ConfigDict,
                out_size: int) -> jax.Array:
  """Augments a set of slices with ONE crop box shared by all and per-slice flip, jitter and blur.

  Args:
    key: one PRNG key for the whole set.
    images: [K, H, W, C], uint8 or float in [0, 1]: the box is cut at this resolution.
    aug_config: the `augment` config section.
    out_size: side of the square output.

  Returns:
    float32 [K, out_size, out_size, C] in [0, 1].
  """
  crop_key, slices_key = jax.random.split(key)
  _, height, width, _ = images.shape
  top, left, box_h, box_w = sample_crop_box(crop_key, height, width, aug_config.crop_scale,
                                            aug_config.crop_ratio)
  rows = resize_matrix(top, box_h, height, out_size)
  cols = resize_matrix(left, box_w, width, out_size)
  slice_keys = jax.random.split(slices_key, images.shape[0])
  augment_one = functools.partial(_augment_slice, rows=rows, cols=cols, aug_config=aug_config)
  return jax.vmap(augment_one)(slice_keys, to_unit_float(images))


def augment_image(key: jax.Array, image: jax.Array, aug_config: ml_collections.ConfigDict,
                  out_size: int) -> jax.Array:
  """Augments one slice [H, W, C] -> float32 [out_size, out_size, C] (augment_set with K = 1)."""
  return augment_set(key, image[None], aug_config, out_size)[0]


def augment_views(key: jax.Array, views: jax.Array, aug_config: ml_collections.ConfigDict,
                  out_size: int) -> jax.Array:
  """Augments a batch of view pairs [B, 2, K, H, W, C] -> float32 [B, 2, K, out, out, C].

  Each (example, view) gets its own key split from `key`, so every set is augmented independently.
  """
  keys = jax.random.split(key, views.shape[:2])
  augment_one = functools.partial(augment_set, aug_config=aug_config, out_size=out_size)
  return jax.vmap(jax.vmap(augment_one))(keys, views)
