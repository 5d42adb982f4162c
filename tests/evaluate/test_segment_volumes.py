"""Slice-wise 3D segmentation with the 2D decoder: Dice per volume (a scan's slice predictions
stacked into its volume) against plain numpy references, and the segment run on an intra_inter
encoder reporting it next to the Dice over all test pixels."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from configs import segment as segment_config
from dsset.evaluate import segment
from dsset.methods import make_method
from tests.evaluate.test_slice_transformer_features import fake_intra_inter_run


def loop_dice(pred, target, num_classes):
  """Dice per class of one volume [D, H, W], voxel by voxel; nan where a class is in neither."""
  scores = []
  for c in range(num_classes):
    overlap = predicted = true = 0
    for p, t in zip(pred.ravel(), target.ravel()):
      overlap += int(p == c and t == c)
      predicted += int(p == c)
      true += int(t == c)
    scores.append(2 * overlap / (predicted + true) if predicted + true else np.nan)
  return np.array(scores)


def test_volume_dice_stacks_each_volumes_slices_and_matches_a_loop_reference():
  rng = np.random.default_rng(0)
  depths = [3, 5, 2]
  volumes_true = [rng.integers(0, 3, size=(d, 4, 4)) for d in depths]
  volumes_pred = [rng.integers(0, 3, size=(d, 4, 4)) for d in depths]
  volumes_true[2][volumes_true[2] == 2] = 1  # class 2 in neither of volume 2: undefined there
  volumes_pred[2][volumes_pred[2] == 2] = 0
  volumes_pred[1][:] = 3  # class 3 predicted everywhere in volume 1, true nowhere: Dice 0
  scores = segment.volume_dice(np.concatenate(volumes_pred), np.concatenate(volumes_true),
                               np.array(depths), 4)
  expected = np.stack([loop_dice(p, t, 4) for p, t in zip(volumes_pred, volumes_true)])
  np.testing.assert_allclose(scores, expected)
  assert np.isnan(scores[2, 2]) and scores[1, 3] == 0 and np.isnan(scores[0, 3])
  # Per volume is not the Dice over all pixels at once (which weighs volume 1's 5 slices more).
  pooled = segment.dice(np.concatenate(volumes_pred), np.concatenate(volumes_true), 4)
  assert not np.allclose(np.nanmean(scores, axis=0)[:3], pooled[:3])
  with pytest.raises(ValueError, match='10 predicted'):
    segment.volume_dice(np.concatenate(volumes_pred), np.concatenate(volumes_true),
                        np.array([3, 5, 3]), 4)


def test_volume_dice_result_averages_each_class_over_the_volumes_where_it_is_defined():
  per_volume = np.array([[0.9, 0.5, np.nan, 0.0],
                         [0.7, 0.3, 0.6, np.nan]])
  result = segment.volume_dice_result(per_volume, ['a', 'b'])
  assert result['volume_dice_per_class'] == pytest.approx({'1': 0.4, '2': 0.6, '3': 0.0})
  assert result['volume_dice_mean'] == pytest.approx((0.4 + 0.6 + 0.0) / 3)
  assert result['volume_dice_background'] == pytest.approx(0.8)
  assert result['dice_per_volume'] == [
      {'scan_id': 'a', 'dice_per_class': {'1': 0.5, '2': None, '3': 0.0}},
      {'scan_id': 'b', 'dice_per_class': {'1': 0.3, '2': 0.6, '3': None}}]


class ShortenedScans:
  """A split's scans cut to different depths, so that volumes are not equal runs of slices."""

  def __init__(self, source, depths):
    self._source, self._depths = source, depths

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    scan = self._source[index]
    depth = self._depths[index % len(self._depths)]
    return dataclasses.replace(scan, volume=scan.volume[:depth], mask=scan.mask[:depth])


def test_segment_on_an_intra_inter_encoder_reports_dice_per_test_volume(tmp_path, monkeypatch):
  # The 2D encoder of an intra_inter run goes into the U-Net like any 2D export.
  _, pretrained = fake_intra_inter_run(tmp_path / 'pretrain')
  config = segment_config.get_config('tiny')
  config.init_from = str(tmp_path / 'pretrain')
  make = segment.make_source
  monkeypatch.setattr(segment, 'make_source',
                      lambda data, split: ShortenedScans(make(data, split), [12, 7, 9, 5]))
  method = make_method(config)
  next(method.make_train_iterator())
  variables = method.load_init_from(jax.device_get(jax.jit(method.init)(jax.random.key(0))))
  np.testing.assert_array_equal(variables['params']['backbone']['Conv_0']['kernel'],
                                pretrained['params']['backbone']['Conv_0']['kernel'])
  (tmp_path / 'eval').mkdir()
  result = method.finish(variables, str(tmp_path / 'eval'))
  with open(tmp_path / 'eval' / 'eval.json') as f:
    assert json.load(f) == result

  # Reference: predict every test slice, cut the predictions at the scans' depths, Dice each.
  test = [segment.make_source(config.data, 'test')[i]
          for i in range(len(segment.make_source(config.data, 'test')))]
  images, masks = segment.read_split(config, 'test')
  pred = segment.predict(method.model, variables, images, int(config.evaluate.batch_size))
  bounds = np.cumsum([scan.num_slices for scan in test])[:-1]
  assert len({scan.num_slices for scan in test}) > 1
  num_classes = result['num_classes']
  assert [v['scan_id'] for v in result['dice_per_volume']] == [s.scan_id for s in test]
  for volume, p, t in zip(result['dice_per_volume'], np.split(pred, bounds),
                          np.split(masks, bounds)):
    expected = segment.dice(p, t, num_classes)  # over the volume's voxels only
    for c in range(1, num_classes):
      got = volume['dice_per_class'][str(c)]
      assert (got is None) if np.isnan(expected[c]) else got == pytest.approx(expected[c])
  per_class = np.nanmean([[np.nan if v['dice_per_class'][str(c)] is None
                           else v['dice_per_class'][str(c)] for c in range(1, num_classes)]
                          for v in result['dice_per_volume']], axis=0)
  assert [result['volume_dice_per_class'][str(c)] for c in range(1, num_classes)] == (
      pytest.approx(list(per_class)))
  # The Dice over all test pixels stays as it was.
  assert result['dice_mean'] == pytest.approx(np.nanmean(segment.dice(pred, masks,
                                                                      num_classes)[1:]))
