"""Frozen-encoder linear probe: python -m dsset.evaluate.main --config=configs/linear_eval.py
--workdir=EVAL_DIR --config.init_from=PRETRAIN_DIR (empty init_from = random-init baseline)."""

from configs import base


def get_config(arg=None):
  config = base.get_config(arg)
  config.evaluate.kind = 'linear'
  return config
