"""3D rotation prediction (Taleb et al.): the 3D U-Net encoder learns which of 10 rotations turned a
random cube of a scan (python -m dsset.main --config=configs/rotation3d.py[:paper|:tiny]
--workdir=DIR). The encoder is exported for configs/segment3d.py and configs/linear_eval3d.py.

Keys this method reads:
  data.volume_size, data.voxel_mm   the cube (voxels per side) and its isotropic voxel size in mm
                                    (0 = the scan's own voxels); docs/data.md, "Volumes".
  model.unet3d.*                    encoder widths (filters per level, bottleneck) and dropout.
  model.pretext_hidden, model.pretext_dropout   the pretext head before the 10-way classifier.
  augment3d.*                       on-device augmentation before the rotation; the geometric part
                                    is off here (a flip or turn is what the task must tell apart).
  train.*, monitor.*, checkpoint.*  as every method.
Variants: '' (this CPU: 32^3 cubes, batch 8), 'paper' (128^3, batch 4, Adam 1e-4), 'tiny' (tests).
"""

from configs import base


def get_config(arg=None):
  config = base.get_config(arg)
  config.method = 'rotation3d'
  config.model.backbone = 'unet3d'
  config.augment3d.flip_prob = 0.0
  config.augment3d.rotate90 = False
  config.data.volume_size = 32
  config.train.batch_size = 8
  config.train.optimizer = 'adam'
  config.train.learning_rate = 1e-3
  if arg == 'paper':
    config.data.volume_size = 128
    config.train.batch_size = 4
    config.train.learning_rate = 1e-4
  elif arg == 'tiny':
    base.tiny_3d_settings(config)
  return config

