"""Command-line entry: python -m dsset.evaluate.main --config=configs/linear_eval.py
--workdir=EVAL_DIR [--config.init_from=PRETRAIN_DIR] [--config.evaluate.<key>=<value>].

Writes EVAL_DIR/eval.json and PNG plots (dsset.evaluate.run). Flags and their one-line errors are
those of dsset.main.
"""

import sys

from absl import app, flags, logging

from data_pipelines.errors import DataError
from dsset import main as train_main
from dsset.config_validation import ConfigError
from dsset.evaluate import run


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)
  config = train_main.load_config_or_exit()
  try:
    result = run.evaluate(config, flags.FLAGS.workdir)
  except (ConfigError, DataError) as e:
    print(f'dsset: error: {e}', file=sys.stderr)
    sys.exit(1)
  if result['kind'] == 'segment':
    summary = f'test Dice (mean over foreground classes) {result["dice_mean"]:.4f}'
  else:
    summary = (f'({result["level"]}): accuracy {result["accuracy"]:.4f}, balanced accuracy '
               f'{result["balanced_accuracy"]:.4f}, AUC {result["auc"]:.4f}')
  print(f'{result["method"]} / {result["kind"]} {summary}; results in {flags.FLAGS.workdir}')


if __name__ == '__main__':
  train_main.define_flags()
  app.run(main, flags_parser=train_main.parse_flags)
