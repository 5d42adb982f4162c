"""The method train-step benchmark reads configs as dsset.main does and times the loop's own step."""

import json

import pytest

from benchmarks import method_step


def test_config_spec_variant_and_overrides():
  config = method_step.load_config('configs/rotation3d.py:tiny',
                                   ['data.volume_size=32', 'train.optimizer=sgd',
                                    'model.unet3d.filters=(4, 8)'])
  assert config.method == 'rotation3d'
  assert config.data.volume_size == 32 and config.train.optimizer == 'sgd'
  assert tuple(config.model.unet3d.filters) == (4, 8)
  with pytest.raises(SystemExit, match='expected key=value'):
    method_step.load_config('configs/rotation3d.py:tiny', ['data.volume_size'])


@pytest.mark.slow
def test_times_two_methods_in_turns(capsys):
  method_step.main(['configs/rotation3d.py:tiny', 'configs/simclr.py:tiny', '--steps', '1',
                    '--rounds', '2', '--warmup', '0'])
  records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r['method'] for r in records] == ['rotation3d', 'simclr']
  assert all(r['steps_timed'] == 2 and r['examples_per_s'] > 0 for r in records)
  assert records[0]['batch_shapes']['volume'] == [8, 16, 16, 16, 1]
