"""Command-line entry: python -m dsset.main --config=configs/<method>.py --workdir=DIR.

Overrides go through --config.<key>=<value>; unknown keys are rejected by the locked config. All
logic lives in dsset.train so tests can call it directly.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from data_pipelines.errors import DataError
from dsset import train
from dsset.config_validation import ConfigError


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)
  try:
    train.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  except (ConfigError, DataError, train.TrainingError) as e:
    print(f'dsset: error: {e}', file=sys.stderr)
    sys.exit(1)


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
  app.run(main)
