"""Faults during training: signals, kill -9, non-finite steps (docs/reliability.md)."""

import json
import os
import signal
import subprocess
import sys
import time

import flax.serialization
import jax
import numpy as np
import pytest

from dsset import preemption, train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, 'tests'))
from test_cli import TINY  # noqa: E402
from test_train import read_metrics, tiny_config  # noqa: E402
from tests import xla_env

# Frequent small checkpoints, constant schedule: the compiled step does not depend on num_steps.
ARGS = ['--config=configs/deepset.py:tiny', *TINY]


def start_cli(workdir, *extra, args=tuple(ARGS)):
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  env['XLA_FLAGS'] = xla_env.ONE_DEVICE  # one CPU device, as a user's laptop has
  return subprocess.Popen([sys.executable, '-m', 'dsset.main', *args, f'--workdir={workdir}',
                           *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def logged_steps(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line)['step'] for line in f if line.strip()]


def wait_for_step(proc, workdir, step, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f'training ended early: {proc.stderr.read()}')
    if logged_steps(workdir) and logged_steps(workdir)[-1] >= step:
      return
    time.sleep(0.2)
  raise AssertionError(f'step {step} not reached in {timeout} s')


def backbone(workdir):
  with open(os.path.join(workdir, 'backbone.msgpack'), 'rb') as f:
    return flax.serialization.msgpack_restore(f.read())


def test_sigterm_saves_checkpoint_and_resume_matches_uninterrupted(tmp_path):
  """Stopped at some step s, resumed to s + 4: equal to s + 4 uninterrupted steps.

  The first run is given far more steps than it will get to, so the signal always lands mid-run
  however fast the steps are; the constant schedule makes num_steps irrelevant to the updates.
  """
  signum = signal.SIGTERM
  interrupted, whole = str(tmp_path / 'interrupted'), str(tmp_path / 'whole')
  proc = start_cli(interrupted, '--config.train.num_steps=100000')
  wait_for_step(proc, interrupted, 3)
  sent = time.time()
  proc.send_signal(signum)
  _, stderr = proc.communicate(timeout=60)
  assert time.time() - sent < 30, 'a signal must stop training within seconds'
  assert proc.returncode == 128 + signum, stderr
  assert 'Run the same command again to resume' in stderr
  stopped_at = logged_steps(interrupted)[-1]
  assert os.path.isdir(os.path.join(interrupted, 'checkpoints', str(stopped_at)))
  final = stopped_at + 4

  resumed = start_cli(interrupted, f'--config.train.num_steps={final}')
  _, stderr = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, stderr
  assert f'Resuming from the checkpoint at step {stopped_at}' in stderr
  assert logged_steps(interrupted) == list(range(1, final + 1)), 'no step repeated or lost'

  uninterrupted = start_cli(whole, f'--config.train.num_steps={final}')
  _, stderr = uninterrupted.communicate(timeout=300)
  assert uninterrupted.returncode == 0, stderr
  # Same program, same data order and keys: on CPU the result is bitwise identical.
  jax.tree.map(np.testing.assert_array_equal, backbone(interrupted), backbone(whole))


# Both resume through the same loop code as pretraining, whose resume the SIGTERM test above checks
# by default; the downstream cases (segment with its frozen-encoder phase, finetune) take about a
# minute each and run with -m slow.
@pytest.mark.slow
@pytest.mark.parametrize('config', ['finetune', 'segment'])
def test_interrupted_downstream_run_resumes_without_repeating_a_step(tmp_path, config):
  """Fine-tuning and segmentation train through the same loop: a SIGTERM saves a checkpoint, the
  same command resumes after it, every step is logged once, and the evaluation is written."""
  args = (f'--config=configs/{config}.py:tiny', '--config.checkpoint.every_steps=1')
  workdir = str(tmp_path / 'run')
  proc = start_cli(workdir, '--config.train.num_steps=100000', args=args)
  wait_for_step(proc, workdir, 2)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=60)
  assert proc.returncode == 128 + signal.SIGTERM, stderr
  assert not os.path.exists(os.path.join(workdir, 'eval.json')), 'no evaluation of a cut run'
  stopped_at = logged_steps(workdir)[-1]
  resumed = start_cli(workdir, f'--config.train.num_steps={stopped_at + 2}', args=args)
  _, stderr = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, stderr
  assert f'Resuming from the checkpoint at step {stopped_at}' in stderr
  assert logged_steps(workdir) == list(range(1, stopped_at + 3))
  with open(os.path.join(workdir, 'eval.json')) as f:
    assert json.load(f)['kind'] == config


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_stop_request_records_signal_instead_of_dying(signum):
  with preemption.StopRequest() as stop:
    os.kill(os.getpid(), signum)
    time.sleep(0.1)  # the handler runs between bytecodes of the main thread
    assert stop.signum == signum
  assert signal.getsignal(signum) is not stop._handle, 'the previous handler is restored'


