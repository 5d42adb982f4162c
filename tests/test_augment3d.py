"""The rotation classes and the 3D augmentation against numpy's rot90 and plain geometry."""

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
