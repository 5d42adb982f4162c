"""A checkpointable batch iterator over records that are already in memory.

Downstream training (the linear probe on extracted features, fine-tuning and segmentation on decoded
slices) holds its examples in host memory, so Grain's per-element machinery would only add cost (a
full-batch probe step over a thousand features would be a thousand Python calls). This iterator
draws batches with numpy indexing and keeps Grain's contract where the training loop relies on it:
each epoch is a new seeded permutation of the records; process p of n takes block p of every global
batch; and get_state/set_state (bytes, as Grain's checkpoint handler expects of a non-Grain
iterator) restore the exact position, so a resumed run continues with the very next batch.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np

from data_pipelines.errors import DataError

# make_batch(records [b], positions [b]) -> host batch {name: array [b, ...]}. `positions` are the
# examples' places in the global stream: per-example randomness seeded by them is the same whatever
# the number of processes and after a resume.
BatchFn = Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]


class RecordIterator:
  """Endless host-local batches of `make_batch` over a seeded, per-epoch shuffle of the records."""

  def __init__(self, num_records: int, global_batch_size: int, make_batch: BatchFn, seed: int,
               process_index: int = 0, process_count: int = 1):
    if num_records < 1:
      raise ValueError('RecordIterator needs at least one record')
    if global_batch_size % process_count:
      raise ValueError(f'global batch {global_batch_size} does not split over {process_count} '
                       'processes')
    self._num_records = num_records
    self._global_batch_size = global_batch_size
    self._local_batch_size = global_batch_size // process_count
    self._make_batch = make_batch
    self._seed = seed
    self._process_index = process_index
    self._batches_done = 0
    self._epoch_order = (-1, np.empty(0, np.int64))

  def _records_at(self, positions: np.ndarray) -> np.ndarray:
    epochs, offsets = np.divmod(positions, self._num_records)
    records = np.empty_like(positions)
    for epoch in np.unique(epochs):
      if self._epoch_order[0] != epoch:
        order = np.random.default_rng([self._seed, int(epoch)]).permutation(self._num_records)
        self._epoch_order = (int(epoch), order)
      chosen = epochs == epoch
      records[chosen] = self._epoch_order[1][offsets[chosen]]
    return records

  def __iter__(self) -> 'RecordIterator':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    first = (self._batches_done * self._global_batch_size
             + self._process_index * self._local_batch_size)
    positions = np.arange(first, first + self._local_batch_size, dtype=np.int64)
    self._batches_done += 1
    return self._make_batch(self._records_at(positions), positions)

  def get_state(self) -> bytes:
    return json.dumps({'batches_done': self._batches_done, 'seed': self._seed,
                       'num_records': self._num_records}).encode()

  def set_state(self, state: bytes) -> None:
    saved = json.loads(state)
    if (saved['seed'], saved['num_records']) != (self._seed, self._num_records):
      raise DataError(f'the checkpointed data position belongs to {saved["num_records"]} records '
                       f'with seed {saved["seed"]}, not {self._num_records} with seed '
                       f'{self._seed}: the data changed since the checkpoint')
    self._batches_done = int(saved['batches_done'])

  def start_prefetch(self) -> None:
    """Called by Grain's checkpoint handler after a restore; batches are made on demand."""