def test_incomplete_checkpoint_is_ignored_on_resume(tmp_path):
  """What kill -9 during a write leaves (an uncommitted temporary step folder) is skipped."""
  workdir = tmp_path / 'run'
  config = tiny_config('simclr', **{'train.num_steps': 2, 'checkpoint.every_steps': 1})
  train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
  checkpoints = workdir / 'checkpoints'
  # Orbax writes step N into a temporary folder and renames it when complete.
  partial = checkpoints / '3.orbax-checkpoint-tmp-1234567'
  partial.mkdir()
  (partial / 'garbage').write_bytes(b'\0' * 100)
  config.train.num_steps = 4
  train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
  assert [m['step'] for m in read_metrics(workdir)] == [1, 2, 3, 4]


@pytest.mark.slow
def test_kill_9_at_random_moments_never_breaks_resume(tmp_path):
  workdir = str(tmp_path / 'run')
  rng = np.random.default_rng(0)
  for _ in range(4):
    proc = start_cli(workdir, '--config.train.num_steps=100000', '--config.checkpoint.every_steps=1')
    wait_for_step(proc, workdir, (logged_steps(workdir) or [0])[-1] + 1)
    time.sleep(rng.uniform(0, 1.5))
    proc.kill()
    proc.communicate()
  done = start_cli(workdir, '--config.train.num_steps=' + str(logged_steps(workdir)[-1] + 2))
  _, stderr = done.communicate(timeout=300)
  assert done.returncode == 0, stderr
  assert 'Resuming from the checkpoint' in stderr


def _exploding(**overrides):
  # SGD at an absurd learning rate overflows float32 within a couple of steps.
  return tiny_config('simclr', **{'train.optimizer': 'sgd', 'train.learning_rate': 1e30,
                                  'train.warmup_steps': 0, 'train.schedule': 'constant',
                                  'train.num_steps': 6, 'checkpoint.every_steps': 1,
                                  **overrides})


def test_nonfinite_step_stops_with_its_number_and_keeps_good_checkpoint(tmp_path):
  with pytest.raises(train.TrainingError, match=r'non-finite loss or gradients at step \d+'):
    train.train_and_evaluate(_exploding(), str(tmp_path / 'run'), devices=jax.devices()[:1])
  checkpoints = [d for d in os.listdir(tmp_path / 'run' / 'checkpoints') if d.isdigit()]
  assert checkpoints, 'the steps before the bad one were checkpointed'


def test_nonfinite_steps_skipped_when_asked(tmp_path):
  train.train_and_evaluate(_exploding(**{'train.on_nonfinite': 'skip'}), str(tmp_path / 'run'),
                           devices=jax.devices()[:1])
  assert read_metrics(tmp_path / 'run')[-1]['skipped_steps'] >= 1
  params = backbone(str(tmp_path / 'run'))
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(params)), \
      'skipped steps must never reach the parameters'
