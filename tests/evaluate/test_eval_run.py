"""End-to-end evaluation runs on a tiny phantom with a tiny encoder."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import finetune, knn_eval, linear_eval
from dsset import checkpointing, embed, parallel, train
from dsset.config_validation import ConfigError
from dsset.evaluate import features
from dsset.methods import make_method
from dsset.methods.contrastive import DeepSetMethod
from dsset.methods.downstream import classification_plots


def tiny_eval_config(module, **evaluate):
  """The config file's :tiny variant with 8-slice scans; evaluate.* keys overridden."""
  c = module.get_config('tiny')
  c.data.phantom.depth = 8
  for key, value in evaluate.items():
    c.evaluate[key] = value
  return c


def evaluate(config, workdir):
  return train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])


def test_linear_eval_random_init_writes_results_and_plots(tmp_path):
  result = evaluate(tiny_eval_config(linear_eval, label_fraction=0.5), str(tmp_path))
  with open(tmp_path / 'eval.json') as f:
    written = json.load(f)
  assert written == result
  for key in ('accuracy', 'balanced_accuracy', 'auc'):
    assert 0 <= written[key] <= 1
  assert written['method'] == 'random init'
  assert (written['kind'], written['level'], written['label_fraction']) == ('linear', 'scan', 0.5)
  assert (written['recompute_batch_stats'], written['batch_stats_recomputed']) == ('always', True)
  assert written['weight_decay'] in tiny_eval_config(linear_eval).evaluate.weight_decays
  # Half of the train scans, stratified: every class keeps at least one.
  assert 0 < written['num_examples']['train'] < 16
  for name in classification_plots('test').values():
    assert os.path.getsize(tmp_path / name) > 1000


def _fake_pretraining_run(path, config):
  """A workdir with a backbone export and a config.json naming the method, as dsset.main leaves."""
  os.makedirs(path)
  variables = features.FeatureExtractor(config).variables  # a random-init encoder
  checkpointing.export_backbone(str(path), variables, (), config.model)
  with open(path / 'config.json', 'w') as f:
    json.dump({'method': 'perscan'}, f)


def test_knn_slice_eval_loads_the_pretrained_encoder(tmp_path):
  config = tiny_eval_config(knn_eval, level='slice')
  _fake_pretraining_run(tmp_path / 'pretrain', config)
  config.init_from = str(tmp_path / 'pretrain')
  config.evaluate.recompute_batch_stats = 'random_init'
  result = evaluate(config, str(tmp_path / 'eval'))
  assert (result['method'], result['kind'], result['level']) == ('perscan', 'knn', 'slice')
  assert not result['batch_stats_recomputed']  # a pretrained encoder keeps its statistics
  # Slice level: every slice of every labelled test scan is an example.
  assert result['num_examples']['test'] % 8 == 0 and result['num_examples']['test'] > 0
  # No probe training, so no probe curve.
  assert not os.path.exists(tmp_path / 'eval' / classification_plots('test')['curve'])

  config.model.width_multiplier = 0.25  # ignored: the architecture comes from backbone.json
  assert evaluate(config, str(tmp_path / 'eval2'))['num_features'] == result['num_features']


def test_bad_evaluate_key_is_one_config_error(tmp_path):
  with pytest.raises(ConfigError, match='evaluate.level'):
    evaluate(tiny_eval_config(linear_eval, level='volume'), str(tmp_path))


def test_cli_reports_a_missing_pretraining_run_in_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'dsset.main', '--config=configs/linear_eval.py',
       f'--workdir={tmp_path / "eval"}', f'--config.init_from={tmp_path / "missing"}'],
      capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
          os.path.abspath(__file__)))), check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().count('\n') == 0
  assert 'init_from' in proc.stderr and 'backbone.msgpack' in proc.stderr


def test_finetune_trains_the_encoder_and_reports_on_test(tmp_path):
  config = tiny_eval_config(finetune, label_fraction=0.5)
  config.train.update(num_steps=3, batch_size=8, learning_rate=1e-2)
  config.data.set_size = 2
  method = make_method(config)
  mesh = parallel.make_mesh(jax.devices()[:1])
  tuned = train._train(config, method, str(tmp_path / 'direct'), mesh,
                       method.make_train_iterator())
  start = jax.device_get(jax.jit(train.Trainer(config, method).init_state)(
      jax.random.PRNGKey(config.seed)))
  assert tuned['params']['head']['kernel'].shape == (method._backbone.num_features, 4)
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), start['params']['backbone'],
                         tuned['params']['backbone'])
  assert all(jax.tree.leaves(changed))  # every encoder weight moved

  # What the loop does next (the command line's run is in tests/reliability).
  result = method.finish(tuned, str(tmp_path / 'direct'))
  assert (result['kind'], result['label_fraction']) == ('finetune', 0.5)
  assert 0 <= result['accuracy'] <= 1 and result['num_examples']['test'] > 0
  assert os.path.getsize(tmp_path / 'direct' / classification_plots('test')['curve']) > 1000


