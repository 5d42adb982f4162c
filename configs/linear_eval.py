"""Linear probe on frozen encoder features (python -m dsset.main --config=configs/linear_eval.py
--workdir=EVAL_DIR --config.init_from=PRETRAIN_DIR; an empty init_from evaluates a random-init
encoder, the baseline). Writes EVAL_DIR/eval.json and plots.

Use the variant of the pretraining run (:compare, :paper, :tiny) so data and encoder match. Keys:
  init_from                 the pretraining workdir (its backbone.json fixes the architecture).
  evaluate.level            'scan' (one feature per scan) | 'slice' (one per slice).
  evaluate.scan_features    'mean' of slice features | 'set_encoder' (the pretrained pooling + rho)
                            | 'slice_transformer' (intra_inter runs of stage 2, stage 3 or joint:
                            the pretrained slice transformer's volume feature of the scan's
                            central data.num_slices slices of that run, a shorter scan centred
                            among zero images; init_from must hold slice_transformer.msgpack).
  evaluate.label_fraction   share of the labelled train scans, stratified and seeded by config.seed.
  evaluate.weight_decays    the L2 grid; one probe per value is trained and val picks one.
  evaluate.batch_size       images per encoder call while extracting features.
  evaluate.recompute_batch_stats  'always' (default) | 'random_init' | 'never': first set the
                            encoder's BatchNorm running statistics to those of the train images
                            (always, or for a random-init encoder only).
  train.num_steps / learning_rate / batch_size   the probe's Adam steps; full batch while the train
                            examples fit in train.batch_size.
  data.phantom.extra_eval_scans  400 without a variant and with :compare
                            (configs/base.py:scan_level_test_set): 200
                            more held-out val and test scans each, so the plain command has a test
                            set that tells methods apart.
"""

from configs import base


def get_config(arg=None):
  config = base.get_config(arg)
  config.method = 'linear'
  base.downstream_training(config, arg, num_steps=500, batch_size=4096, learning_rate=0.05)
  base.scan_level_test_set(config, arg)
  return config
