"""Puts dsset's XLA:CPU flag into XLA_FLAGS before JAX starts its CPU backend.

jaxlib 0.9-0.10 sends every CPU convolution through YNNPACK, whose convolutions are slow for the
large-batch, few-channel shapes of a ResNet's first layers (stem weight gradient about 7 GFLOP/s on
two cores). `--xla_cpu_experimental_ynn_fusion_type=dot` keeps YNNPACK for matmuls only, so
convolutions go to XLA's Eigen kernels (90-175 GFLOP/s): the SimCLR step runs about twice as fast.
XLA reads XLA_FLAGS once, when the first backend starts, so this runs on `import dsset`, before any
dsset code can touch JAX. The flag is ignored on GPU/TPU backends.

An unknown flag in XLA_FLAGS aborts the process, so the flag is added only for the jaxlib versions
where it was verified to exist: 0.9.0 and 0.10.0 (run here with the flag) and 0.10.2 (the project's
pin); 0.8.0 lacks it. Other versions are left alone until checked; for a jaxlib newer than that
range a one-line warning says the speed-up is off and how to add the flag by hand, since otherwise
nobody would notice. The user's own XLA_FLAGS setting of the flag wins, and DSSET_NO_CPU_FLAGS=1
turns all of this off, warning included.
"""

import importlib.metadata
import os
import re
import sys
import warnings

FLAG = '--xla_cpu_experimental_ynn_fusion_type'
VALUE = 'dot'
OPT_OUT_VARIABLE = 'DSSET_NO_CPU_FLAGS'
# [first, last] jaxlib releases known to accept the flag with this value.
SUPPORTED_JAXLIB = ((0, 9, 0), (0, 10, 2))


def _release(version: str) -> tuple[int, int, int] | None:
  match = re.match(r'(\d+)\.(\d+)\.(\d+)', version)  # '0.10.2', '0.11.0rc1', '0.9.0.1'
  return tuple(int(part) for part in match.groups()) if match else None


def _user_decided(environ: dict[str, str]) -> bool:
  """The user opted out or set the flag: then dsset neither adds it nor warns about it."""
  return (environ.get(OPT_OUT_VARIABLE, '') not in ('', '0')
          or FLAG in environ.get('XLA_FLAGS', ''))


def flag_applies(jaxlib_version: str | None, environ: dict[str, str]) -> bool:
  """Whether the flag should be added for this jaxlib version and environment."""
  if _user_decided(environ) or jaxlib_version is None:
    return False
  release = _release(jaxlib_version)
  first, last = SUPPORTED_JAXLIB
  return release is not None and first <= release <= last


def newer_than_checked(jaxlib_version: str | None, environ: dict[str, str]) -> bool:
  """Whether the flag is left out only because this jaxlib is newer than the checked range."""
  if _user_decided(environ) or jaxlib_version is None:
    return False
  release = _release(jaxlib_version)
  return release is not None and release > SUPPORTED_JAXLIB[1]


def _jaxlib_version() -> str | None:
  try:
    return importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    return None


def _backend_started() -> bool:
  # Looked up without importing JAX: if JAX is not imported yet, no backend can have started.
  bridge = sys.modules.get('jax._src.xla_bridge')
  started = getattr(bridge, 'backends_are_initialized', None)
  return bool(started and started())


def _dotted(release: tuple[int, int, int]) -> str:
  return '.'.join(map(str, release))


# The warnings module's own once-per-location rule is off under simplefilter('always') (pytest,
# python -W always); this keeps the warning to one per process whoever calls configure().
_warned_newer_jaxlib = False


def _warn_newer_jaxlib(jaxlib_version: str) -> None:
  global _warned_newer_jaxlib
  if _warned_newer_jaxlib:
    return
  _warned_newer_jaxlib = True
  first, last = SUPPORTED_JAXLIB
  warnings.warn(
      f'jaxlib {jaxlib_version} is newer than the versions dsset checked for {FLAG}={VALUE} '
      f'({_dotted(first)} to {_dotted(last)}), so the flag is left out and CPU convolutions may '
      f'run about 2x slower. If this jaxlib accepts it, set XLA_FLAGS={FLAG}={VALUE} yourself; '
      f'{OPT_OUT_VARIABLE}=1 silences this.',
      stacklevel=4,
  )


def configure() -> None:
  """Appends the flag to os.environ['XLA_FLAGS'] when it applies; warns when it cannot take effect.

  It cannot when JAX's backend started first, or when jaxlib is newer than the checked range.
  """
  jaxlib_version = _jaxlib_version()
  if newer_than_checked(jaxlib_version, os.environ):
    _warn_newer_jaxlib(jaxlib_version)
    return
  if not flag_applies(jaxlib_version, os.environ):
    return
  if _backend_started():
    warnings.warn(
        f'JAX started its backend before dsset was imported, so {FLAG}={VALUE} (about 2x faster '
        'CPU convolutions) is not in effect. Import dsset before running any JAX computation, or '
        f'set XLA_FLAGS={FLAG}={VALUE} yourself; {OPT_OUT_VARIABLE}=1 silences this.',
        stacklevel=3,
    )
    return
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {FLAG}={VALUE}".strip()
