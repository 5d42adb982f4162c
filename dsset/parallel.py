"""Device mesh, shardings and global arrays for data-parallel training.

The training step is written as single-device code over the global batch; jax.jit with a batch
sharding on the 'data' mesh axis makes XLA insert the collectives. That is why negatives of the
contrastive loss and BatchNorm statistics are global across devices without any explicit psum.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'


def make_mesh(devices=None) -> Mesh:
  """A 1D mesh over all (or the given) devices of all processes."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  """The global batch must split evenly over devices and processes."""
  devices = mesh.devices.size
  if global_batch_size % devices:
    from dsset.config_validation import ConfigError
    raise ConfigError(f'config key train.batch_size={global_batch_size} must be divisible by the '
                      f'number of devices ({devices})')


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local numpy batch (this process's rows) -> global jax.Arrays sharded on the batch axis."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
