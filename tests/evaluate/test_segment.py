"""Segmentation evaluation: Dice, the U-Net decoder, and a tiny end-to-end run on the phantom."""

import dataclasses
import json
import os

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import segment as segment_config
from data_pipelines.errors import DataError
from dsset import parallel, train
from dsset.evaluate import segment
from dsset.methods import make_method
from dsset.models import ResNet10, unet
from tests.evaluate.test_eval_run import _fake_pretraining_run, tiny_eval_config


def test_dice_is_one_for_a_perfect_prediction_and_zero_for_a_disjoint_one():
  target = np.array([[0, 1, 1], [2, 2, 0]])
  np.testing.assert_array_equal(segment.dice(target, target, 3), [1.0, 1.0, 1.0])
  disjoint = np.array([[1, 2, 2], [0, 0, 1]])  # no pixel keeps its class
  np.testing.assert_array_equal(segment.dice(disjoint, target, 3), [0.0, 0.0, 0.0])


def test_dice_partial_overlap_and_the_empty_empty_convention():
  target = np.array([1, 1, 1, 0, 0, 0])
  pred = np.array([1, 1, 0, 0, 0, 1])
  # Class 1: overlap 2, |P| = 3, |T| = 3 -> 4/6. Class 0: overlap 2, 3 + 3 -> 4/6.
  # Class 2 is in neither: undefined (nan), not a free 1.
  scores = segment.dice(pred, target, 3)
  np.testing.assert_allclose(scores[:2], [2 / 3, 2 / 3])
  assert np.isnan(scores[2])


def test_soft_dice_loss_is_zero_for_confident_correct_logits():
  target = jnp.array([[0, 1], [1, 2]])
  logits = 50.0 * jax.nn.one_hot(target, 4)  # class 3 absent: left out, not counted as failed
  assert float(segment.soft_dice_loss(logits, target, 4)) == pytest.approx(0.0, abs=1e-6)
  assert float(segment.soft_dice_loss(-logits, target, 4)) > 0.9


def test_mask_resize_keeps_ids():
  mask = np.array([[0, 5], [3, 0]], np.uint8)
  np.testing.assert_array_equal(segment.resize_mask(mask, 4),
                                np.kron(mask, np.ones((2, 2), int)))


@pytest.mark.parametrize('small_stem, size', [(False, 32), (True, 32), (False, 48)])
def test_decoder_logits_have_the_input_resolution(small_stem, size):
  model = unet.SegmentationModel(ResNet10(small_stem=small_stem, width_multiplier=0.125),
                                 num_classes=6)
  logits, variables = jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), jnp.zeros((2, size, size, 1)), train=False))
  assert logits.shape == (2, size, size, 6)
  assert set(variables['params']) == {*unet.ENCODER_PATH, 'decoder'}


def tiny_segment_config(**evaluate):
  config = tiny_eval_config(segment_config, **evaluate)
  config.train.update(num_steps=5, batch_size=8, learning_rate=3e-3)
  return config


def test_segmentation_run_writes_dice_and_plots(tmp_path):
  # (The frozen-encoder phase has its own test: one compiled step here.)
  result = train.train_and_evaluate(tiny_segment_config(label_fraction=0.5), str(tmp_path),
                                    devices=jax.devices()[:1])
  with open(tmp_path / 'eval.json') as f:
    written = json.load(f)
  assert written == result
  assert set(written['dice_per_class']) == {'1', '2', '3', '4', '5'}  # phantom mask ids
  assert 0 <= written['dice_mean'] <= 1 and 0 <= written['dice_background'] <= 1
  assert (written['kind'], written['method'], written['label_fraction']) == (
      'segment', 'random init', 0.5)
  # Half of the 8 train scans (8 slices each); the 4 test scans in full.
  assert written['num_examples'] == {'train': 4 * 8, 'test': 4 * 8}
  for name in segment.PLOT_FILES.values():
    assert os.path.getsize(tmp_path / name) > 1000


def _initial_variables(config):
  method = make_method(config)
  next(method.make_train_iterator())
  variables = jax.device_get(jax.jit(method.init)(jax.random.key(0)))
  return method.load_init_from(variables) if config.init_from else variables


def test_init_from_inserts_the_pretrained_encoder(tmp_path):
  config = tiny_segment_config()
  _fake_pretraining_run(tmp_path / 'pretrain', config)
  config.init_from = str(tmp_path / 'pretrain')
  variables = _initial_variables(config)
  with open(tmp_path / 'pretrain' / 'backbone.msgpack', 'rb') as f:
    exported = flax.serialization.msgpack_restore(f.read())
  np.testing.assert_array_equal(variables['params']['backbone']['Conv_0']['kernel'],
                                exported['params']['Conv_0']['kernel'])
  np.testing.assert_array_equal(
      variables['batch_stats']['backbone']['BatchNorm_0']['mean'],
      exported['batch_stats']['BatchNorm_0']['mean'])
  # Without init_from the encoder is a different random draw: the equality above is the insertion.
  random_init = _initial_variables(tiny_segment_config())
  assert not np.array_equal(random_init['params']['backbone']['Conv_0']['kernel'],
                            exported['params']['Conv_0']['kernel'])


def test_frozen_encoder_steps_leave_the_encoder_unchanged(tmp_path):
  """evaluate.segment_freeze_steps: AdamW's decay must not move the frozen encoder either."""
  config = tiny_segment_config(segment_freeze_steps=2)
  config.train.num_steps = 2
  method = make_method(config)
  tuned = train._train(config, method, str(tmp_path), parallel.make_mesh(jax.devices()[:1]),
                       method.make_train_iterator())
  start = jax.device_get(jax.jit(train.Trainer(config, method).init_state)(
      jax.random.PRNGKey(config.seed)))
  jax.tree.map(np.testing.assert_array_equal, start['params']['backbone'],
               tuned['params']['backbone'])
  jax.tree.map(np.testing.assert_array_equal, start['batch_stats']['backbone'],
               tuned['batch_stats']['backbone'])
  assert not np.array_equal(start['params']['decoder']['Conv_0']['kernel'],
                            tuned['params']['decoder']['Conv_0']['kernel'])


def test_a_source_without_masks_is_one_data_error(monkeypatch):
  scan = segment.make_source(tiny_segment_config().data, 'train')[0]
  unmasked = dataclasses.replace(scan, mask=None)

  class Unmasked:
    def __len__(self):
      return 1

    def __getitem__(self, index):
      return unmasked

  monkeypatch.setattr(segment, 'make_source', lambda data, split: Unmasked())
  with pytest.raises(DataError, match='no voxel mask'):
    segment.read_split(tiny_segment_config(), 'train')
