"""Multi-process training: environment detection, two real local processes, launcher scripts."""

import glob
import json
import os
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

import configs.deepset
from configs import base
from dsset import parallel, train
from dsset.config_validation import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tiny DS-SimCLR (configs/deepset.py:tiny), with these overrides given to the in-process run as
# config values and to the launched processes as --config.<key>=<value> flags. A constant learning
# rate makes a 2-step run followed by a resume to 4 steps comparable with 4 uninterrupted steps.
TINY = {
    'train.schedule': 'constant',
    'train.warmup_steps': 0,
    'checkpoint.every_steps': 100,
}


def dist_config(**values):
  config = base.get_config().distributed
  config.update(values)
  return config


def test_auto_is_single_process_without_a_cluster():
  assert parallel.distributed_settings(dist_config(), {}) is None
  assert parallel.distributed_settings(dist_config(), {'SLURM_NTASKS': '1'}) is None
  assert parallel.distributed_settings(dist_config(enabled='off'),
                                       {'SLURM_STEP_NUM_TASKS': '8'}) is None


def test_auto_leaves_multi_task_clusters_to_jax():
  assert parallel.distributed_settings(dist_config(), {'SLURM_STEP_NUM_TASKS': '8'}) == {}
  assert parallel.distributed_settings(dist_config(), {'OMPI_COMM_WORLD_SIZE': '2'}) == {}
  assert parallel.distributed_settings(dist_config(enabled='on'), {}) == {}


def test_explicit_settings_from_environment_and_config():
  env = {'DSSET_COORDINATOR_ADDRESS': '10.0.0.1:1234', 'DSSET_NUM_PROCESSES': '4',
         'DSSET_PROCESS_ID': '3'}
  assert parallel.distributed_settings(dist_config(), env) == {
      'coordinator_address': '10.0.0.1:1234', 'num_processes': 4, 'process_id': 3}
  # Config keys win over the environment, key by key; process 0 is a valid explicit id.
  config = dist_config(coordinator_address='host:99', process_id=0)
  assert parallel.distributed_settings(config, env) == {
      'coordinator_address': 'host:99', 'num_processes': 4, 'process_id': 0}


@pytest.mark.parametrize('values, env, match', [
    ({'enabled': 'yes'}, {}, r'distributed\.enabled'),
    ({}, {'DSSET_COORDINATOR_ADDRESS': 'h:1', 'DSSET_NUM_PROCESSES': '2',
          'DSSET_PROCESS_ID': '2'}, 'process_id < num_processes'),
    ({}, {'DSSET_COORDINATOR_ADDRESS': 'h:1', 'DSSET_NUM_PROCESSES': 'two',
          'DSSET_PROCESS_ID': '0'}, 'DSSET_NUM_PROCESSES'),
    ({'num_processes': 2, 'process_id': 0}, {}, 'no coordinator'),
])
def test_inconsistent_settings_name_the_key(values, env, match):
  with pytest.raises(ConfigError, match=match):
    parallel.distributed_settings(dist_config(**values), env)


def test_initialize_is_a_no_op_for_a_single_process():
  assert not parallel.initialize_distributed(dist_config(), {})
  assert jax.process_count() == 1


def test_mesh_orders_devices_by_process():
  mesh = parallel.make_mesh()
  keys = [(d.process_index, d.id) for d in mesh.devices.flat]
  assert keys == sorted(keys) and len(keys) == len(jax.devices())


@pytest.mark.skipif(shutil.which('shellcheck') is None, reason='shellcheck is not installed')
def test_launch_scripts_are_shellcheck_clean():
  scripts = sorted(glob.glob(os.path.join(ROOT, 'launch', '*.sh'))
                   + glob.glob(os.path.join(ROOT, 'launch', '*.sbatch')))
  assert len(scripts) == 3
  result = subprocess.run(['shellcheck', '--shell=bash', *scripts], capture_output=True,
                          text=True, check=False)
  assert result.returncode == 0, result.stdout + result.stderr


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def launch_command(workdir, num_steps, log_dir):
  """python -m dsset.main in 2 processes of 4 fake CPU devices each, through launch/local.sh."""
  flags = [f'--config.{k}={v}' for k, v in TINY.items()]
  return [os.path.join(ROOT, 'launch', 'local.sh'), '--num_processes=2',
          '--devices_per_process=4', f'--log_dir={log_dir}', '--',
          '--config=configs/deepset.py:tiny', f'--workdir={workdir}', *flags,
          f'--config.train.num_steps={num_steps}']


