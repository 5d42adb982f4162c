"""Device mesh, shardings and global arrays for data-parallel training.

The training step is written as single-device code over the global batch; jax.jit with a batch
sharding on the 'data' mesh axis makes XLA insert the collectives. That is why negatives of the
contrastive loss and BatchNorm statistics are global across devices without any explicit psum.

Multi-process runs (TPU pods, SLURM, launch/local.sh) start one process per host (or per GPU) that
all run the same program; initialize_distributed() joins them before JAX touches a device.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dsset.config_validation import ConfigError

DATA_AXIS = 'data'

# Set by launch/local.sh (or by hand) to join processes that no cluster manager describes.
COORDINATOR_ENV = 'DSSET_COORDINATOR_ADDRESS'
NUM_PROCESSES_ENV = 'DSSET_NUM_PROCESSES'
PROCESS_ID_ENV = 'DSSET_PROCESS_ID'
ENABLED_MODES = ('auto', 'on', 'off')


def _int_setting(value: Any, key: str, env: str) -> int:
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ConfigError(f'{key} (or {env}) must be an integer, got {value!r}') from None


def _several_tasks(environ: Mapping[str, str]) -> bool:
  """True inside a SLURM step or Open MPI job of more than one task: JAX can detect those."""
  for key in ('SLURM_STEP_NUM_TASKS', 'SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'):
    if key in environ:
      return _int_setting(environ[key], key, key) > 1
  return False


def distributed_settings(dist_config, environ: Mapping[str, str]) -> dict[str, Any] | None:
  """The keyword arguments for jax.distributed.initialize, or None for a single-process run.

  Explicit settings (config keys first, then the DSSET_* environment variables) win; without them
  'on' and 'auto' in a multi-task SLURM/Open MPI job return {} so JAX detects the cluster itself
  (TPU pods, SLURM, Open MPI). 'auto' stays single-process when nothing shows a cluster, so a
  laptop run never waits for a coordinator.
  """
  mode = dist_config.enabled
  if mode not in ENABLED_MODES:
    raise ConfigError(f'config key distributed.enabled={mode!r} must be one of {ENABLED_MODES}')
  if mode == 'off':
    return None
  address = dist_config.coordinator_address or environ.get(COORDINATOR_ENV, '')
  num = dist_config.num_processes or environ.get(NUM_PROCESSES_ENV, 0)
  pid = dist_config.process_id if dist_config.process_id >= 0 else environ.get(PROCESS_ID_ENV, -1)
  num = _int_setting(num, 'config key distributed.num_processes', NUM_PROCESSES_ENV)
  pid = _int_setting(pid, 'config key distributed.process_id', PROCESS_ID_ENV)
  if address:
    if num < 1 or not 0 <= pid < num:
      raise ConfigError(
          f'distributed.coordinator_address={address!r} needs distributed.num_processes >= 1 and '
          f'0 <= distributed.process_id < num_processes (or {NUM_PROCESSES_ENV} and '
          f'{PROCESS_ID_ENV}); got num_processes={num}, process_id={pid}')
    return {'coordinator_address': address, 'num_processes': num, 'process_id': pid}
  if num > 0 or pid >= 0:
    raise ConfigError(f'distributed.num_processes / distributed.process_id (or '
                        f'{NUM_PROCESSES_ENV} / {PROCESS_ID_ENV}) are set but no coordinator: set '
                        f'distributed.coordinator_address or {COORDINATOR_ENV} (host:port)')
  if mode == 'on' or _several_tasks(environ):
    return {}
  return None


def initialize_distributed(dist_config, environ: Mapping[str, str] | None = None) -> bool:
  """Joins the processes of a multi-process run; returns whether JAX runs distributed.

  Must run before the first JAX computation of the process (JAX refuses afterwards); calling it
  again is a no-op.
  """
  if jax.distributed.is_initialized():
    return True
  settings = distributed_settings(dist_config, os.environ if environ is None else environ)
  if settings is None:
    return False
  # Cross-process collectives of the CPU backend (tests, launch/local.sh) need an implementation;
  # gloo is the one shipped with jaxlib. The option does nothing on GPU/TPU.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**settings)
  return True


def make_mesh(devices=None) -> Mesh:
  """A 1D mesh over all (or the given) devices of all processes.

  Devices are ordered by process, so each process's devices hold one contiguous block of the global
  batch: the block the data pipeline gives that process (data_pipelines.pipeline).
  """
  if devices is None:
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  return Mesh(np.asarray(list(devices)), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  """The global batch must split evenly over devices and processes."""
  devices = mesh.devices.size
  if global_batch_size % devices:
    raise ConfigError(f'config key train.batch_size={global_batch_size} must be divisible by the '
                      f'number of devices ({devices})')


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local numpy batch (this process's rows) -> global jax.Arrays sharded on the batch axis."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
