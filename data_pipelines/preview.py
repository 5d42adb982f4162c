"""A PNG grid of training views, to see what the model sees.

  python -m data_pipelines.preview --config=configs/deepset.py --out=views.png \
      [--config.data.source=nifti --config.data.path=DIR] [--scans=4] [--augmented]

Rows are examples of the first training batch (one scan each); columns are the K slices of view A,
then the K slices of view B, as the host sampler emits them (uint8, before device augmentation).
With --augmented, a second row per example shows the views after dsset.augment.augment_views.
Padded (masked) slices are drawn as an empty, hatched panel.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from dsset import augment
from dsset.methods import make_method


def _augment(config, views: np.ndarray) -> np.ndarray:
  """views uint8 [B, 2, K, H, W, C] -> float [B, 2, K, S, S, C] in [0, 1], augmented on device.

  S is data.image_size, the size training crops back to, so the grid shows what the model sees.
  """
  return np.asarray(augment.augment_views(jax.random.key(int(config.seed)),
                                          views.astype(np.float32) / 255.0, config.augment,
                                          int(config.data.image_size)))


def _rows(config, batch: dict) -> list[tuple[str, np.ndarray, np.ndarray]]:
  """(title, views [2, K, H, W, C] float in [0, 1], mask [2, K]) for every row of the grid."""
  count = min(flags.FLAGS.scans, batch['views'].shape[0])
  views, mask = batch['views'][:count], batch['mask'][:count]
  rows = [(f'scan {batch["scan_id"][i]} label {batch["label"][i]}', views[i] / 255.0, mask[i])
          for i in range(count)]
  if not flags.FLAGS.augmented:
    return rows
  augmented = _augment(config, views)
  return [row for i, plain in enumerate(rows)
          for row in (plain, (plain[0] + ' augmented', augmented[i], mask[i]))]


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
  config.data.num_workers = 0  # one batch: worker start-up would cost more than it saves
  batch = next(make_method(config).make_train_iterator())
  write_grid(_rows(config, batch), flags.FLAGS.out)
  print(f'wrote {flags.FLAGS.out}')


def define_flags() -> None:
  """Flags exist only when this module runs as the program, so importing it never clashes."""
  config_flags.DEFINE_config_file('config', None, 'Pretraining config file.')
  flags.DEFINE_string('out', 'preview.png', 'PNG file to write.')
  flags.DEFINE_integer('scans', 4, 'Examples (rows) to show.')
  flags.DEFINE_bool('augmented', False,
                    'Also show the views after on-device augmentation.')


if __name__ == '__main__':
  define_flags()
  app.run(main)
