"""The rotation classes and the 3D augmentations against numpy's rot90, plain geometry and plain
trilinear loops."""

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dsset import augment3d


def rotation_matrix(rotation: int, size: int = 5) -> np.ndarray:
  """The 3x3 integer matrix a rotation class applies to centred voxel coordinates, read off how it
  moves a volume whose voxels hold their own coordinates."""
  centre = (size - 1) / 2
  coords = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing='ij'), axis=-1) - centre
  moved = np.asarray(augment3d.rotate(jnp.asarray(coords), jnp.int32(rotation)))
  # moved[p] holds the original coordinate of the voxel that landed at p: original = M^-1 p.
  new = coords.reshape(-1, 3)
  original = moved.reshape(-1, 3)
  inverse, *_ = np.linalg.lstsq(new, original, rcond=None)
  return np.rint(np.linalg.inv(inverse.T)).astype(int)


def test_ten_distinct_proper_rotations_matching_numpy_rot90():
  volume = np.random.default_rng(0).random((6, 6, 6, 1), dtype=np.float32)
  outputs = []
  planes = {0: (1, 2), 1: (2, 0), 2: (0, 1)}
  for index, (axis, turns) in enumerate(augment3d.ROTATIONS):
    out = np.asarray(augment3d.rotate(jnp.asarray(volume), jnp.int32(index)))
    expected = volume if axis is None else np.rot90(volume, turns, axes=planes[axis])
    np.testing.assert_array_equal(out, expected)
    matrix = rotation_matrix(index)
    assert round(np.linalg.det(matrix)) == 1  # proper: no reflection
    np.testing.assert_array_equal(matrix @ matrix.T, np.eye(3, dtype=int))
    outputs.append(out)
  assert augment3d.NUM_ROTATIONS == 10
  for a, b in itertools.combinations(range(10), 2):
    assert not np.array_equal(outputs[a], outputs[b]), (a, b)


def test_rotations_compose_as_expected():
  identity = rotation_matrix(0)
  np.testing.assert_array_equal(identity, np.eye(3, dtype=int))
  for axis in range(3):
    quarter, half, three = (rotation_matrix(1 + 3 * axis + k) for k in range(3))
    np.testing.assert_array_equal(quarter @ quarter, half)
    np.testing.assert_array_equal(quarter @ three, identity)
    np.testing.assert_array_equal(np.linalg.matrix_power(quarter, 4), identity)
    # A turn about an axis leaves that axis fixed.
    np.testing.assert_array_equal(quarter[:, axis], np.eye(3, dtype=int)[axis])


def config(**overrides):
  c = ml_collections.ConfigDict({'flip_prob': 0.5, 'rotate90': True,
                                 'intensity_scale': (1.0, 1.0), 'intensity_shift': (0.0, 0.0)})
  c.update(overrides)
  return c


def test_augmentation_moves_masks_with_volumes_and_only_reorders_voxels():
  rng = np.random.default_rng(1)
  volumes = rng.integers(0, 256, (6, 5, 5, 5, 1)).astype(np.uint8)
  masks = volumes[..., 0].astype(np.int32)  # a mask equal to the volume must stay equal
  out, out_masks = augment3d.augment_volumes(jax.random.key(0), jnp.asarray(volumes), config(),
                                             jnp.asarray(masks))
  out, out_masks = np.asarray(out), np.asarray(out_masks)
  np.testing.assert_allclose(out[..., 0] * 255.0, out_masks, atol=1e-4)
  for before, after in zip(volumes, out):  # a permutation of the voxels (no interpolation)
    np.testing.assert_allclose(np.sort(before.ravel() / 255.0), np.sort(after.ravel()), atol=1e-6)
  # Across a batch the draws differ (some example is moved).
  assert any(not np.allclose(a, b / 255.0) for a, b in zip(out, volumes))


def test_no_geometry_and_intensity_only():
  volumes = jnp.full((4, 3, 3, 3, 1), 0.5)
  out, _ = augment3d.augment_volumes(
      jax.random.key(2), volumes, config(flip_prob=0.0, rotate90=False, intensity_scale=(2.0, 2.0),
                                         intensity_shift=(0.1, 0.1)))
  np.testing.assert_allclose(np.asarray(out), 1.1, atol=1e-6)


def test_normalise_scales_uint8_as_floats():
  np.testing.assert_allclose(np.asarray(augment3d.normalise(jnp.array([0, 255], jnp.uint8))),
                             [-2.0, 2.0])


# The exemplar task's augmentation: free turns and zooms against plain loops ---------------------


def trilinear_loop(volume: np.ndarray, points: np.ndarray) -> np.ndarray:
  """volume [D, H, W] sampled at points [..., 3] (voxel indices) by trilinear interpolation over
  the voxel grid, 0 outside it: a plain loop over points and the 8 corners of their cell."""
  out = np.zeros(points.shape[:-1])
  for index in np.ndindex(*points.shape[:-1]):
    point = points[index]
    low = np.floor(point).astype(int)
    for corner in itertools.product((0, 1), repeat=3):
      voxel = low + corner
      if np.all(voxel >= 0) and np.all(voxel < volume.shape):
        weight = np.prod([point[k] - low[k] if corner[k] else 1 - (point[k] - low[k])
                          for k in range(3)])
        out[index] += weight * volume[tuple(voxel)]
  return out


