"""Linear probe on frozen encoder features (python -m dsset.main --config=configs/linear_eval.py
--workdir=EVAL_DIR --config.init_from=PRETRAIN_DIR; an empty init_from evaluates a random-init
encoder, the baseline). Writes EVAL_DIR/eval.json and plots.

Use the variant of the pretraining run (:compare, :paper, :tiny) so data and encoder match. Keys:
  init_from                 the pretraining workdir (its backbone.json fixes the architecture).
  evaluate.level            'scan' (one feature per scan) | 'slice' (one per slice).
  evaluate.scan_features    'mean' of slice features | 'set_encoder' (the pretrained pooling + rho).
  evaluate.label_fraction   share of the labelled train scans, stratified and seeded by config.seed.
  evaluate.weight_decays    the L2 grid; one probe per value is trained and val picks one.
  evaluate.batch_size       images per encoder call while extracting features.
  evaluate.recompute_batch_stats  'random_init' (default) | 'always' | 'never': first set the
                            encoder's BatchNorm running statistics to those of the train images.
  train.num_steps / learning_rate / batch_size   the probe's Adam steps; full batch while the train
                            examples fit in train.batch_size.
"""

from configs import base


def get_config(arg=None):
  config = base.get_config(arg)
  config.method = 'linear'
  base.downstream_training(config, arg, num_steps=500, batch_size=4096, learning_rate=0.05)
  return config
