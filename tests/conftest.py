"""Shared test set-up.

Eight fake CPU devices let data-parallel code be tested on this machine; the flag must be in the
environment before JAX starts its CPU backend, so it is set here, before any test imports jax.
"""

import os

from tests import xla_env

os.environ.setdefault('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=8'
# Compiling dominates the tiny runs of the suite: see tests/xla_env.py.
if '--xla_backend_optimization_level' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' ' + xla_env.FAST_COMPILE

import tempfile  # noqa: E402

# One compilation cache for the whole test session (and the CLI subprocesses it starts): the same
# tiny training step is compiled by several tests.
os.environ.setdefault('DSSET_COMPILATION_CACHE', tempfile.mkdtemp(prefix='dsset_xla_cache_'))

from absl import flags  # noqa: E402

# Grain worker processes read absl flags; outside absl.app.run they must be marked as parsed.
flags.FLAGS.mark_as_parsed()
