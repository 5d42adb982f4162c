"""Full fine-tuning (encoder + linear head, end to end) with label fractions:
python -m dsset.evaluate.main --config=configs/finetune.py --workdir=EVAL_DIR
--config.init_from=PRETRAIN_DIR --config.evaluate.label_fraction=0.1 (empty init_from = from
random init)."""

from configs import base


def get_config(arg=None):
  config = base.get_config(arg)
  config.evaluate.kind = 'finetune'
  return config
