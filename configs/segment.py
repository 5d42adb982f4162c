"""Segmentation (U-Net decoder on the encoder's stages, Dice + cross-entropy) on voxel masks:
python -m dsset.evaluate.main --config=configs/segment.py --workdir=EVAL_DIR
--config.init_from=PRETRAIN_DIR [--config.evaluate.label_fraction=0.1] (empty init_from = from
random init). The source must give masks (the phantom does; other formats via data.masks_path or
a datalist)."""

from configs import base


def get_config(arg=None):
  config = base.get_config(arg)
  config.evaluate.kind = 'segment'
  return config
