"""`configs` is installed with dsset, so the commands work from any directory, not only the repo's."""

import os
import subprocess
import sys

import numpy as np

from configs import base
from dsset import checkpointing
from dsset.evaluate import features
from tests import xla_env

TINY_DATA = {
    'data.image_size': 32, 'data.phantom.num_scans': 16, 'data.phantom.depth': 8,
    'data.phantom.height': 32, 'data.phantom.width': 32,
}


def _fake_pretraining_run(path):
  """A workdir with a random-init tiny encoder, exported as dsset.main exports a trained one."""
  config = base.get_config()
  config.update_from_flattened_dict(TINY_DATA)
  config.model.backbone = 'resnet10'
  config.model.width_multiplier = 0.125
  os.makedirs(path)
  checkpointing.export_backbone(str(path), features.FeatureExtractor(config).variables, (),
                                config.model)


def test_embed_runs_outside_the_repository_with_its_default_config(tmp_path):
  _fake_pretraining_run(tmp_path / 'pretrain')
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  env = dict(os.environ)
  env['XLA_FLAGS'] = xla_env.ONE_DEVICE  # one CPU device, as a user's laptop has
  env.pop('PYTHONPATH', None)  # only the installed package can provide `configs`
  result = subprocess.run(
      [sys.executable, '-m', 'dsset.embed', f'--workdir={tmp_path / "pretrain"}',
       f'--out={tmp_path / "emb.npz"}', '--config.evaluate.batch_size=32',
       *(f'--config.{key}={value}' for key, value in TINY_DATA.items())],
      cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300,
  )
  assert result.returncode == 0, result.stderr
  arrays = np.load(tmp_path / 'emb.npz')
  assert arrays['scan_features'].shape[0] == 16  # every phantom scan, across the three splits
  assert arrays['slice_features'].shape[0] == 16 * 8
