"""3D segmentation: the 3D U-Net encoder of a 3D pretraining run (or random init) with its decoder,
fine-tuned on random cubes of the labelled train scans and scored on every voxel of the test scans
(python -m dsset.main --config=configs/segment3d.py --workdir=EVAL_DIR --config.init_from=PRETRAIN_DIR
[--config.evaluate.label_fraction=0.1]; an empty init_from is the random-init baseline). The source
must give voxel masks (the phantom does; other formats via data.masks_path or a datalist). Writes
EVAL_DIR/eval.json (dice_mean, dice_per_class on test) and plots; an interrupted run resumes.

Keys: init_from, evaluate.label_fraction (1, 0.5, 0.25, 0.1, 0.01: a stratified, seeded share of the
labelled train scans), and
  evaluate.segment_freeze_steps  first steps train the decoder only (encoder frozen, eval mode).
  evaluate.segment_num_classes   mask ids 0..C-1; 0 = the largest id in the train masks + 1.
  evaluate.batch_size            cubes per call when predicting the test scans.
  data.volume_size, data.voxel_mm   the cubes (as in pretraining; any multiple of 2^levels works).
  augment3d.*                    off here; set them to augment volume and mask together.
  train.num_steps / batch_size / learning_rate / weight_decay   AdamW, batch_size cubes per step.
"""

from configs import base


def get_config(arg=None):
  config = base.get_config(arg)
  config.method = 'segment3d'
  config.model.backbone = 'unet3d'
  base.downstream_training(config, arg, num_steps=300, batch_size=4, learning_rate=1e-3,
                           optimizer='adamw', weight_decay=1e-4)
  config.evaluate.segment_freeze_steps = 50
  config.evaluate.batch_size = 8
  config.augment3d.flip_prob = 0.0
  config.augment3d.rotate90 = False
  config.augment3d.intensity_scale = (1.0, 1.0)
  config.augment3d.intensity_shift = (0.0, 0.0)
  if arg == 'tiny':
    base.tiny_3d_settings(config)
    config.evaluate.segment_freeze_steps = 1
  return config
