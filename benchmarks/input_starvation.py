"""Does the input pipeline starve the training step? (speed issue, item 4)

Times the real DS-SimCLR training step, in one process and with one jitted step, over two sources:
  phantom  generated phantom scans (64 px slices, shipped at 64 px),
  nifti    .nii.gz scans written on the fly, 256 px slices shipped at augment.crop_source_size
           (decoded volumes cached, the steady state of training; the first pass that fills the
           cache is not timed).
Each source is timed twice: `fixed`, its first batch already on the device and reused every step
(the pipeline costs nothing), then fed by the real Grain pipeline. The baseline is per source
because the ship size sets the device's crop cost. Prints one JSON line per (source, feed) with
the median step time and its ratio to that source's `fixed`; a ratio near 1 means the pipeline
keeps up.

  python -m benchmarks.input_starvation [--steps=10] [--workers=0] [--image_size=64]
"""

import functools
import json
import pathlib
import platform
import statistics
import tempfile
import time

import jax
import nibabel as nib
import numpy as np
from absl import app, flags

from benchmarks.timing import step_seconds
from configs import deepset
from data_pipelines.sources import make_source
from dsset import parallel
from dsset.methods import make_method
from dsset.train import Trainer

_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per feed (after 3 warm-up steps).')
_WORKERS = flags.DEFINE_integer('workers', 0, 'Grain worker processes for the real pipelines.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 64, 'data.image_size.')
_NIFTI_SHAPE = (96, 256, 256)  # slices x rows x columns of each written scan
_NIFTI_SCANS = 12


def _write_nifti(folder: pathlib.Path) -> None:
  rng = np.random.default_rng(0)
  d, h, w = _NIFTI_SHAPE
  zz, yy, xx = np.meshgrid(np.linspace(-1, 1, d), np.linspace(-1, 1, h), np.linspace(-1, 1, w),
                           indexing='ij')
  body = (yy**2 + xx**2 < 0.8).astype(np.float32)
  for i in range(_NIFTI_SCANS):
    blob = ((zz - rng.uniform(-.5, .5))**2 + yy**2 + (xx - .3)**2 < rng.uniform(.05, .2))
    volume = -1000 + 1040 * body + 200 * blob + rng.normal(0, 20, body.shape)
    # Stored as (x, y, z) with z the axial slice axis, as scanners write them.
    image = nib.Nifti1Image(np.transpose(volume, (2, 1, 0)).astype(np.int16), np.diag([.8, .8, 2.5, 1]))
    nib.save(image, folder / f'scan_{i:02d}.nii.gz')


def _config(source: str, path: str = ''):
  config = deepset.get_config()
  config.data.source = source
  config.data.path = path
  config.data.image_size = _IMAGE_SIZE.value
  config.data.num_workers = _WORKERS.value
  config.data.val_fraction = 0.0
  config.data.test_fraction = 0.0
  config.data.cache_dir = str(pathlib.Path(path or tempfile.gettempdir()) / '.bench_cache')
  return config


def main(argv):
  del argv
  mesh = parallel.make_mesh()
  with tempfile.TemporaryDirectory() as tmp:
    folder = pathlib.Path(tmp)
    _write_nifti(folder)
    feeds = {'phantom': _config('phantom'), 'nifti': _config('nifti', str(folder))}
    # Fill the decoded-volume cache once, as the first epoch of a training run does.
    source = make_source(feeds['nifti'].data, 'train')
    for i in range(len(source)):
      source[i]
    config = feeds['phantom']
    trainer = Trainer(config, make_method(config))
    state = jax.jit(trainer.init_state)(jax.random.PRNGKey(0))
    step = jax.jit(functools.partial(trainer.train_step, phase=None), donate_argnums=0)

    def run(batch_fn):
      nonlocal state
      def one():
        nonlocal state
        state, metrics, _ = step(state, batch_fn())
        jax.block_until_ready(metrics)
      return step_seconds(one, warmup=3, steps=_STEPS.value)

    images = config.train.batch_size * trainer.method.images_per_example()
    for name, feed_config in feeds.items():
      iterator = make_method(feed_config).make_train_iterator()
      fixed = parallel.global_batch(next(iterator), mesh)
      # Each lambda runs to completion inside this iteration, so it sees this source's batches.
      results = {'fixed': run(lambda: fixed),
                 'pipeline': run(lambda: parallel.global_batch(next(iterator), mesh))}
      base = statistics.median(results['fixed'])
      for feed, times in results.items():
        median = statistics.median(times)
        print(json.dumps({
            'benchmark': 'input_starvation', 'source': name, 'feed': feed,
            'step_ms_median': round(1e3 * median, 1), 'ratio_to_fixed': round(median / base, 3),
            'images_per_step': images, 'slices_per_s_consumed': round(images / median, 1),
            'ship_size': int(fixed['views'].shape[-2]),
            'workers': _WORKERS.value, 'image_size': _IMAGE_SIZE.value,
            'backend': jax.default_backend(),
            'machine': f'{platform.machine()} {platform.processor() or ""}'.strip(),
            'time': time.strftime('%Y-%m-%dT%H:%M:%S')}), flush=True)


if __name__ == '__main__':
  app.run(main)
