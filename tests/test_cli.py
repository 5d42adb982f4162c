"""The command line as a user runs it: resume across invocations and clear errors."""

import json
import os
import subprocess
import sys

import pytest
from tests import xla_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# With the configs' :tiny variant (tiny model and data), each invocation compiles and runs in
# seconds. A constant schedule keeps the compiled step independent of num_steps, so a second
# invocation reuses the first one's compilation from the cache.
TINY = ['--config.train.schedule=constant', '--config.train.warmup_steps=0']


def run_cli(*args, timeout=300):
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  env['XLA_FLAGS'] = xla_env.ONE_DEVICE  # one CPU device, as a user's laptop has
  return subprocess.run([sys.executable, '-m', 'dsset.main', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_second_invocation_resumes_and_logs_only_new_steps(tmp_path):
  workdir = str(tmp_path / 'run')
  common = ['--config=configs/deepset.py:tiny', f'--workdir={workdir}', *TINY]
  first = run_cli(*common, '--config.train.num_steps=3')
  assert first.returncode == 0, first.stderr
  second = run_cli(*common, '--config.train.num_steps=6')
  assert second.returncode == 0, second.stderr
  assert 'Resuming from the checkpoint at step 3' in second.stderr
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    steps = [json.loads(line)['step'] for line in f]
  assert steps == [1, 2, 3, 4, 5, 6]
  for name in ('config.json', 'backbone.msgpack', 'backbone.json', 'checkpoints'):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert any(n.startswith('events.out.tfevents') for n in os.listdir(workdir))
  assert 'Results in' in second.stderr


@pytest.mark.parametrize('flag, expected', [
    ('--config.data.window=2.0', 'data.window=2.0'),
    ('--config.model.backbone=resnet7', "model.backbone='resnet7'"),
])
def test_bad_value_gives_one_clear_line(tmp_path, flag, expected):
  result = run_cli('--config=configs/deepset.py', f'--workdir={tmp_path / "w"}', flag)
  assert result.returncode == 1
  assert expected in result.stderr
  assert 'Traceback' not in result.stderr


def test_unknown_key_is_rejected(tmp_path):
  result = run_cli('--config=configs/deepset.py', f'--workdir={tmp_path / "w"}',
                   '--config.train.nmu_steps=3', '--config.data.variable_set_size=True')
  assert result.returncode != 0
  assert 'nmu_steps' in result.stderr
  assert 'data.variable_set_size was replaced by data.short_scans' in result.stderr
  assert 'Traceback' not in result.stderr
