"""Linear probe on frozen 3D-encoder features of whole scans (python -m dsset.main
--config=configs/linear_eval3d.py --workdir=EVAL_DIR --config.init_from=PRETRAIN_DIR; an empty
init_from evaluates a random-init 3D U-Net encoder, the baseline). The probe is configs/linear_eval.py's;
only the features differ: a scan's feature is the mean of the pooled bottleneck features of the cubes
that tile it (data.volume_size, data.voxel_mm; dsset/evaluate/volume_features.py), so only
evaluate.level='scan' exists. Writes EVAL_DIR/eval.json and plots.
"""

from configs import base
from configs import linear_eval


def get_config(arg=None):
  config = linear_eval.get_config(arg)
  config.model.backbone = 'unet3d'
  config.evaluate.level = 'scan'
  config.evaluate.batch_size = 8
  if arg == 'tiny':
    base.tiny_3d_settings(config)
  return config
