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
            all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v) and
            low <= v[0] <= v[1] <= high)
  return ok, f'a pair (low, high) with {low} <= low <= high <= {high}'


def _pair_increasing() -> tuple[Callable[[Any], bool], str]:
  def ok(v):
    return (isinstance(v, (tuple, list)) and len(v) == 2 and
            all(isinstance(x, (int, float)) for x in v) and v[0] < v[1])
  return ok, 'a pair (low, high) with low < high'


def _int_at_least(low: int) -> tuple[Callable[[Any], bool], str]:
  return ((lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low),
          f'an integer >= {low}')


def _bool() -> tuple[Callable[[Any], bool], str]:
  return (lambda v: isinstance(v, bool)), 'True or False'


def _text() -> tuple[Callable[[Any], bool], str]:
  # Paths and names whose meaning the reader checks (a file that must exist, a CSV's columns).
  return (lambda v: isinstance(v, str)), 'a string'


def _spacing(allow_empty: bool) -> tuple[Callable[[Any], bool], str]:
  def ok(v):
    if allow_empty and isinstance(v, (tuple, list)) and len(v) == 0:
      return True
    return (isinstance(v, (tuple, list)) and len(v) == 3 and
            all(isinstance(x, (int, float)) and x > 0 for x in v))
  return ok, 'three positive voxel sizes in mm (slice, row, column)' + (
      ' or () to keep each scan\'s own' if allow_empty else '')


def _numbers() -> tuple[Callable[[Any], bool], str]:
  def ok(v):
    return (isinstance(v, (tuple, list)) and len(v) > 0 and
            all(isinstance(x, (int, float)) and x >= 0 for x in v))
  return ok, 'a non-empty list of numbers >= 0'


def _positive_ints() -> tuple[Callable[[Any], bool], str]:
  def ok(v):
    return (isinstance(v, (tuple, list)) and len(v) > 0 and
            all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v))
  return ok, 'a non-empty list of integers > 0'


