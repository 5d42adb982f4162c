"""A stop request is honoured within one step, however long the log interval: the loop never runs
ahead of the device, so SIGTERM does not wait for a backlog of dispatched steps."""

import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, 'tests'))
from test_plugin_method import SupervisedMethod  # noqa: E402
from tests import xla_env

# Matmuls of this size per step: about a second on two CPU cores. (A host callback would be the
# obvious way to slow a step down, but XLA:CPU runs programs with callbacks synchronously, which
# would hide exactly the run-ahead this test is about.)
MATMULS = 150
SIDE = 512


class SlowMethod(SupervisedMethod):
  """SupervisedMethod with a long computation in every step."""

  def loss(self, params, batch_stats, batch, rng, phase):
    loss, out = super().loss(params, batch_stats, batch, rng, phase)
    m = jnp.full((SIDE, SIDE), 1.0 / SIDE) + jnp.sum(loss) * 1e-9
    busy = jax.lax.fori_loop(0, MATMULS, lambda i, x: jnp.tanh(x @ m), m)
    return loss + 1e-30 * jnp.sum(jax.lax.stop_gradient(busy)), out


CLI = ('import sys; sys.path.insert(0, {tests!r}); import test_stop_latency as t; '
       'from dsset import main, methods; methods.METHODS["slow"] = t.SlowMethod; '
       'from absl import app; main.define_flags(); '
       'app.run(main.main, flags_parser=main.parse_flags)').format(
           tests=os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # 27 s; SIGTERM handling itself runs by default in test_training_faults.py
def test_sigterm_with_a_slow_step_and_a_long_log_interval_stops_within_one_step(tmp_path):
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  env['XLA_FLAGS'] = xla_env.ONE_DEVICE  # one CPU device, as a user's laptop has
  log = tmp_path / 'stderr'
  with open(log, 'w') as stderr:
    proc = subprocess.Popen(
        [sys.executable, '-c', CLI, '--config=configs/base.py:tiny',
         f'--workdir={tmp_path / "w"}', '--config.method=slow', '--config.train.num_steps=100000',
         '--config.train.log_every_steps=1000', '--config.checkpoint.every_steps=1000'],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.time() + 240
    while 'Compiled and ran the first step' not in log.read_text():
      assert proc.poll() is None and time.time() < deadline, log.read_text()
      time.sleep(0.1)
    started = time.time()
    time.sleep(6)  # several steps: long enough for a loop that runs ahead to build a backlog
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=600)
  latency = time.time() - sent
  assert proc.returncode == 128 + signal.SIGTERM, log.read_text()
  (checkpoint,) = [int(d) for d in os.listdir(tmp_path / 'w' / 'checkpoints') if d.isdigit()]
  seconds_per_step = (sent - started) / max(checkpoint - 1, 1)
  # The running step and at most one queued one, plus writing the checkpoint.
  assert latency < 2 * seconds_per_step + 5, (latency, seconds_per_step, checkpoint)
  print(f'stop latency {latency:.1f} s, {seconds_per_step:.2f} s per step, stopped after step '
        f'{checkpoint}')
