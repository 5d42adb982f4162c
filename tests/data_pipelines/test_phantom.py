"""The phantom is deterministic, cheap, balanced, and its classes differ the way docs/data.md says."""

import pickle
import time

import numpy as np
import pytest
from scipy import ndimage

from configs import base
from data_pipelines import sources
from data_pipelines.errors import DataError
from data_pipelines.sources import phantom
from dsset import config_validation
from dsset.config_validation import ConfigError

OBJECT = phantom.MASK_IDS['object']


def data_config(**phantom_keys):
  config = base.get_config().data
  config.phantom.update(phantom_keys)
  return config


def test_same_seed_same_scans_other_seed_other_scans():
  first = phantom.make_source(data_config(), 'train')[3]
  again = sources.make_source(data_config(), 'train')[3]
  np.testing.assert_array_equal(first.volume, again.volume)
  np.testing.assert_array_equal(first.mask, again.mask)
  other = phantom.make_source(data_config(seed=1), 'train')[3]
  assert not np.array_equal(first.volume, other.volume)


def test_scan_contract_and_configurable_shape():
  scan = phantom.make_source(data_config(depth=12, height=40, width=24), 'val')[0]
  assert scan.volume.shape == scan.mask.shape == (12, 40, 24)
  assert scan.volume.dtype == np.float32
  assert 0.0 <= scan.volume.min() and scan.volume.max() <= 1.0
  assert set(np.unique(scan.mask)) <= {0, *phantom.MASK_IDS.values()}
  length = phantom.draw_variation(int(scan.scan_id.split('_')[1]), 0, 'varied').length_mm
  assert scan.spacing == (length / 12, 320.0 / 40, 320.0 / 24)
  uniform = phantom.make_source(data_config(depth=12, height=40, width=24, anatomy='uniform'),
                                'val')[0]
  assert uniform.spacing == (160.0 / 12, 320.0 / 40, 320.0 / 24)


def test_generating_a_default_scan_takes_milliseconds():
  source = phantom.make_source(data_config(), 'train')
  source[0]
  start = time.process_time()  # CPU time: a busy machine must not fail the test
  for i in range(1, 11):
    source[i]
  assert (time.process_time() - start) / 10 < 0.05


