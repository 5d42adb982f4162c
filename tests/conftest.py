"""Shared test set-up.

Eight fake CPU devices let data-parallel code be tested on this machine; the flag must be in the
environment before JAX starts its CPU backend, so it is set here, before any test imports jax.
"""

import os

os.environ.setdefault('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=8'

from absl import flags  # noqa: E402

# Grain worker processes read absl flags; outside absl.app.run they must be marked as parsed.
flags.FLAGS.mark_as_parsed()
