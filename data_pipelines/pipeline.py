"""Config -> Grain pipeline -> iterator of host-local numpy batches (the batch contract).

Training: records (flat slice indices for simclr, scan indices otherwise) are shuffled with
config.seed, repeated forever with a new order each epoch, turned into examples by the method's
sampler, then every host takes every process_count-th example of that one global stream and batches
its share. Because the sampler's randomness is drawn from the position in the global stream, the
union of the hosts' batches is the same whatever the number of hosts, and an iterator restored from
get_state() gives the same next batches. Worker processes (data.num_workers) only prefetch.
"""

from __future__ import annotations

from collections.abc import Iterator

import grain
import numpy as np

from data_pipelines import samplers, sources
from data_pipelines.errors import DataError

EVAL_MODES = ('scan', 'slice')


def _records(config, source, sampler) -> list[int]:
  if isinstance(sampler, samplers.SimclrSampler):
    return list(range(sampler.num_records))
  return list(range(len(source)))


def make_train_dataset(config, *, process_index: int, process_count: int) -> grain.IterDataset:
  """The training IterDataset of one host (see the module docstring)."""
  if config.train.batch_size % process_count:
    raise DataError(f'config key train.batch_size={config.train.batch_size} is not divisible by '
                    f'the {process_count} processes')
  source = sources.make_source(config.data, 'train')
  sampler = samplers.make_sampler(config, source)
  records = _records(config, source, sampler)
  if not records:
    raise DataError(f'no training scans from data.source={config.data.source!r} '
                    f'(data.path={config.data.path!r})')
  dataset = grain.MapDataset.source(records).seed(int(config.seed)).shuffle().repeat()
  if isinstance(sampler, grain.transforms.RandomMap):
    dataset = dataset.random_map(sampler)
  else:
    dataset = dataset.map(sampler)
  dataset = dataset[process_index::process_count]
  dataset = dataset.batch(config.train.batch_size // process_count, drop_remainder=True)
  iter_dataset = dataset.to_iter_dataset()
  if config.data.num_workers > 0:
    iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(config.data.num_workers),
        per_worker_buffer_size=int(config.data.prefetch_buffer)))
  return iter_dataset


def make_train_iterator(config, *, process_index: int | None = None,
                        process_count: int | None = None) -> grain.DatasetIterator:
  """Infinite iterator of host-local training batches; checkpointable with get_state/set_state.

  Each batch: views uint8 [B, 2, K, H, W, C], mask bool [B, 2, K], scan_id int32 [B],
  label int32 [B], with B = train.batch_size // process_count. Process index and count default to
  JAX's.
  """
  if process_index is None or process_count is None:
    import jax  # Imported only here: the data pipeline itself does not need JAX.
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  dataset = make_train_dataset(config, process_index=process_index, process_count=process_count)
  return iter(dataset)


class EvalDataset:
  """A re-iterable stream of evaluation examples of one split (plain Python, no Grain).

  mode 'scan': {'slices': uint8 [n, H, W, C], 'label': int32, 'scan_id': int32} per scan.
  mode 'slice': {'image': uint8 [H, W, C], 'label': int32, 'scan_id': int32} for every slice of
  every labelled scan (the scan's label on each slice; unlabelled scans are left out).
  """

  def __init__(self, source, mode: str, image_size: int, channels: int):
    self.source = source
    self.mode = mode
    self._image_size = image_size
    self._channels = channels

  @property
  def num_classes(self) -> int:
    return self.source.num_classes

  def __iter__(self) -> Iterator[dict]:
    for index in range(len(self.source)):
      scan = self.source[index]
      ids = {'label': np.int32(scan.label), 'scan_id': np.int32(index)}
      if self.mode == 'scan':
        yield {'slices': samplers.scan_slices(scan, self._image_size, self._channels), **ids}
      elif scan.label >= 0:
        for image in samplers.labelled_slices(scan, self._image_size, self._channels):
          yield {'image': image, **ids}


def make_eval_dataset(config, split: str, mode: str) -> EvalDataset:
  """Evaluation examples of `split` ('train' | 'val' | 'test'); mode 'scan' or 'slice'."""
  if mode not in EVAL_MODES:
    raise ValueError(f'mode must be one of {EVAL_MODES}, got {mode!r}')
  source = sources.make_source(config.data, split)
  return EvalDataset(source, mode, int(config.data.image_size), int(config.data.channels))
