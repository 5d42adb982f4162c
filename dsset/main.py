"""Command-line entry: python -m dsset.main --config=configs/<method>.py --workdir=DIR.

Overrides go through --config.<key>=<value>; unknown keys are rejected by the locked config. All
logic lives in dsset.train so tests can call it directly.
"""

import re
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from data_pipelines.errors import DataError
from dsset import train
from dsset.config_validation import REPLACED_KEYS, ConfigError


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)
  config = load_config_or_exit()
  try:
    train.train_and_evaluate(config, flags.FLAGS.workdir)
  except (ConfigError, DataError, train.TrainingError) as e:
    print(f'dsset: error: {e}', file=sys.stderr)
    sys.exit(1)
  except train.Interrupted as e:
    # The shell convention for death by a signal, so schedulers see the job did not finish.
    sys.exit(128 + (e.signum or signal.SIGTERM))


def load_config_or_exit():
  """The --config flag's config; a file that cannot be loaded exits with one line (status 2)."""
  try:
    config = flags.FLAGS.config
    config.get('method')  # the config file is loaded lazily: surface a load error here
  except OSError as e:
    print(f'dsset: error: --config: {" ".join(str(e).split())}', file=sys.stderr)
    sys.exit(2)
  return config


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with bad --config overrides reported as one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f'dsset: error: {e}\nRun with --helpfull for the flags.', file=sys.stderr)
  except (AttributeError, KeyError) as e:
    # ml_collections raises these for an override of a key that does not exist, with a
    # 'did you mean' hint in the message.
    hint = re.search(r'Did you mean "[^"]+"', str(e))
    overrides = [a.split('=')[0] for a in argv[1:] if a.startswith('--config.')]
    replaced = [f'; {key} was replaced by {replacement}'
                for key, replacement in REPLACED_KEYS.items() if f'--config.{key}' in overrides]
    print(f'dsset: error: unknown config key in {" ".join(overrides)}'
          + (f' ({hint.group(0)}?)' if hint else '') + ''.join(replaced)
          + '; configs/base.py lists every key', file=sys.stderr)
  except (ValueError, TypeError) as e:
    print(f'dsset: error: bad config override: {e}', file=sys.stderr)
  sys.exit(2)


def define_flags() -> None:
  """Flags exist only when this module runs as the program, so importing it never clashes."""
  config_flags.DEFINE_config_file(
      'config', None, 'Config file, e.g. configs/deepset.py (or configs/deepset.py:paper).',
      lock_config=True)
  flags.DEFINE_string('workdir', None, 'Folder for checkpoints, logs and exports; a second run '
                      'on the same folder resumes.')
  flags.mark_flags_as_required(['config', 'workdir'])


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=parse_flags)
