"""Input pipeline throughput: DS-SimCLR sets read from .nii.gz scans of 128 x 256 x 256.

Writes a few scans to a temporary folder, then prints JSON lines:
- nifti_cache: random single-slice reads straight from the .nii.gz (nibabel decompresses up to the
  slice each time), the first access (decode, orient, normalise, write the cache entry) and cached
  reads from the memory map, in slices/s;
- input_pipeline: slices/s delivered by the deepset training iterator (views of B x 2 x K slices,
  resized to data.image_size) with 0 and 2 Grain worker processes, cache warm.

  python -m benchmarks.input_pipeline [--scans=4] [--batches=15]
"""

import json
import pathlib
import platform
import tempfile
import time

import nibabel as nib
import numpy as np
from absl import app, flags

from configs import deepset
from data_pipelines.sources import nifti
from dsset.methods import make_method

_SCANS = flags.DEFINE_integer('scans', 4, 'Number of .nii.gz scans to write.')
_BATCHES = flags.DEFINE_integer('batches', 15, 'Timed batches per worker setting.')
_WORKERS = flags.DEFINE_list('workers', ['0', '2'], 'Grain worker counts to time.')

SHAPE = (256, 256, 128)  # x, y, z: 128 axial slices of 256 x 256


def _machine() -> str:
  return f'{platform.machine()} {platform.processor() or platform.platform()}, {_cpu_count()} cpus'


def _cpu_count() -> int:
  import os  # pylint: disable=g-import-not-at-top
  return os.cpu_count() or 0


def _print(record: dict) -> None:
  print(json.dumps({**record, 'machine': _machine()}), flush=True)


def _write_scans(folder: pathlib.Path, count: int) -> None:
  rng = np.random.default_rng(0)
  affine = np.diag([0.8, 0.8, 2.0, 1.0])
  for i in range(count):
    # Smooth anatomy plus noise, so gzip sees realistic (not random) data.
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE[::-1]), indexing='ij')
    body = (x ** 2 + y ** 2 < 0.8 + 0.1 * np.sin(3 * z + i)) * 1040.0 - 1000.0
    hu = body + rng.normal(0, 20, size=body.shape)
    nib.save(nib.Nifti1Image(hu.transpose(2, 1, 0).astype(np.int16), affine),
             str(folder / f'scan{i}.nii.gz'))


def _time_slices(read, count: int) -> float:
  start = time.perf_counter()
  for _ in range(count):
    read()
  return count / (time.perf_counter() - start)


def _cache_benchmark(config, folder: pathlib.Path) -> None:
  rng = np.random.default_rng(1)
  proxy = nib.load(str(folder / 'scan0.nii.gz')).dataobj
  direct = _time_slices(lambda: np.asarray(proxy[:, :, rng.integers(SHAPE[2])]), 10)
  source = nifti.make_source(config.data, 'train')
  start = time.perf_counter()
  for i in range(len(source)):
    source[i].volume[0]
  first = len(source) / (time.perf_counter() - start)
  cached = _time_slices(
      lambda: np.asarray(source[rng.integers(len(source))].volume[rng.integers(128)],
                         dtype=np.float32), 2000)
  _print({'benchmark': 'nifti_cache', 'nibabel_gz_slices_per_s': round(direct, 1),
          'first_access_slices_per_s': round(first, 2), 'cached_slices_per_s': round(cached, 1)})


def _pipeline_benchmark(config, workers: int) -> None:
  config.data.num_workers = workers
  iterator = make_method(config).make_train_iterator()
  next(iterator)  # start-up (worker processes, first prefetch) is not throughput
  start = time.perf_counter()
  for _ in range(_BATCHES.value):
    batch = next(iterator)
  seconds = time.perf_counter() - start
  slices = _BATCHES.value * int(batch['mask'].size)
  _print({'benchmark': 'input_pipeline', 'sampler': 'deepset', 'workers': workers,
          'slices_per_s': round(slices / seconds, 1), 'batches': _BATCHES.value,
          'batch_size': config.train.batch_size, 'set_size': config.data.set_size,
          'image_size': config.data.image_size, 'read_threads': config.data.read_threads})


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    folder = pathlib.Path(tmp) / 'scans'
    folder.mkdir()
    _write_scans(folder, _SCANS.value)
    config = deepset.get_config()
    config.data.source = 'nifti'
    config.data.path = str(folder)
    config.data.cache_dir = str(pathlib.Path(tmp) / 'cache')
    config.data.val_fraction = config.data.test_fraction = 0.0
    config.data.image_size = 128  # the paper's resolution
    _cache_benchmark(config, folder)
    for workers in _WORKERS.value:
      _pipeline_benchmark(config, int(workers))


if __name__ == '__main__':
  app.run(main)