def test_embed_writes_slice_and_scan_embeddings_of_every_split(tmp_path):
  config = tiny_eval_config(linear_eval)
  _fake_pretraining_run(tmp_path / 'pretrain', config)
  config.init_from = str(tmp_path / 'pretrain')
  embed.embed(config, str(tmp_path / 'emb.npz'))
  arrays = np.load(tmp_path / 'emb.npz')
  assert arrays['scan_features'].shape[0] == 16  # every phantom scan, across the three splits
  assert arrays['slice_features'].shape[0] == 16 * 8
  assert set(arrays['scan_splits']) == {'train', 'val', 'test'}
  # A scan's feature is the mean of its slices' features.
  first = (arrays['slice_splits'] == arrays['scan_splits'][0]) & (
      arrays['slice_scan_ids'] == arrays['scan_ids'][0])
  np.testing.assert_allclose(arrays['slice_features'][first].mean(0), arrays['scan_features'][0],
                             rtol=1e-5, atol=1e-6)


def _np_rho(params, stats, pooled):
  """rho = Dense - BatchNorm (running statistics) - ReLU - Dense, written out in numpy."""
  h = pooled @ params['rho_hidden']['kernel'] + params['rho_hidden']['bias']
  norm, bn = params['rho_norm'], stats['rho_norm']
  h = (h - bn['mean']) / np.sqrt(bn['var'] + 1e-5) * norm['scale'] + norm['bias']
  return np.maximum(h, 0) @ params['rho_out']['kernel'] + params['rho_out']['bias']


def test_scan_features_from_the_pretrained_set_encoder(tmp_path):
  # A DS-SimCLR run with rho, exported as dsset.main exports it: the scan feature must be
  # rho(sum of the scan's slice features) with the exported rho, not the mean.
  config = tiny_eval_config(linear_eval, scan_features='set_encoder')
  config.method, config.model.rho, config.model.pooling = 'deepset', True, 'sum'
  config.model.head_hidden, config.model.head_out = 16, 8
  method = DeepSetMethod(config)
  variables = jax.device_get(jax.jit(method.init)(jax.random.key(3)))
  # Running statistics away from their initial values, so that using them is tested too.
  stats = variables['batch_stats']['set_encoder']['rho_norm']
  stats['mean'] = np.random.default_rng(0).normal(size=stats['mean'].shape).astype(np.float32)
  stats['var'] = np.full_like(stats['var'], 4.0)
  path = tmp_path / 'pretrain'
  os.makedirs(path)
  checkpointing.export_backbone(str(path), variables, method.encoder_path, config.model,
                                method.set_encoder_path)
  with open(path / 'config.json', 'w') as f:
    json.dump({'method': 'deepset'}, f)
  config.init_from = str(path)

  embed.embed(config, str(tmp_path / 'emb.npz'))
  arrays = np.load(tmp_path / 'emb.npz')
  first = (arrays['slice_splits'] == arrays['scan_splits'][0]) & (
      arrays['slice_scan_ids'] == arrays['scan_ids'][0])
  expected = _np_rho(variables['params']['set_encoder'], variables['batch_stats']['set_encoder'],
                     arrays['slice_features'][first].sum(0))
  np.testing.assert_allclose(arrays['scan_features'][0], expected, rtol=1e-4, atol=1e-4)
  assert not np.allclose(arrays['scan_features'][0], arrays['slice_features'][first].mean(0))

  config.method = 'linear'  # the probe, on the DS-SimCLR run made above
  result = evaluate(config, str(tmp_path / 'eval'))
  assert (result['method'], result['scan_features']) == ('deepset', 'set_encoder')


def test_set_encoder_scan_features_need_a_set_encoder_export(tmp_path):
  config = tiny_eval_config(linear_eval, scan_features='set_encoder')
  _fake_pretraining_run(tmp_path / 'pretrain', config)  # an export without set_encoder.msgpack
  config.init_from = str(tmp_path / 'pretrain')
  with pytest.raises(ConfigError, match='set_encoder.msgpack'):
    evaluate(config, str(tmp_path / 'eval'))
  with pytest.raises(ConfigError, match='scan_features'):
    evaluate(tiny_eval_config(finetune, scan_features='set_encoder'), str(tmp_path / 'ft'))
