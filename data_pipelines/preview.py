"""A PNG grid of the views the model will see.

  python -m data_pipelines.preview --config=configs/deepset.py --out=views.png \
      [--config.data.source=nifti --config.data.path=DIR] [--scans=4] [--split=any] [--raw]

Rows are the first examples (one scan each) of the stream the config's method trains on, drawn from
--split ('any', the default, is the first of train, val, test that has scans, so a folder whose only
scans are in val/ or test/ still previews). Columns are the K slices of view A, then the K slices of
view B. By default the views are shown augmented by dsset.augment.augment_views at data.image_size,
as the model sees them; with --raw they are the host sampler's uint8 slices before augmentation.
Padded (masked) slices are drawn as an empty, hatched panel.
"""

from __future__ import annotations

import sys

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from data_pipelines import pipeline
from data_pipelines.errors import DataError
from data_pipelines.sources import SPLITS, make_source
from dsset import augment
from dsset.config_validation import ConfigError
from dsset.methods import make_method

SPLIT_CHOICES = ('any', *SPLITS)


def _augment(config, views: np.ndarray) -> np.ndarray:
  """views uint8 [B, 2, K, H, W, C] -> float [B, 2, K, S, S, C] in [0, 1], augmented on device.

  S is data.image_size, the size training crops back to, so the grid shows what the model sees.
  """
  return np.asarray(augment.augment_views(jax.random.key(int(config.seed)),
                                          views.astype(np.float32) / 255.0, config.augment,
                                          int(config.data.image_size)))


def open_split(data_config, split: str):
  """(split name, its source): `split` itself, or for 'any' the first of train/val/test with scans.

  Raises DataError naming why each split could not be used when none has scans.
  """
  if split not in SPLIT_CHOICES:
    raise ValueError(f'split must be one of {SPLIT_CHOICES}, got {split!r}')
  problems = []
  for name in (SPLITS if split == 'any' else (split,)):
    try:
      source = make_source(data_config, name)
    except DataError as error:
      if split != 'any':
        raise
      problems.append(f'{name}: {error}')
      continue
    if len(source):
      return name, source
    problems.append(f'{name}: no scans')
  raise DataError('no split has scans to preview:\n  ' + '\n  '.join(problems))


def preview_rows(config, split: str = 'any', count: int = 4, raw: bool = False):
  """(split used, rows): `count` rows (title, views [2, K, H, W, C] float in [0, 1], mask [2, K]).

  The rows are the first examples of the method's training stream built on that split's scans (for
  the train split, the first rows of the first training batch), augmented unless `raw`.
  """
  config = config.copy_and_resolve_references()
  config.data.num_workers = 0  # one batch: worker start-up would cost more than it saves
  config.train.batch_size = count  # the stream's first examples do not depend on the batch size
  method = make_method(config)
  if not hasattr(method, 'make_sampler'):
    raise ConfigError(f'config key method={config.method!r}: the preview shows the views of a '
                      'pretraining method (simclr, perscan or deepset)')
  name, source = open_split(config.data, split)
  batch = next(pipeline.make_train_iterator(config, method.make_sampler(source),
                                            process_index=0, process_count=1))
  views = batch['views'] / 255.0 if raw else _augment(config, batch['views'])
  titles = [f'{name} {source[int(i)].scan_id}\nlabel {int(label)}'
            for i, label in zip(batch['scan_id'], batch['label'])]
  return name, [(title, views[i], batch['mask'][i]) for i, title in enumerate(titles)]


def write_grid(rows, path: str) -> None:
  """Draws the rows as a grid of greyscale (or RGB) panels and saves a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')  # files only: no display on servers
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  k = rows[0][1].shape[1]
  figure, axes = plt.subplots(len(rows), 2 * k, figsize=(1.6 * 2 * k, 1.7 * len(rows)),
                              squeeze=False)
  for r, (title, views, mask) in enumerate(rows):
    for v in range(2):
      for j in range(k):
        axis = axes[r, v * k + j]
        axis.set_xticks([])
        axis.set_yticks([])
        if mask[v, j]:
          image = np.clip(views[v, j], 0.0, 1.0)
          axis.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap='gray', vmin=0,
                      vmax=1)
        else:
          axis.add_patch(matplotlib.patches.Rectangle((0, 0), 1, 1, hatch='//', fill=False,
                                                      transform=axis.transAxes))
        if r == 0:
          axis.set_title(f'view {"AB"[v]} slice {j + 1}', fontsize=8)
    axes[r, 0].set_ylabel(title, fontsize=7)
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = flags.FLAGS.config
  if config is None:
    raise app.UsageError('--config is required, e.g. --config=configs/deepset.py')
  if flags.FLAGS.scans < 1:
    raise app.UsageError(f'--scans={flags.FLAGS.scans} must be at least 1')
  try:
    split, rows = preview_rows(config, flags.FLAGS.split, flags.FLAGS.scans, flags.FLAGS.raw)
  except (ConfigError, DataError) as e:
    print(f'preview: error: {e}', file=sys.stderr)
    sys.exit(1)
  write_grid(rows, flags.FLAGS.out)
  kind = 'unaugmented (--raw)' if flags.FLAGS.raw else 'augmented'
  print(f'wrote {flags.FLAGS.out}: {len(rows)} examples of the {split} split, {kind}')


def define_flags() -> None:
  """Flags exist only when this module runs as the program, so importing it never clashes."""
  config_flags.DEFINE_config_file('config', None, 'Pretraining config file.')
  flags.DEFINE_string('out', 'preview.png', 'PNG file to write.')
  flags.DEFINE_integer('scans', 4, 'Examples (rows) to show.')
  flags.DEFINE_enum('split', 'any', SPLIT_CHOICES,
                    "Scans to draw from; 'any' is the first of train, val, test that has scans.")
  flags.DEFINE_bool('raw', False,
                    "Show the sampler's slices before augmentation instead of the augmented views.")


if __name__ == '__main__':
  define_flags()
  app.run(main)
