"""Start-up checks of a resolved config: one clear message naming the key, before any heavy work."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class ConfigError(ValueError):
  """A config value a user set that cannot work; the message names the key."""


def _get(config, dotted: str) -> Any:
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node


def _one_of(*choices: Any) -> tuple[Callable[[Any], bool], str]:
  return (lambda v: v in choices), f'one of {list(choices)}'


def _positive_int() -> tuple[Callable[[Any], bool], str]:
  return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0), 'an integer > 0'


def _non_negative() -> tuple[Callable[[Any], bool], str]:
  return (lambda v: isinstance(v, (int, float)) and v >= 0), 'a number >= 0'


def _positive() -> tuple[Callable[[Any], bool], str]:
  return (lambda v: isinstance(v, (int, float)) and v > 0), 'a number > 0'


def _probability() -> tuple[Callable[[Any], bool], str]:
  return (lambda v: isinstance(v, (int, float)) and 0 <= v <= 1), 'a probability in [0, 1]'


def _open_unit() -> tuple[Callable[[Any], bool], str]:
  return (lambda v: isinstance(v, (int, float)) and 0 < v < 1), 'a number in (0, 1)'


def _range(low: float, high: float) -> tuple[Callable[[Any], bool], str]:
  def ok(v):
    return (isinstance(v, (tuple, list)) and len(v) == 2 and
            all(isinstance(x, (int, float)) for x in v) and low <= v[0] <= v[1] <= high)
  return ok, f'a pair (low, high) with {low} <= low <= high <= {high}'


def _pair_increasing() -> tuple[Callable[[Any], bool], str]:
  def ok(v):
    return (isinstance(v, (tuple, list)) and len(v) == 2 and
            all(isinstance(x, (int, float)) for x in v) and v[0] < v[1])
  return ok, 'a pair (low, high) with low < high'


def _rules() -> dict[str, tuple[Callable[[Any], bool], str]]:
  # Imported here so that validating a config does not import the model or data stacks.
  from data_pipelines.intensity import POLICIES
  from data_pipelines.orientation import SLICE_AXES
  from data_pipelines.sources import SOURCES
  from dsset.methods import METHODS
  from dsset.models import BACKBONES
  return {
      'method': _one_of(*sorted(METHODS)),
      'data.source': _one_of(*sorted(SOURCES)),
      'data.image_size': ((lambda v: isinstance(v, int) and v >= 16), 'an integer >= 16'),
      'data.channels': _one_of(1, 3),
      'data.set_size': _positive_int(),
      'data.window': _open_unit(),
      'data.slice_axis': _one_of(*SLICE_AXES),
      'data.intensity': _one_of(*POLICIES),
      'data.ct_window': _pair_increasing(),
      'data.mri_percentiles': _range(0.0, 100.0),
      'data.on_bad_scan': _one_of('skip', 'stop'),
      'data.num_workers': ((lambda v: isinstance(v, int) and v >= 0), 'an integer >= 0'),
      'data.val_fraction': _probability(),
      'data.test_fraction': _probability(),
      'augment.crop_scale': _range(1e-6, 1.0),
      'augment.crop_ratio': _range(1e-6, 1e6),
      'augment.flip_prob': _probability(),
      'augment.jitter_strength': _non_negative(),
      'augment.jitter_prob': _probability(),
      'augment.blur_prob': _probability(),
      'augment.blur_sigma': _range(1e-6, 1e3),
      'model.backbone': _one_of(*sorted(BACKBONES)),
      'model.width_multiplier': _positive(),
      'model.pooling': _one_of('sum', 'mean'),
      'model.head_hidden': _positive_int(),
      'model.head_out': _positive_int(),
      'model.dtype': _one_of('auto', 'float32', 'bfloat16'),
      'model.cpu_fast_path': _one_of('auto', 'on', 'off'),
      'loss.temperature': _positive(),
      'train.batch_size': _positive_int(),
      'train.num_steps': _positive_int(),
      'train.optimizer': _one_of('adam', 'sgd', 'lars'),
      'train.learning_rate': _positive(),
      'train.momentum': _probability(),
      'train.weight_decay': _non_negative(),
      'train.warmup_steps': ((lambda v: isinstance(v, int) and v >= 0), 'an integer >= 0'),
      'train.schedule': _one_of('cosine', 'constant'),
      'train.grad_clip_norm': _non_negative(),
      'train.log_every_steps': _positive_int(),
      'train.on_nonfinite': _one_of('stop', 'skip'),
      'monitor.learning_rate': _positive(),
      'checkpoint.every_steps': _positive_int(),
      'checkpoint.max_to_keep': _positive_int(),
  }


def validate(config) -> None:
  """Raises ConfigError for the first key whose value cannot work."""
  for key, (ok, expected) in _rules().items():
    try:
      value = _get(config, key)
    except (KeyError, AttributeError):
      raise ConfigError(f'config key {key} is missing; start from configs/base.py') from None
    if not ok(value):
      raise ConfigError(f'config key {key}={value!r} is invalid: expected {expected}')
  if config.data.val_fraction + config.data.test_fraction >= 1:
    raise ConfigError('config keys data.val_fraction + data.test_fraction must be < 1, got '
                      f'{config.data.val_fraction} + {config.data.test_fraction}')
  if config.data.source != 'phantom' and not config.data.path:
    raise ConfigError(f'config key data.path is empty; data.source={config.data.source!r} '
                      'needs the folder or file to read')
  if config.method in ('simclr', 'perscan') and config.data.set_size != 1:
    raise ConfigError(f'config key data.set_size={config.data.set_size} must be 1 for '
                      f'method={config.method!r} (only deepset contrasts sets)')
