"""Scan features from intra-inter clustering's slice transformer (evaluate.scan_features=
'slice_transformer'): the crop-or-pad of a scan's tokens, the volume feature against the method's
own model, the linear probe and kNN on it, the errors for runs without a slice transformer, and
(slow) the command line from an intra_inter pretraining run to the linear probe."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs.intra_inter as intra_inter_config
from configs import finetune, knn_eval, linear_eval
from data_pipelines import samplers
from data_pipelines.sources import make_source
from dsset import augment3d, checkpointing, train
from dsset.config_validation import ConfigError, validate
from dsset.evaluate import features
from dsset.evaluate.slice_transformer_features import (SliceTransformerFeatureExtractor,
                                                       token_stack)
from dsset.methods import make_method
from tests import xla_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fake_intra_inter_run(path, **overrides):
  """A workdir as an intra_inter :stage3,tiny run leaves it (config.json, backbone.msgpack/json,
  slice_transformer.msgpack), with random weights instead of trained ones. Returns (the method,
  its variables)."""
  config = intra_inter_config.get_config('stage3,tiny')
  config.update_from_flattened_dict(overrides)
  method = make_method(config)
  shapes = jax.eval_shape(method.init, jax.random.PRNGKey(0))
  rng = np.random.default_rng(7)
  variables = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
  # Running statistics away from 0 and 1 (variances positive), so that eval mode is tested too.
  variables['batch_stats'] = jax.tree.map(
      lambda s: (0.5 + rng.random(s.shape)).astype(s.dtype), shapes['batch_stats'])
  os.makedirs(path)
  method.finish(variables, str(path))
  with open(os.path.join(path, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  return method, variables


def eval_config(module, init_from, **evaluate):
  config = module.get_config('tiny')
  config.init_from = str(init_from)
  config.evaluate.scan_features = 'slice_transformer'
  # The pretrained run's BatchNorm statistics, as the method's own volume feature uses them.
  config.evaluate.recompute_batch_stats = 'random_init'
  config.evaluate.update(evaluate)
  return config


def test_token_stack_keeps_the_central_slices_or_centres_a_short_scan_among_pad_tokens():
  tokens = np.arange(10 * 2, dtype=np.float32).reshape(10, 2)
  pad = np.array([-1.0, -2.0], np.float32)
  # 10 slices into 6: (10 - 6) // 2 = 2 left out before, 2 after.
  np.testing.assert_array_equal(token_stack(tokens, 6, pad), tokens[2:8])
  # 11 into 6: 5 left out, 2 before and 3 after (rounded down, as TorchIO's CropOrPad).
  long = np.arange(11 * 2, dtype=np.float32).reshape(11, 2)
  np.testing.assert_array_equal(token_stack(long, 6, pad), long[2:8])
  # 3 slices into 8: 5 pad positions, 2 before and 3 after.
  short = tokens[:3]
  expected = np.stack([pad, pad, short[0], short[1], short[2], pad, pad, pad])
  np.testing.assert_array_equal(token_stack(short, 8, pad), expected)
  np.testing.assert_array_equal(token_stack(tokens[:6], 6, pad), tokens[:6])


# The tiny phantom's 12 slices cropped (default) / padded (-m slow: 7 s more).
@pytest.mark.parametrize('num_slices', [8, pytest.param(16, marks=pytest.mark.slow)])
def test_scan_feature_is_the_methods_volume_feature_of_the_central_stack(tmp_path, num_slices):
  method, variables = fake_intra_inter_run(tmp_path / 'pretrain',
                                           **{'data.num_slices': num_slices})
  config = eval_config(linear_eval, tmp_path / 'pretrain')
  extractor = features.make_extractor(config)
  assert isinstance(extractor, SliceTransformerFeatureExtractor)
  assert (extractor.num_slices, extractor.num_features) == (num_slices, 16)  # d_model of :tiny
  levels = extractor.extract_levels(config, 'test')

  # Reference: the method's own model on the stack pretraining would build, centred instead of
  # at a random offset, with zero images on padded positions, and no augmentation.
  scan = make_source(config.data, 'test')[0]
  slices = samplers.scan_slices(scan, config.data.image_size, config.data.channels)
  assert len(slices) == 12
  stack = np.zeros((num_slices, *slices.shape[1:]), np.uint8)
  if num_slices < 12:
    stack[:] = slices[2:10]
  else:
    stack[2:14] = slices
  # Jitted: op by op, the reference alone took 9 s on two CPU cores.
  volume = jax.jit(lambda v, x: method.model.apply(
      v, augment3d.normalise(x[None]), jnp.zeros((1, num_slices), bool), None, train=False,
      train_encoder=False)['volume'][0])(variables, stack)
  first = np.flatnonzero(levels['scan'].scan_ids == 0)[0]
  np.testing.assert_allclose(levels['scan'].features[first], np.asarray(volume), rtol=1e-4,
                             atol=1e-5)
  # Slice level: the ResNet's features of every slice, as every other 2D evaluation has them.
  encode = jax.jit(lambda v, x: method.model.backbone.apply(v, augment3d.normalise(x),
                                                            train=False))
  resnet = encode({c: variables[c]['backbone'] for c in ('params', 'batch_stats')}, slices)
  rows = levels['slice'].scan_ids == 0
  np.testing.assert_allclose(levels['slice'].features[rows], np.asarray(resnet), rtol=1e-4,
                             atol=1e-5)
  assert levels['scan'].features.shape == (len(levels['scan'].labels), 16)


def test_linear_probe_and_knn_read_the_volume_feature(tmp_path):
  method, _ = fake_intra_inter_run(tmp_path / 'pretrain')
  # The stage (objective) is part of the method's name: the comparison keeps stages apart.
  name = f'intra_inter:{method.config.intra_inter.objective}'
  for module in (linear_eval, knn_eval):
    config = eval_config(module, tmp_path / 'pretrain')
    validate(config)
    result = train.train_and_evaluate(config, str(tmp_path / module.__name__),
                                      devices=jax.devices()[:1])
    assert (result['method'], result['scan_features'], result['level']) == (
        name, 'slice_transformer', 'scan')
    assert result['num_features'] == 16  # d_model, not the ResNet's 64
    assert 0 <= result['accuracy'] <= 1 and result['num_examples']['test'] > 0


def test_runs_without_a_slice_transformer_are_one_config_error_naming_key_and_workdir(tmp_path):
  fake_intra_inter_run(tmp_path / 'pretrain')
  with pytest.raises(ConfigError, match=r"evaluate\.scan_features='slice_transformer'.*init_from "
                                        'is empty'):
    features.make_extractor(eval_config(linear_eval, ''))

  # A DS-SimCLR run: an encoder export, no slice transformer.
  other = tmp_path / 'deepset'
  os.makedirs(other)
  for name in (checkpointing.BACKBONE_FILE, checkpointing.BACKBONE_INFO_FILE):
    shutil.copy(tmp_path / 'pretrain' / name, other / name)
  with open(other / 'config.json', 'w') as f:
    json.dump({'method': 'deepset'}, f)
  with pytest.raises(ConfigError) as error:
    train.train_and_evaluate(eval_config(knn_eval, other), str(tmp_path / 'eval'),
                             devices=jax.devices()[:1])
  for named in ('evaluate.scan_features', f'init_from={str(other)!r}', 'slice_transformer.msgpack',
                'a deepset run has none'):
    assert named in str(error.value)

  with pytest.raises(ConfigError, match='PyTorch file holds no slice transformer'):
    features.make_extractor(eval_config(linear_eval, tmp_path / 'resnet.pth'))
  # Fine-tuning trains its head on the mean of slice features: refused by its config check.
  with pytest.raises(ConfigError, match='scan_features'):
    validate(eval_config(finetune, tmp_path / 'pretrain'))


def test_an_export_that_does_not_fit_its_config_is_named(tmp_path):
  fake_intra_inter_run(tmp_path / 'pretrain')
  with open(tmp_path / 'pretrain' / 'config.json') as f:
    run = json.load(f)
  run['data']['num_slices'] = 12  # the position-bias tables were made for T = 8
  with open(tmp_path / 'pretrain' / 'config.json', 'w') as f:
    json.dump(run, f)
  with pytest.raises(ConfigError, match='does not match.*position_bias'):
    features.make_extractor(eval_config(linear_eval, tmp_path / 'pretrain'))


@pytest.mark.slow
def test_cli_intra_inter_pretraining_then_linear_eval_on_its_volume_feature(tmp_path):
  # Two command lines as a user types them; compiling the stage-3 step dominates the time.
  def cli(*args):
    proc = subprocess.run([sys.executable, '-m', 'dsset.main', *args], capture_output=True,
                          text=True, cwd=REPO, check=False,
                          env=dict(os.environ, XLA_FLAGS=xla_env.ONE_DEVICE))
    assert proc.returncode == 0, proc.stderr[-3000:]

  pretrain, evaluation = tmp_path / 'stage3', tmp_path / 'eval'
  cli('--config=configs/intra_inter.py:stage3,tiny', f'--workdir={pretrain}',
      '--config.train.num_steps=2')
  assert (pretrain / checkpointing.SLICE_TRANSFORMER_FILE).exists()
  cli('--config=configs/linear_eval.py:tiny', f'--workdir={evaluation}',
      f'--config.init_from={pretrain}', '--config.evaluate.scan_features=slice_transformer')
  with open(evaluation / 'eval.json') as f:
    result = json.load(f)
  # eval.json names the intra-inter objective the encoder was trained with (stage 3: inter).
  assert (result['method'], result['scan_features'], result['num_features']) == (
      'intra_inter:inter', 'slice_transformer', 16)
  assert 0 <= result['accuracy'] <= 1 and result['num_examples']['test'] > 0
