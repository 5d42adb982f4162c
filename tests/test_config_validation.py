"""Start-up checks: every key of every config file is checked, each error names its key."""

import importlib
import pkgutil

import pytest

import configs
from configs import base
from dsset import config_validation
from dsset.config_validation import ConfigError, validate

# Every config file of the package (base.py holds the defaults the others start from).
CONFIG_FILES = tuple(sorted(m.name for m in pkgutil.iter_modules(configs.__path__)
                            if m.name != 'base'))


def leaf_keys(config, prefix=''):
  keys = []
  for name, value in config.items():
    if hasattr(value, 'items'):
      keys += leaf_keys(value, f'{prefix}{name}.')
    else:
      keys.append(prefix + name)
  return keys


@pytest.mark.parametrize('name', CONFIG_FILES)
@pytest.mark.parametrize('variant', [None, *base.VARIANTS])
def test_every_config_file_and_variant_is_valid_and_fully_checked(name, variant):
  config = importlib.import_module(f'configs.{name}').get_config(variant)
  validate(config)
  checked = set(config_validation.rules(config)) | {'method'}
  assert set(leaf_keys(config)) == checked, 'keys without a check, or checks without a key'


@pytest.mark.parametrize('key, value', [
    ('evaluate.level', 'volume'),
    ('evaluate.label_fraction', 0.0),
    ('evaluate.weight_decays', ()),
    ('evaluate.knn_k', 0),
    ('evaluate.segment_num_classes', 1),
    ('evaluate.scan_features', 'max'),
    ('train.optimizer', 'adagrad'),
    ('data.phantom.depth', 4),
    ('data.short_scans', 'drop'),
    ('data.min_slices', 0),
])
def test_a_bad_value_names_its_key(key, value):
  config = base.get_config()
  section, leaf = key.rsplit('.', 1)
  node = config
  for part in section.split('.'):
    node = node[part]
  node[leaf] = value
  with pytest.raises(ConfigError, match=key.replace('.', r'\.')):
    validate(config)


def test_a_replaced_key_names_what_replaced_it():
  config = base.get_config()
  config.data.variable_set_size = True  # as an old config file of one's own would
  with pytest.raises(ConfigError, match=r'data\.variable_set_size was replaced by data\.short_scans'):
    validate(config)


def test_unknown_method_and_method_specific_checks():
  config = base.get_config()
  config.method = 'mae'
  with pytest.raises(ConfigError, match="method='mae'.*deepset"):
    validate(config)
  config = importlib.import_module('configs.finetune').get_config()
  config.evaluate.scan_features = 'set_encoder'
  with pytest.raises(ConfigError, match='scan_features'):
    validate(config)


def test_unknown_variant_is_named():
  with pytest.raises(ValueError, match="'big'.*paper"):
    base.get_config('big')