# The launcher sets the device count itself; the 8 devices conftest put in XLA_FLAGS must go.
LAUNCH_ENV = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')


def launch_two_processes(workdir, num_steps, log_dir):
  result = subprocess.run(launch_command(workdir, num_steps, log_dir), cwd=ROOT, env=LAUNCH_ENV,
                          capture_output=True, text=True, timeout=900, check=False)
  logs = ''.join(open(p).read() for p in glob.glob(os.path.join(log_dir, '*.log')))
  assert result.returncode == 0, result.stderr[-3000:] + logs[-3000:]
  return result


@pytest.mark.slow
def test_two_processes_match_one_and_resume(tmp_path):
  """2 processes x 4 devices log the losses of 1 process x 8 devices, also across a resume."""
  config = configs.deepset.get_config('tiny')
  for key, value in {**TINY, 'train.num_steps': 4}.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  single = tmp_path / 'single'
  train.train_and_evaluate(config, str(single))

  multi = tmp_path / 'multi'
  launch_two_processes(multi, 2, tmp_path / 'logs_a')
  assert sorted(os.listdir(multi / 'checkpoints' / '2' / 'data')) == [
      'commit_success.txt', 'process_0-of-2.json', 'process_1-of-2.json']
  # The per-process data positions only fit a run of as many processes: one process refuses.
  copy = tmp_path / 'copy'
  shutil.copytree(multi, copy)
  with pytest.raises(ConfigError, match='different number of processes'):
    train.train_and_evaluate(config, str(copy))
  second = launch_two_processes(multi, 4, tmp_path / 'logs_b')
  assert 'Resuming from the checkpoint at step 2' in second.stderr

  expected, got = read_metrics(single), read_metrics(multi)
  assert [m['step'] for m in got] == [1, 2, 3, 4], 'one log line per step, none repeated'
  # Same global batch and augmentation; only the order of float32 sums across processes differs.
  np.testing.assert_allclose([m['loss'] for m in got], [m['loss'] for m in expected],
                             rtol=1e-4, atol=1e-5)
  assert os.path.getsize(tmp_path / 'logs_b' / 'process_1.log') > 0, 'process 1 logs to its file'


def _process_pid(launcher_pid, process_id):
  """The pid of dsset process `process_id` started by the launcher (from /proc's environments)."""
  for entry in os.listdir('/proc'):
    if not entry.isdigit():
      continue
    try:
      with open(f'/proc/{entry}/stat') as f:
        parent = int(f.read().rsplit(')', 1)[1].split()[1])
      with open(f'/proc/{entry}/environ', 'rb') as f:
        environ = f.read().split(b'\0')
    except OSError:
      continue
    if parent == launcher_pid and f'DSSET_PROCESS_ID={process_id}'.encode() in environ:
      return int(entry)
  return None


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_at_one_step_with_one_checkpoint(tmp_path):
  """A signal that reaches only process 1 stops both processes after the same step; the run
  resumes from that checkpoint with no step logged twice."""
  workdir, logs = tmp_path / 'run', tmp_path / 'logs'
  launcher = subprocess.Popen(launch_command(workdir, 100000, logs), cwd=ROOT, env=LAUNCH_ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  while not (os.path.exists(workdir / 'metrics.jsonl') and len(read_metrics(workdir)) >= 3):
    assert launcher.poll() is None and time.time() < deadline, launcher.stderr.read()
    time.sleep(0.5)
  os.kill(_process_pid(launcher.pid, 1), signal.SIGTERM)
  _, stderr = launcher.communicate(timeout=300)
  process_1 = (logs / 'process_1.log').read_text()
  assert launcher.returncode == 128 + signal.SIGTERM, stderr[-2000:] + process_1[-2000:]
  assert 'Traceback' not in stderr + process_1, stderr[-2000:] + process_1[-2000:]
  # Process 0 (which logs) never got a signal: it stopped because process 1 voted.
  assert 'Stopped by a stop request from another process' in stderr, stderr[-2000:]
  stopped_at = read_metrics(workdir)[-1]['step']
  steps = sorted(int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit())
  assert steps[-1] == stopped_at
  assert sorted(os.listdir(workdir / 'checkpoints' / str(stopped_at) / 'data')) == [
      'commit_success.txt', 'process_0-of-2.json', 'process_1-of-2.json']
  resumed = launch_two_processes(workdir, stopped_at + 2, tmp_path / 'logs_b')
  assert f'Resuming from the checkpoint at step {stopped_at}' in resumed.stderr
  assert [m['step'] for m in read_metrics(workdir)] == list(range(1, stopped_at + 3))
