"""Cubes cut from scans (data_pipelines.volumes) against plain numpy indexing and geometry."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_pipelines import volumes
from data_pipelines.errors import DataError
from data_pipelines.sources.base import Scan


class EdgeRng:
  """Draws the lowest or the highest allowed start, to test the edges of the range."""

  def __init__(self, highest: bool):
    self.highest = highest

  def uniform(self, low, high):
    return high if self.highest else low


def numbered(shape):
  return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


@given(shape=st.tuples(*[st.integers(1, 40)] * 3), cube=st.integers(2, 24), highest=st.booleans())
@settings(max_examples=60, deadline=None)
def test_native_cube_is_a_zero_padded_slice_of_the_scan(shape, cube, highest):
  scan = numbered(shape)
  steps = volumes.axis_steps((2.0, 1.0, 0.7), 0.0)
  starts = volumes.draw_starts(shape, cube, steps, EdgeRng(highest))
  out = volumes.cut_cube(scan, starts, steps, cube)
  expected = np.zeros((cube,) * 3, np.float32)
  # The reference: every cube voxel k maps to scan voxel start + k, zero outside the scan.
  padded = np.pad(scan, [(cube, cube)] * 3)
  s = starts.astype(int) + cube
  expected = padded[s[0]:s[0] + cube, s[1]:s[1] + cube, s[2]:s[2] + cube]
  np.testing.assert_array_equal(out, expected)
  for axis, size in enumerate(shape):
    if size >= cube:  # a cube that fits stays inside the scan, flush with the drawn edge
      assert starts[axis] == (size - cube if highest else 0)
    else:  # a short scan lies wholly inside the cube
      assert -(cube - size) <= starts[axis] <= 0


def test_centred_cube_and_centred_padding():
  steps = np.ones(3)
  starts = volumes.draw_starts((10, 40, 6), 8, steps, None)
  np.testing.assert_array_equal(starts, [1, 16, -1])  # (10-8)/2, (40-8)/2, -(8-6)/2


def test_anisotropic_spacing_samples_physical_positions():
  # Voxel values are their physical coordinate along each axis (mm), which linear interpolation
  # reproduces exactly: a cube at voxel_mm = 1.5 must step 1.5 mm along every axis.
  spacing = (3.0, 0.75, 1.25)
  shape = (12, 40, 30)
  grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing='ij')
  cube = 8
  steps = volumes.axis_steps(spacing, 1.5)
  np.testing.assert_allclose(steps, [0.5, 2.0, 1.2])
  starts = volumes.draw_starts(shape, cube, steps, np.random.default_rng(3))
  for axis in range(3):
    out = volumes.cut_cube(grids[axis].astype(np.float32), starts, steps, cube)
    coords = np.moveaxis(out, axis, 0)
    expected = (starts[axis] + np.arange(cube) * steps[axis]) * spacing[axis]
    np.testing.assert_allclose(coords, expected[:, None, None] * np.ones_like(coords), atol=1e-4)


def test_masks_use_nearest_ids_and_agree_with_the_volume_on_the_scan_edge():
  rng = np.random.default_rng(0)
  mask = rng.integers(0, 5, (9, 13, 7)).astype(np.int32)
  steps = volumes.axis_steps((2.0, 1.0, 1.0), 1.3)
  starts = np.array([-3.3, 2.2, -1.0])
  out = volumes.cut_cube(mask, starts, steps, 10, nearest=True)
  assert set(np.unique(out)) <= set(np.unique(mask)) | {0}
  inside = volumes.cut_cube(np.ones(mask.shape, np.float32), starts, steps, 10) > 0
  inside_mask = volumes.cut_cube(np.ones(mask.shape, np.int32), starts, steps, 10, nearest=True)
  np.testing.assert_array_equal(inside, inside_mask > 0)


def test_bad_spacing_is_named():
  with pytest.raises(DataError, match='voxel_mm'):
    volumes.axis_steps((1.0, 0.0, 1.0), 2.0)


@given(shape=st.tuples(*[st.integers(1, 50)] * 3), cube=st.integers(4, 16))
@settings(max_examples=40, deadline=None)
def test_tiles_put_back_together_give_the_scan(shape, cube):
  scan = numbered(shape) + 1  # no zeros: padding is visible
  steps = np.ones(3)
  starts = volumes.tile_starts(shape, cube, steps)
  tiles = np.stack([volumes.cut_cube(scan, s, steps, cube) for s in starts])
  whole = volumes.assemble_tiles(tiles, starts, steps)
  # The scan, centred in a cube-sized box along axes shorter than the cube.
  lead = [(cube - n) // 2 if n < cube else 0 for n in shape]
  expected = np.zeros(tuple(max(n, cube) for n in shape), np.float32)
  expected[lead[0]:lead[0] + shape[0], lead[1]:lead[1] + shape[1],
           lead[2]:lead[2] + shape[2]] = scan
  np.testing.assert_array_equal(whole, expected)


def test_sampler_example_contract_and_masks():
  volume = np.random.default_rng(1).random((6, 20, 24), dtype=np.float32)
  mask = (volume > 0.5).astype(np.int32) * 3
  scans = [Scan(volume, (2.0, 1.0, 1.0), 'a', label=1, mask=mask)]
  sampler = volumes.VolumeSampler(scans, volume_size=8, voxel_mm=0.0, with_masks=True)
  example = sampler.random_map(0, np.random.default_rng(0))
  assert example['volume'].shape == (8, 8, 8, 1) and example['volume'].dtype == np.uint8
  assert example['mask'].shape == (8, 8, 8) and example['mask'].dtype == np.uint8
  assert example['label'] == 1 and example['scan_id'] == 0 and example['replaced'] == 0
  # Voxels inside the scan: the mask is 3 exactly where the quantised volume is above 0.5.
  inside = np.arange(8)[:, None, None] < 6
  bright = example['volume'][..., 0] > 127.5
  np.testing.assert_array_equal((example['mask'] == 3)[np.broadcast_to(inside, bright.shape)],
                                bright[np.broadcast_to(inside, bright.shape)])
  # Same generator state, same example: the stream is reproducible.
  again = sampler.random_map(0, np.random.default_rng(0))
  np.testing.assert_array_equal(example['volume'], again['volume'])


def test_sampler_without_masks_names_the_scan():
  scans = [Scan(np.zeros((4, 8, 8), np.float32), (1.0, 1.0, 1.0), 'no_mask.nii.gz')]
  sampler = volumes.VolumeSampler(scans, 8, 0.0, with_masks=True, on_bad_scan='stop')
  with pytest.raises(DataError, match='no_mask.nii.gz'):
    sampler.random_map(0, np.random.default_rng(0))
