"""Weighted kNN on frozen encoder features: cosine similarity, k nearest train examples vote with
weight exp(cos / T) (python -m dsset.main --config=configs/knn_eval.py --workdir=EVAL_DIR
--config.init_from=PRETRAIN_DIR; an empty init_from evaluates a random-init encoder). Nothing is
trained. Writes EVAL_DIR/eval.json and plots.

Keys: init_from, evaluate.level, evaluate.scan_features, evaluate.label_fraction,
evaluate.batch_size and evaluate.recompute_batch_stats as in linear_eval.py, and
  evaluate.knn_k            neighbours that vote (20).
  evaluate.knn_temperature  T of the vote weights (0.07, as InstDisc and DINO).
"""

from configs import base


def get_config(arg=None):
  config = base.get_config(arg)
  config.method = 'knn'
  base.downstream_training(config, arg, num_steps=1, batch_size=8, learning_rate=1e-3)
  base.scan_level_test_set(config, arg)
  return config
