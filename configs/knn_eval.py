"""Frozen-encoder kNN evaluation (cosine, k = 20, T = 0.07):
python -m dsset.evaluate.main --config=configs/knn_eval.py --workdir=EVAL_DIR --config.init_from=PRETRAIN_DIR (empty init_from = random-init baseline)."""

from configs import base


def get_config(arg=None):
  config = base.get_config(arg)
  config.evaluate.kind = 'knn'
  return config