def _rules() -> dict[str, tuple[Callable[[Any], bool], str]]:
  """A check for every key of configs/base.py (a test keeps the two in step)."""
  # Imported here so that validating a config does not import the model or data stacks.
  from data_pipelines.intensity import POLICIES
  from data_pipelines.orientation import SLICE_AXES
  from data_pipelines.samplers import SHORT_SCANS
  from data_pipelines.sources import SOURCES
  from dsset.evaluate.features import LEVELS, RECOMPUTE_BATCH_STATS, SCAN_FEATURES
  from data_pipelines.sources.phantom import ANATOMIES
  from dsset.models import BACKBONES
  from dsset.models.unet3d import BACKBONE as UNET3D
  from dsset.optim import OPTIMIZERS
  return {
      'seed': _int_at_least(0),
      'init_from': _text(),
      'data.source': _one_of(*sorted(SOURCES)),
      'data.path': _text(),
      'data.image_size': _int_at_least(16),
      'data.channels': _one_of(1, 3),
      'data.set_size': _positive_int(),
      'data.window': _open_unit(),
      'data.short_scans': _one_of(*SHORT_SCANS),
      'data.min_slices': _positive_int(),
      'data.slice_axis': _one_of(*SLICE_AXES),
      'data.intensity': _one_of(*POLICIES),
      'data.ct_window': _pair_increasing(),
      'data.mri_percentiles': _range(0.0, 100.0),
      'data.labels_csv': _text(),
      'data.masks_path': _text(),
      'data.cache_dir': _text(),
      'data.cache_max_gb': _non_negative(),
      'data.on_bad_scan': _one_of('skip', 'stop'),
      'data.max_voxels': _positive_int(),
      'data.num_workers': _int_at_least(0),
      'data.prefetch_buffer': _positive_int(),
      'data.read_threads': _positive_int(),
      'data.decoded_cache_scans': _int_at_least(0),
      'data.default_spacing': _spacing(allow_empty=False),
      'data.target_spacing': _spacing(allow_empty=True),
      'data.volume_size': _int_at_least(8),
      'data.voxel_mm': _non_negative(),
      'data.val_fraction': _probability(),
      'data.test_fraction': _probability(),
      'data.phantom.num_scans': _positive_int(),
      'data.phantom.extra_eval_scans': _int_at_least(0),
      'data.phantom.extra_train_scans': _int_at_least(0),
      'data.phantom.depth': _int_at_least(8),
      'data.phantom.height': _int_at_least(8),
      'data.phantom.width': _int_at_least(8),
      'data.phantom.seed': _int_at_least(0),
      'data.phantom.noise_hu': _non_negative(),
      'data.phantom.anatomy': _one_of(*ANATOMIES),
      # A sphere must fit in the shortest varied scan (128 mm): radius < 64 mm.
      'data.phantom.object_radius_mm': _range(1.0, 60.0),
      'data.phantom.object_hu': _range(-1000.0, 3000.0),
      'augment.crop_source_size': _int_at_least(0),
      'augment.crop_scale': _range(1e-6, 1.0),
      'augment.crop_ratio': _range(1e-6, 1e6),
      'augment.flip_prob': _probability(),
      'augment.jitter_strength': _non_negative(),
      'augment.jitter_prob': _probability(),
      'augment.blur_prob': _probability(),
      'augment.blur_sigma': _range(1e-6, 1e3),
      'augment3d.flip_prob': _probability(),
      'augment3d.rotate90': _bool(),
      'augment3d.intensity_scale': _range(0.0, 1e3),
      'augment3d.intensity_shift': _range(-1e3, 1e3),
      'model.backbone': _one_of(*sorted(BACKBONES), UNET3D),
      'model.small_stem': _bool(),
      'model.width_multiplier': _positive(),
      'model.pooling': _one_of('sum', 'mean'),
      'model.rho': _bool(),
      'model.batch_norm_views': _one_of('separate', 'joint'),
      'model.head_hidden': _positive_int(),
      'model.head_out': _positive_int(),
      'model.unet3d.filters': _positive_ints(),
      'model.unet3d.bottleneck': _positive_int(),
      'model.unet3d.dropout': ((lambda v: isinstance(v, (int, float)) and 0 <= v < 1),
                               'a number in [0, 1)'),
      'model.pretext_hidden': _positive_ints(),
      'model.pretext_dropout': ((lambda v: isinstance(v, (int, float)) and 0 <= v < 1),
                                'a number in [0, 1)'),
      'model.dtype': _one_of('auto', 'float32', 'bfloat16'),
      'model.cpu_fast_path': _one_of('auto', 'on', 'off'),
      'loss.temperature': _positive(),
      'loss.same_scan_positives': _bool(),
      'train.batch_size': _positive_int(),
      'train.num_steps': _positive_int(),
      'train.num_epochs': _int_at_least(0),
      'train.optimizer': _one_of(*OPTIMIZERS),
      'train.learning_rate': _positive(),
      'train.momentum': _probability(),
      'train.weight_decay': _non_negative(),
      'train.warmup_steps': _int_at_least(0),
      'train.warmup_epochs': _int_at_least(0),
      'train.schedule': _one_of('cosine', 'constant'),
      'train.grad_clip_norm': _non_negative(),
      'train.log_every_steps': _positive_int(),
      'train.on_nonfinite': _one_of('stop', 'skip'),
      'monitor.enabled': _bool(),
      'monitor.learning_rate': _positive(),
      'checkpoint.every_steps': _positive_int(),
      'checkpoint.max_to_keep': _positive_int(),
      'distributed.enabled': _one_of('auto', 'on', 'off'),
      'distributed.coordinator_address': _text(),
      'distributed.num_processes': _int_at_least(0),
      'distributed.process_id': _int_at_least(-1),
      'evaluate.level': _one_of(*LEVELS),
      'evaluate.scan_features': _one_of(*SCAN_FEATURES),
      'evaluate.label_fraction': ((lambda v: isinstance(v, (int, float)) and 0 < v <= 1),
                                  'a number in (0, 1]'),
      'evaluate.batch_size': _positive_int(),
      'evaluate.recompute_batch_stats': _one_of(*RECOMPUTE_BATCH_STATS),
      'evaluate.weight_decays': _numbers(),
      'evaluate.report_split': _one_of('test', 'val'),
      'evaluate.knn_k': _positive_int(),
      'evaluate.knn_temperature': _positive(),
      'evaluate.segment_freeze_steps': _int_at_least(0),
      'evaluate.segment_num_classes': ((lambda v: isinstance(v, int) and (v == 0 or v >= 2)),
                                       '0 (from the masks) or an integer >= 2'),
  }


def rules(config) -> dict[str, tuple[Callable[[Any], bool], str]]:
  """Every key's check: the shared keys', then those of the config's method."""
  from dsset.methods import method_class
  return {**_rules(), **method_class(config).config_rules}


# Removed keys and what replaced them: a config file of one's own that still sets one is refused
# by name rather than having the setting silently ignored.
REPLACED_KEYS = {
    'data.variable_set_size': ("data.short_scans ('pad' for the old True) and data.min_slices "
                               '(= data.set_size for the old False, which left out the scans too '
                               'short for a set)'),
}


def validate(config) -> None:
  """Raises ConfigError for the first key whose value cannot work (method first: it decides which
  other keys exist)."""
  from dsset.methods import method_class
  for key, replacement in REPLACED_KEYS.items():
    try:
      _get(config, key)
    except (KeyError, AttributeError):
      continue
    raise ConfigError(f'config key {key} was replaced by {replacement}')
  method = method_class(config)
  for key, (ok, expected) in rules(config).items():
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
  method.check_config(config)
