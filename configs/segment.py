"""Segmentation: a U-Net decoder on the encoder's stages, trained end to end with Dice +
cross-entropy on voxel masks (python -m dsset.main --config=configs/segment.py --workdir=EVAL_DIR
--config.init_from=PRETRAIN_DIR [--config.evaluate.label_fraction=0.1]; an empty init_from starts
from random init). The source must give masks (the phantom does; other formats via data.masks_path
or a datalist). Writes EVAL_DIR/eval.json and plots; an interrupted run resumes. The decoder
segments slice by slice; eval.json holds test Dice per class over all test pixels at once
(dice_mean, dice_per_class, dice_background) and per volume, each test scan's predicted slices
stacked into its volume (volume_dice_mean and volume_dice_per_class: each class's mean over the
volumes where it occurs or is predicted; volume_dice_background; dice_per_volume, by scan, null
where a class is in neither). Both on the data.image_size grid the slices are predicted on.

Keys: init_from and evaluate.label_fraction as in linear_eval.py, and
  evaluate.segment_freeze_steps  first steps train the decoder only (encoder frozen, eval mode).
  evaluate.segment_num_classes   mask ids 0..C-1; 0 = the largest id in the train masks + 1.
  evaluate.batch_size            slices per call when predicting the test split.
  train.num_steps / batch_size / learning_rate / weight_decay   AdamW, batch_size slices per step.
"""

from configs import base


def get_config(arg=None):
  config = base.get_config(arg)
  config.method = 'segment'
  base.downstream_training(config, arg, num_steps=300, batch_size=16, learning_rate=1e-3,
                           optimizer='adamw', weight_decay=1e-4)
  return config