def test_splits_are_disjoint_complete_and_balanced():
  config = data_config(num_scans=48)
  names = {}
  for split in ('train', 'val', 'test'):
    source = phantom.make_source(config, split)
    labels = [source[i].label for i in range(len(source))]
    assert np.bincount(labels, minlength=4).tolist() == [len(source) // 4] * 4
    names[split] = {source[i].scan_id for i in range(len(source))}
  assert sum(map(len, names.values())) == len(set().union(*names.values())) == 48
  assert (len(names['train']), len(names['val']), len(names['test'])) == (32, 8, 8)


def _scan_ids(config, split):
  source = phantom.make_source(config, split)
  return [source[i].scan_id for i in range(len(source))], [source[i].label for i in range(len(source))]


def test_extra_eval_scans_grow_val_and_test_but_leave_train_alone():
  before = {split: _scan_ids(data_config(num_scans=16), split) for split in ('train', 'val', 'test')}
  after = {split: _scan_ids(data_config(num_scans=16, extra_eval_scans=16), split)
           for split in ('train', 'val', 'test')}
  assert after['train'] == before['train']
  for split in ('val', 'test'):
    ids, labels = after[split]
    assert ids[:len(before[split][0])] == before[split][0]  # the regular scans come first
    added = ids[len(before[split][0]):]
    assert len(added) == 8 and all(int(name.split('_')[1]) >= 16 for name in added)
    assert np.bincount(labels, minlength=4).tolist() == [len(labels) // 4] * 4
  assert not set(after['val'][0]) & set(after['test'][0])


@pytest.mark.parametrize('extra', [-8, 4, 12])
def test_extra_eval_scans_must_be_whole_balanced_blocks(extra):
  with pytest.raises(DataError, match='data.phantom.extra_eval_scans'):
    phantom.make_source(data_config(extra_eval_scans=extra), 'test')


def test_extra_train_scans_grow_train_only_with_scans_no_other_split_has():
  before = {split: _scan_ids(data_config(num_scans=16, extra_eval_scans=16), split)
            for split in ('train', 'val', 'test')}
  after = {split: _scan_ids(data_config(num_scans=16, extra_eval_scans=16, extra_train_scans=12),
                            split) for split in ('train', 'val', 'test')}
  assert after['val'] == before['val'] and after['test'] == before['test']
  ids, labels = after['train']
  assert ids[:len(before['train'][0])] == before['train'][0]
  added = ids[len(before['train'][0]):]
  # Numbered after the regular scans and the held-out ones, so neither moves.
  assert sorted(int(name.split('_')[1]) for name in added) == list(range(32, 44))
  assert np.bincount(labels, minlength=4).tolist() == [len(labels) // 4] * 4


@pytest.mark.parametrize('extra', [-4, 2, 6])
def test_extra_train_scans_must_be_whole_balanced_blocks(extra):
  with pytest.raises(DataError, match='data.phantom.extra_train_scans'):
    phantom.make_source(data_config(extra_train_scans=extra), 'train')


def test_too_few_scans_for_the_fractions_is_a_config_error():
  with pytest.raises(DataError, match='data.phantom.num_scans'):
    phantom.make_source(data_config(num_scans=8), 'train')


def test_depth_below_min_slices_is_an_error_rather_than_no_scans():
  config = data_config(depth=8)
  config.min_slices = 9
  with pytest.raises(DataError, match=r'data\.phantom\.depth=8 is below data\.min_slices=9'):
    phantom.make_source(config, 'train')
  config.min_slices = 8
  assert len(phantom.make_source(config, 'train'))


def test_tissues_keep_distinct_greys_in_the_default_window():
  scan = phantom.make_source(data_config(anatomy='uniform'), 'train')[0]
  means = [scan.volume[scan.mask == i].mean() for i in phantom.MASK_IDS.values()]
  assert min(np.diff(sorted(means))) > 0.02


def object_areas(scan):
  return (scan.mask == OBJECT).sum(axis=(1, 2))


def test_classes_differ_across_slices_the_way_their_shapes_say():
  source = phantom.make_source(data_config(anatomy='uniform'), 'train')
  for index in range(len(source)):
    scan = source[index]
    areas = object_areas(scan)
    present = np.flatnonzero(areas)
    name = phantom.CLASS_NAMES[scan.label]
    if name == 'disc':
      assert 1 <= len(present) <= 2
    elif name == 'tube':
      assert len(present) >= 0.6 * scan.num_slices - 1
      assert areas[present].max() == areas[present].min()
    elif name == 'sphere':
      assert len(present) >= 4
      assert areas[present[0]] < areas[present].max() > areas[present[-1]]
    else:  # box: same area on every slice it cuts, over several slices
      assert len(present) >= 4 and areas[present].max() == areas[present].min()


def test_one_slice_of_sphere_tube_and_disc_looks_alike_but_a_box_slice_is_square():
  source = phantom.make_source(data_config(anatomy='uniform'), 'train')
  fill = {name: [] for name in phantom.CLASS_NAMES}
  for index in range(len(source)):
    scan = source[index]
    areas = object_areas(scan)
    middle = scan.mask[int(np.argmax(areas))] == OBJECT
    rows, cols = np.flatnonzero(middle.any(axis=1)), np.flatnonzero(middle.any(axis=0))
    box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
    fill[phantom.CLASS_NAMES[scan.label]].append(middle.sum() / box)
  # A disc fills about pi/4 of its bounding box, a square all of it.
  for name in ('sphere', 'tube', 'disc'):
    assert 0.6 < np.mean(fill[name]) < 0.9
  assert min(fill['box']) > 0.95


# The varied phantom: patients differ, as documented, and the classes keep their meaning.

def test_variation_draws_stay_in_their_documented_ranges_and_span_them():
  draws = [phantom.draw_variation(i, seed, 'varied') for seed in (0, 1) for i in range(400)]
  ranges = phantom.VARIATION_RANGES
  for field, key in (('length_mm', 'length_mm'), ('habitus', 'habitus'),
                     ('rotation_deg', 'rotation_deg'), ('gain', 'gain'), ('offset_hu', 'offset_hu'),
                     ('object_hu', 'object_hu'), ('noise_scale', 'noise_scale'),
                     ('blur_mm', 'blur_mm')):
    values = np.array([getattr(d, field) for d in draws])
    low, high = ranges[key]
    assert low <= values.min() and values.max() <= high, field
    assert values.min() < low + 0.05 * (high - low) and values.max() > high - 0.05 * (high - low)
  shifts = np.array([d.shift_mm for d in draws])
  assert ranges['shift_mm'][0] <= shifts.min() and shifts.max() <= ranges['shift_mm'][1]
  lobes = np.array([d.lobes for d in draws])  # [draws, organ, (offset_y, offset_x, size)]
  assert ranges['lobe_offset'][0] <= lobes[..., :2].min() <= lobes[..., :2].max() <= ranges['lobe_offset'][1]
  assert ranges['lobe_size'][0] <= lobes[..., 2].min() <= lobes[..., 2].max() <= ranges['lobe_size'][1]
  assert phantom.draw_variation(3, 0, 'uniform') == phantom.Variation()
  with pytest.raises(DataError, match='data.phantom.anatomy'):
    phantom.draw_variation(3, 0, 'smooth')


def test_varied_and_uniform_share_label_and_object_draws_but_not_voxels():
  for index in range(8):
    varied = phantom.generate_scan(index, 16, 32, 32, seed=0, noise_hu=15.0, anatomy='varied')
    uniform = phantom.generate_scan(index, 16, 32, 32, seed=0, noise_hu=15.0, anatomy='uniform')
    assert varied[2] == uniform[2] == index % 4
    assert not np.array_equal(varied[0], uniform[0])
    assert (varied[1] == OBJECT).any()


def test_object_keys_change_the_objects_only_and_stay_in_their_ranges():
  """data.phantom.object_radius_mm / object_hu move the objects and nothing else; 'uniform' keeps
  its own (16-28 mm, 280 HU) whatever they say."""
  small = {'object_radius_mm': (16.0, 28.0), 'object_hu': (200.0, 360.0)}
  for index in range(8):
    default = phantom.generate_scan(index, 16, 32, 32, seed=0, noise_hu=15.0, anatomy='varied')
    earlier = phantom.generate_scan(index, 16, 32, 32, seed=0, noise_hu=15.0, anatomy='varied',
                                    **small)
    assert default[2] == earlier[2]
    objects = (default[1] == OBJECT) | (earlier[1] == OBJECT)
    assert objects.any() and (default[1] == OBJECT).sum() > (earlier[1] == OBJECT).sum()
    np.testing.assert_array_equal(default[1][~objects], earlier[1][~objects])
    uniform = phantom.generate_scan(index, 16, 32, 32, seed=0, noise_hu=15.0, anatomy='uniform')
    for a, b in zip(uniform, phantom.generate_scan(index, 16, 32, 32, seed=0, noise_hu=15.0,
                                                   anatomy='uniform', **small)):
      np.testing.assert_array_equal(a, b)
  for low, high in ((200.0, 360.0), (400.0, 600.0), (-50.0, -50.0)):
    values = [phantom.draw_variation(i, 0, 'varied', (low, high)).object_hu for i in range(200)]
    assert low <= min(values) and max(values) <= high
  # The in-plane radius of a disc (one slice, on a 1 mm grid): inside the range, spanning it.
  z = np.zeros((1, 1, 1))
  y = (np.arange(-160, 160) + 0.5)[None, :, None]
  x = (np.arange(-160, 160) + 0.5)[None, None, :]
  for radius_mm in ((24.0, 40.0), (10.0, 12.0)):
    radii = []
    for seed in range(60):
      disc = phantom._object(phantom.CLASS_NAMES.index('disc'), np.random.default_rng(seed), z, y, x,
                             np.zeros(5), 5.0, 160.0, 1.0, radius_mm)
      radii.append(np.sqrt(disc.sum() / np.pi))
    assert radius_mm[0] - 1 < min(radii) < radius_mm[0] + 0.15 * (radius_mm[1] - radius_mm[0]) + 1
    assert radius_mm[1] - 0.15 * (radius_mm[1] - radius_mm[0]) - 1 < max(radii) < radius_mm[1] + 1


def test_object_key_defaults_are_the_documented_ranges():
  # generate_scan's own defaults (VARIATION_RANGES, which the range tests check) are the config's.
  config = base.get_config()
  for key in ('object_radius_mm', 'object_hu'):
    assert tuple(config.data.phantom[key]) == phantom.VARIATION_RANGES[key]
    assert tuple(base.get_config('compare').data.phantom[key]) == phantom.VARIATION_RANGES[key]


@pytest.mark.parametrize('key,value', [('object_radius_mm', (30.0, 20.0)),
                                       ('object_radius_mm', (10.0, 70.0)),
                                       ('object_hu', (300.0,))])
def test_object_keys_out_of_range_are_config_errors(key, value):
  config = base.get_config()
  config.data.phantom[key] = value
  with pytest.raises(ConfigError, match=f'data.phantom.{key}'):
    config_validation.validate(config)


def test_varied_classes_keep_their_extent_across_slices():
  # At the earlier objects' size (16-28 mm) objects seldom touch, so connected components are
  # single objects; the default's larger ones (24-40 mm) merge more often (below).
  source = phantom.make_source(data_config(object_radius_mm=(16.0, 28.0)), 'train')
  extents = {name: [] for name in phantom.CLASS_NAMES}
  counts = []
  for index in range(len(source)):
    scan = source[index]
    counts.append(phantom.draw_variation(int(scan.scan_id.split('_')[1]), 0, 'varied').num_objects)
    components, num = ndimage.label(scan.mask == OBJECT)
    for part in ndimage.find_objects(components):
      # Slices each object (or a few touching ones) spans, as a share of the scan.
      extents[phantom.CLASS_NAMES[scan.label]].append((part[0].stop - part[0].start) / scan.num_slices)
  # Several objects per scan, their number drawn in the documented range.
  assert set(counts) <= set(range(2, 9)) and len(set(counts)) >= 4
  # A disc crosses at most 3 slices (partial volume marks a slice it only touches; rarely two
  # discs touch), a tube more than half the scan, spheres and boxes of the same radius between
  # (boxes are larger and touch more often, merging into longer runs: their shorter tenth).
  assert np.median(extents['disc']) <= 3 / 32
  assert np.median(extents['tube']) > 0.5
  assert 3 / 32 < np.median(extents['sphere']) < 0.5
  assert 3 / 32 < np.percentile(extents['box'], 10) < 0.5
  # With the default objects, discs still cross a few slices and tubes most of the scan.
  default = phantom.make_source(data_config(), 'train')
  runs = {'disc': [], 'tube': []}
  for index in range(len(default)):
    scan = default[index]
    if phantom.CLASS_NAMES[scan.label] in runs:
      components, _ = ndimage.label(scan.mask == OBJECT)
      runs[phantom.CLASS_NAMES[scan.label]] += [(part[0].stop - part[0].start) / scan.num_slices
                                                for part in ndimage.find_objects(components)]
  assert np.median(runs['disc']) <= 3 / 32 and np.median(runs['tube']) > 0.5


def test_position_moves_whole_pixels_exactly_and_turns_quarter_turns_exactly():
  rng = np.random.default_rng(0)
  volume = rng.normal(size=(2, 16, 16)).astype(np.float32) * 100
  mask = rng.integers(0, 6, size=(2, 16, 16)).astype(np.uint8)
  pixel = 320.0 / 16
  moved, moved_mask = phantom._position(volume, mask, phantom.Variation(shift_mm=(pixel, -2 * pixel)))
  np.testing.assert_allclose(moved[:, 1:, :-2], volume[:, :-1, 2:], atol=1e-3)
  np.testing.assert_array_equal(moved_mask[:, 1:, :-2], mask[:, :-1, 2:])
  assert (moved[:, 0] == phantom.HU['air']).all() and (moved_mask[:, :, -2:] == 0).all()
  turned, turned_mask = phantom._position(volume, mask, phantom.Variation(rotation_deg=90.0))
  np.testing.assert_allclose(turned, np.rot90(volume, 1, axes=(1, 2)), atol=1e-3)
  np.testing.assert_array_equal(turned_mask, np.rot90(mask, 1, axes=(1, 2)))


def test_position_interpolates_bilinearly_with_air_outside():
  rng = np.random.default_rng(1)
  volume = rng.normal(size=(1, 12, 12)).astype(np.float32) * 100
  vary = phantom.Variation(shift_mm=(7.0, -11.0), rotation_deg=17.0)
  moved, _ = phantom._position(volume, np.zeros(volume.shape, np.uint8), vary)
  # A plain loop over output pixels: the source point, then its four neighbours (air outside).
  pixel = 320.0 / 12
  angle = np.deg2rad(17.0)
  rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  def value(r, c):
    inside = 0 <= r < 12 and 0 <= c < 12
    return volume[0, r, c] if inside else phantom.HU['air']
  for r in range(12):
    for c in range(12):
      out = (np.array([r, c]) - 5.5) * pixel - np.array([7.0, -11.0])
      sr, sc = out @ rotation / pixel + 5.5
      r0, c0 = int(np.floor(sr)), int(np.floor(sc))
      fr, fc = sr - r0, sc - c0
      expected = ((1 - fr) * (1 - fc) * value(r0, c0) + (1 - fr) * fc * value(r0, c0 + 1)
                  + fr * (1 - fc) * value(r0 + 1, c0) + fr * fc * value(r0 + 1, c0 + 1))
      assert abs(moved[0, r, c] - expected) < 1e-2 * max(1.0, abs(expected))


def test_a_cached_scan_is_the_generated_one_and_read_only():
  source = phantom.make_source(data_config(), 'train')
  first = source[2]
  assert source[2] is first  # from the cache
  fresh = phantom.make_source(data_config(), 'train')._generate(2)
  np.testing.assert_array_equal(first.volume, fresh.volume)
  with pytest.raises(ValueError, match='read-only'):
    first.volume[0, 0, 0] = 1.0
  clone = pickle.loads(pickle.dumps(source))  # what a Grain worker receives: no cached scans
  assert not clone._recent and clone[2].scan_id == first.scan_id