def points_about_centre(shape, centred_map) -> np.ndarray:
  """Where each output voxel reads: the centre plus centred_map of its centred coordinates."""
  centre = (np.asarray(shape) - 1) / 2
  grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing='ij'), axis=-1)
  return centred_map(grid - centre) + centre


def random_volume(size, seed=0, channels=1):
  return np.random.default_rng(seed).random((size,) * 3 + (channels,), dtype=np.float32)


def test_turns_by_quarter_turns_are_rot90_and_by_zero_the_identity():
  volume = random_volume(6, channels=2)
  planes = {0: (1, 2), 1: (2, 0), 2: (0, 1)}
  turn = jax.jit(augment3d.rotate_plane, static_argnums=2)
  for axis in range(3):
    for turns in (-1, 0, 1, 2, 3, 4):
      out = np.asarray(turn(jnp.asarray(volume), turns * np.pi / 2, axis))
      np.testing.assert_array_equal(out, np.rot90(volume, turns, axes=planes[axis]))
    # The rotation task's classes turn the same way.
    np.testing.assert_array_equal(np.asarray(turn(jnp.asarray(volume), np.pi / 2, axis)),
                                  augment3d.rotate(jnp.asarray(volume), jnp.int32(1 + 3 * axis)))


def test_a_free_turn_matches_a_trilinear_loop_about_the_centre():
  volume = random_volume(7)
  angle = 0.4
  cos, sin = np.cos(angle), np.sin(angle)
  planes = {0: (1, 2), 1: (2, 0), 2: (0, 1)}
  for axis in range(3):
    first, second = planes[axis]

    def inverse_turn(p):  # the output voxel p reads the input at p turned back by the angle
      q = p.copy()
      q[..., first] = cos * p[..., first] + sin * p[..., second]
      q[..., second] = -sin * p[..., first] + cos * p[..., second]
      return q
    expected = trilinear_loop(volume[..., 0], points_about_centre(volume.shape[:3], inverse_turn))
    out = np.asarray(augment3d.rotate_plane(jnp.asarray(volume), angle, axis))[..., 0]
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert out[3, 3, 3] == volume[3, 3, 3, 0]  # the centre stays


def test_zoom_by_one_is_the_identity_and_zoom_in_is_the_centre_of_the_upsampled_volume():
  volume = random_volume(5, channels=2)
  np.testing.assert_array_equal(np.asarray(augment3d.zoom(jnp.asarray(volume), 1.0)), volume)
  # x2: upsample each axis at half-voxel steps (9 samples), then keep the centre 5.
  upsampled = volume
  for axis in range(3):
    upsampled = np.apply_along_axis(lambda line: np.interp(np.arange(9) / 2, np.arange(5), line),
                                    axis, upsampled)
  np.testing.assert_allclose(np.asarray(augment3d.zoom(jnp.asarray(volume), 2.0)),
                             upsampled[2:7, 2:7, 2:7], atol=1e-6)


def test_zoom_out_pads_with_zeros_and_anisotropic_zoom_matches_a_trilinear_loop():
  volume = random_volume(9)
  out = np.asarray(augment3d.zoom(jnp.asarray(volume), 0.5))
  np.testing.assert_allclose(out[2:7, 2:7, 2:7], volume[::2, ::2, ::2], atol=1e-6)
  inside = np.zeros(out.shape, bool)
  inside[2:7, 2:7, 2:7] = True
  assert np.all(out[~inside] == 0)
  factors = np.array([1.5, 0.8, 1.25])
  expected = trilinear_loop(volume[..., 0], points_about_centre((9, 9, 9), lambda p: p / factors))
  np.testing.assert_allclose(np.asarray(augment3d.zoom(jnp.asarray(volume), factors))[..., 0],
                             expected, atol=1e-5)


def test_brightness_contrast_shifts_then_scales_about_the_mean():
  volume = random_volume(4, channels=2)
  shifted = volume + 0.1
  expected = 1.5 * (shifted - shifted.mean()) + shifted.mean()
  out = augment3d.brightness_contrast(jnp.asarray(volume), 0.1, 1.5)
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-6)


EXEMPLAR_DEFAULTS = ml_collections.ConfigDict({
    'flip_prob': 0.5, 'rotate_prob': 0.5, 'quarter_turn_prob': 0.5, 'color_prob': 0.5,
    'brightness_delta': 0.125, 'contrast_range': (0.5, 1.5), 'zoom_prob': 0.15,
    'zoom_range': (0.8, 1.2)})


