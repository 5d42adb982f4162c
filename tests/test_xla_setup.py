"""dsset's XLA:CPU flag: added on import when safe, effective, and never in the user's way."""

import os
import pathlib
import subprocess
import sys
import warnings

import pytest

from dsset import _xla_setup

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
FLAG_SETTING = f'{_xla_setup.FLAG}={_xla_setup.VALUE}'

# Prints the final XLA_FLAGS and whether a compiled convolution went to YNNPACK (the default path
# that the flag turns off).
PROBE = '''
import os, warnings
warnings.simplefilter('always')
{before}
import dsset
import jax, jax.numpy as jnp
from jax import lax
conv = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), 'SAME',
                                            dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
hlo = jax.jit(conv).lower(jnp.ones((8, 16, 16, 32)), jnp.ones((3, 3, 32, 32))).compile().as_text()
print('XLA_FLAGS=' + os.environ.get('XLA_FLAGS', ''))
print('ynn_conv=' + str('ynn_fusion' in hlo))
'''


def _probe(extra_env=None, before=''):
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', _xla_setup.OPT_OUT_VARIABLE)}
  env.update(extra_env or {})
  result = subprocess.run(
      [sys.executable, '-c', PROBE.format(before=before)],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=True,
  )
  lines = dict(line.split('=', 1) for line in result.stdout.splitlines() if '=' in line)
  return lines['XLA_FLAGS'], lines['ynn_conv'] == 'True', result.stderr


def test_import_adds_flag_and_moves_convolutions_off_ynnpack():
  flags, ynn_conv, _ = _probe({'XLA_FLAGS': '--xla_force_host_platform_device_count=2'})
  assert flags == f'--xla_force_host_platform_device_count=2 {FLAG_SETTING}'
  assert not ynn_conv


def test_opt_out_leaves_xla_default():
  flags, ynn_conv, _ = _probe({_xla_setup.OPT_OUT_VARIABLE: '1'})
  assert flags == ''
  assert ynn_conv  # jaxlib 0.10.2's default: what the flag is for.


def test_warns_when_backend_started_before_import():
  flags, ynn_conv, stderr = _probe(before='import jax; jax.numpy.ones(1).block_until_ready()')
  assert flags == ''
  assert ynn_conv
  assert stderr.count('UserWarning') == 1 and _xla_setup.FLAG in stderr


@pytest.mark.parametrize(
    'version,environ,expected',
    [
        ('0.10.2', {}, True),
        ('0.9.0', {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}, True),
        ('0.11.0rc1', {}, False),  # not verified yet: an unknown flag would abort the process.
        ('0.8.0', {}, False),  # does not have the flag.
        ('not-a-version', {}, False),
        (None, {}, False),
        ('0.10.2', {'XLA_FLAGS': f'{_xla_setup.FLAG}='}, False),  # the user's own choice wins.
        ('0.10.2', {_xla_setup.OPT_OUT_VARIABLE: '1'}, False),
        ('0.10.2', {_xla_setup.OPT_OUT_VARIABLE: '0'}, True),
    ],
)
def test_flag_applies(version, environ, expected):
  assert _xla_setup.flag_applies(version, environ) is expected


def _configure_warnings(monkeypatch, version, environ):
  """Runs configure() for this jaxlib version and environment; returns the warning texts."""
  monkeypatch.setattr(_xla_setup, '_jaxlib_version', lambda: version)
  monkeypatch.setattr(_xla_setup, '_backend_started', lambda: False)
  monkeypatch.setattr(_xla_setup, '_warned_newer_jaxlib', False)
  for name in ('XLA_FLAGS', _xla_setup.OPT_OUT_VARIABLE):
    monkeypatch.delenv(name, raising=False)
  for name, value in environ.items():
    monkeypatch.setenv(name, value)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    _xla_setup.configure()
    _xla_setup.configure()
  return [str(w.message) for w in caught]


def test_newer_jaxlib_warns_once_with_the_way_to_opt_in(monkeypatch):
  messages = _configure_warnings(monkeypatch, '0.11.0', {})
  assert len(messages) == 1
  message = messages[0]
  assert '\n' not in message
  for part in ('jaxlib 0.11.0', FLAG_SETTING, '0.9.0 to 0.10.2', f'XLA_FLAGS={FLAG_SETTING}',
               f'{_xla_setup.OPT_OUT_VARIABLE}=1'):
    assert part in message
  assert _xla_setup.FLAG not in os.environ.get('XLA_FLAGS', '')  # an unknown flag would abort.


@pytest.mark.parametrize(
    'version,environ',
    [
        ('0.10.2', {}),  # checked: the flag is added, nothing to warn about.
        ('0.8.0', {}),  # lacks the flag for good: nothing to opt in to.
        ('0.11.0', {'XLA_FLAGS': f'{_xla_setup.FLAG}=default'}),  # the user chose.
        ('0.11.0', {_xla_setup.OPT_OUT_VARIABLE: '1'}),
    ],
)
def test_no_newer_jaxlib_warning(monkeypatch, version, environ):
  assert _configure_warnings(monkeypatch, version, environ) == []


@pytest.mark.parametrize(
    'version,environ,expected',
    [
        ('0.11.0', {}, True),
        ('0.10.3', {}, True),
        ('0.11.0rc1', {}, True),
        ('0.10.2', {}, False),
        ('0.8.0', {}, False),
        ('not-a-version', {}, False),
        (None, {}, False),
        ('0.11.0', {'XLA_FLAGS': f'{_xla_setup.FLAG}=dot'}, False),
        ('0.11.0', {_xla_setup.OPT_OUT_VARIABLE: '1'}, False),
        ('0.11.0', {_xla_setup.OPT_OUT_VARIABLE: '0'}, True),
    ],
)
def test_newer_than_checked(version, environ, expected):
  assert _xla_setup.newer_than_checked(version, environ) is expected
