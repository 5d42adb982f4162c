"""The preview command as a user runs it."""

import os
import pathlib
import subprocess
import sys

from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[2]

TINY_DATA = [
    '--config.data.image_size=32', '--config.data.phantom.num_scans=16',
    '--config.data.phantom.depth=12', '--config.data.phantom.height=32',
    '--config.data.phantom.width=32', '--config.data.set_size=2', '--config.train.batch_size=4',
]


def test_augmented_preview_writes_a_row_per_example_and_augmentation(tmp_path):
  out = tmp_path / 'views.png'
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)  # one CPU device, as a user's laptop has
  result = subprocess.run(
      [sys.executable, '-m', 'data_pipelines.preview', '--config=configs/deepset.py',
       f'--out={out}', '--scans=2', '--augmented', *TINY_DATA],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
  )
  assert result.returncode == 0, result.stderr
  with Image.open(out) as image:
    assert image.format == 'PNG'
    # write_grid gives each row 1.7 inches at 100 dpi: 2 examples, each plain and augmented.
    assert image.height == 4 * 170
