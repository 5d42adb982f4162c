"""Full fine-tuning: encoder + linear head trained end to end on the labelled train scans
(python -m dsset.main --config=configs/finetune.py --workdir=EVAL_DIR
--config.init_from=PRETRAIN_DIR [--config.evaluate.label_fraction=0.1]; an empty init_from starts
from random init). Writes EVAL_DIR/eval.json and plots; an interrupted run resumes.

Keys: init_from, evaluate.level and evaluate.label_fraction as in linear_eval.py, and
  data.set_size     at scan level, K random slices of a scan per example (features averaged).
  train.num_steps / batch_size / learning_rate / weight_decay   AdamW (decoupled weight decay),
                    batch_size scans (scan level) or slices (slice level) per step.
evaluate.scan_features must be 'mean' (the head is trained on the mean of slice features).
"""

from configs import base


def get_config(arg=None):
  config = base.get_config(arg)
  config.method = 'finetune'
  base.downstream_training(config, arg, num_steps=200, batch_size=16, learning_rate=1e-4,
                           optimizer='adamw', weight_decay=1e-4)
  return config