def test_exemplar_draws_are_keyed_and_follow_the_released_probabilities():
  draw = jax.jit(jax.vmap(lambda key: augment3d.exemplar_draw(key, EXEMPLAR_DEFAULTS)))
  keys = jax.random.split(jax.random.key(0), 4000)
  drawn = jax.tree.map(np.asarray, draw(keys))
  jax.tree.map(np.testing.assert_array_equal, drawn, jax.tree.map(np.asarray, draw(keys)))
  # Each axis, plane and transform draws on its own: shares near their probabilities (4000
  # draws: a standard error of at most 0.008).
  np.testing.assert_allclose(drawn['flips'].mean(0), 0.5, atol=0.04)
  assert 0.2 < np.mean(np.all(drawn['flips'] == drawn['flips'][:, :1], axis=1)) < 0.3
  angles = drawn['angles']
  quarter = np.isclose(np.mod(angles + 1e-4, np.pi / 2), 1e-4, atol=1e-3)  # k * pi / 2
  # No turn 0.5, a quarter turn 0.25 (a quarter of them by 0), a free angle 0.25.
  np.testing.assert_allclose(np.mean(angles == 0, axis=0), 0.5 + 0.25 / 4, atol=0.04)
  np.testing.assert_allclose(np.mean(quarter & (angles != 0), axis=0), 0.25 * 3 / 4, atol=0.04)
  free = angles[~quarter]
  assert free.min() >= 0 and free.max() < 2 * np.pi and abs(free.mean() - np.pi) < 0.2
  assert not np.array_equal(angles[:, 0], angles[:, 1])
  assert abs(drawn['color'].mean() - 0.5) < 0.04
  assert np.abs(drawn['delta']).max() <= 0.125 and np.abs(drawn['delta']).max() > 0.12
  assert 0.5 <= drawn['contrast'].min() < 0.51 and 1.49 < drawn['contrast'].max() <= 1.5
  zoomed = np.any(drawn['zoom'] != 1, axis=1)
  assert abs(zoomed.mean() - 0.15) < 0.03
  assert np.all((drawn['zoom'][zoomed] >= 0.8) & (drawn['zoom'][zoomed] <= 1.2))
  assert np.mean(np.ptp(drawn['zoom'][zoomed], axis=1) > 0) > 0.99  # a factor per axis


def exemplar_transform(angles, zoom):
  return {'flips': np.array([True, False, True]), 'angles': np.asarray(angles, np.float32),
          'color': True, 'delta': 0.1, 'contrast': 2.0, 'zoom': np.asarray(zoom, np.float32)}


def test_exemplar_apply_changes_intensities_then_flips_turns_and_zooms():
  volume = random_volume(6)
  apply = jax.jit(augment3d.exemplar_apply)
  colored = volume[..., 0] + 0.1
  colored = 2.0 * (colored - colored.mean()) + colored.mean()
  flipped = colored[::-1, :, ::-1]
  # Quarter turns about axes 0 then 1 (they do not commute) move whole voxels, so only the zoom
  # interpolates.
  turned = np.rot90(np.rot90(flipped, 1, axes=(1, 2)), 1, axes=(2, 0))
  zoom = np.array([1.5, 1.0, 0.8])
  expected = trilinear_loop(turned, points_about_centre((6, 6, 6), lambda p: p / zoom))
  out = apply(jnp.asarray(volume), exemplar_transform([np.pi / 2, np.pi / 2, 0.0], zoom))
  np.testing.assert_allclose(np.asarray(out)[..., 0], expected, atol=1e-5)
  # A free turn and the zoom: one interpolation at the composed point.
  cos, sin = np.cos(0.3), np.sin(0.3)

  def composed(p):  # zoom, turn about axis 1 (the plane of axes 2 and 0), flips: inverses in turn
    p = p / 1.25
    p = np.stack([-sin * p[..., 2] + cos * p[..., 0], p[..., 1],
                  cos * p[..., 2] + sin * p[..., 0]], axis=-1)
    return p * np.array([-1, 1, -1])
  expected = trilinear_loop(colored, points_about_centre((6, 6, 6), composed))
  out = apply(jnp.asarray(volume), exemplar_transform([0.0, 0.3, 0.0], [1.25] * 3))
  np.testing.assert_allclose(np.asarray(out)[..., 0], expected, atol=1e-5)


def test_exemplar_augment_draws_one_transform_per_example_from_its_key():
  # Four copies of one volume: one key per example, so the copies come out differently.
  volumes = np.stack([(random_volume(6) * 255).astype(np.uint8)] * 4)
  augment = jax.jit(lambda key: augment3d.exemplar_augment(key, jnp.asarray(volumes),
                                                           EXEMPLAR_DEFAULTS))
  first = np.asarray(augment(jax.random.key(3)))
  np.testing.assert_array_equal(first, np.asarray(augment(jax.random.key(3))))
  assert not np.array_equal(first, np.asarray(augment(jax.random.key(4))))
  assert len({view.tobytes() for view in first}) == 4
  one = jax.jit(lambda key, volume: augment3d.exemplar_apply(
      volume, augment3d.exemplar_draw(key, EXEMPLAR_DEFAULTS)))
  for key, view in zip(jax.random.split(jax.random.key(3), 4), first):
    np.testing.assert_allclose(view, np.asarray(one(key, jnp.asarray(volumes[0] / 255.0))),
                               atol=1e-6)
