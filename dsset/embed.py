"""Embeddings of every scan: python -m dsset.embed --workdir=PRETRAIN_DIR --out=emb.npz
[--config=configs/linear_eval.py] [--config.<key>=<value>].

Encodes every slice of every scan of the train, val and test splits with the frozen encoder of
PRETRAIN_DIR (eval-mode BatchNorm) and writes an .npz with, per level:
  slice_features [S, D], slice_labels [S], slice_scan_ids [S], slice_splits [S]
  scan_features  [N, D], scan_labels  [N], scan_ids       [N], scan_splits  [N]
Scan features are the mean of the scan's slice features (as in dsset.evaluate); labels are -1 for
unlabelled scans; scan ids index the scans of their split's source; splits are 'train'|'val'|'test'.
The data section comes from --config (default: configs/base.py), the encoder's model from
PRETRAIN_DIR/backbone.json.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

import configs
from data_pipelines.errors import DataError
from dsset import main as train_main
from dsset import train
from dsset.config_validation import ConfigError
from dsset.evaluate import features

SPLITS = ('train', 'val', 'test')


def embed(config, out: str) -> dict[str, np.ndarray]:
  """Writes the embeddings of config.init_from's encoder to `out` (.npz); returns the arrays."""
  if not config.init_from:
    raise ConfigError('no encoder to embed with: pass --workdir=<pretraining workdir>')
  train.enable_compilation_cache()
  extractor = features.make_extractor(config)
  per_split = {split: features.extract_levels(config, extractor, split, labelled_only=False)
               for split in SPLITS}
  arrays = {}
  for level, ids_name in (('slice', 'slice_scan_ids'), ('scan', 'scan_ids')):
    parts = [per_split[split][level] for split in SPLITS]
    arrays[f'{level}_features'] = np.concatenate([p.features for p in parts])
    arrays[f'{level}_labels'] = np.concatenate([p.labels for p in parts])
    arrays[ids_name] = np.concatenate([p.scan_ids for p in parts])
    arrays[f'{level}_splits'] = np.concatenate(
        [np.full(len(p.labels), split) for split, p in zip(SPLITS, parts)])
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  np.savez(out, **arrays)
  return arrays


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)
  config = train_main.load_config_or_exit()
  config.init_from = flags.FLAGS.workdir
  try:
    arrays = embed(config, flags.FLAGS.out)
  except (ConfigError, DataError) as e:
    print(f'dsset: error: {e}', file=sys.stderr)
    sys.exit(1)
  print(f'{len(arrays["scan_ids"])} scans, {len(arrays["slice_scan_ids"])} slices, '
        f'{arrays["scan_features"].shape[1]} features -> {flags.FLAGS.out}')


def define_flags() -> None:
  config_flags.DEFINE_config_file(
      'config', os.path.join(os.path.dirname(configs.__file__), 'base.py'),
      'Config whose data section picks the scans (default configs/base.py).', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Pretraining workdir holding backbone.msgpack.')
  flags.DEFINE_string('out', None, 'The .npz file to write.')
  flags.mark_flags_as_required(['workdir', 'out'])


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=train_main.parse_flags)
