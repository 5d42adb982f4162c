"""SimCLR baseline: both views are augmentations of one slice drawn uniformly from all slices of all
scans (python -m dsset.main --config=configs/simclr.py[:paper|:compare|:tiny] --workdir=DIR).

Keys this method reads beyond data.*, model.backbone/width_multiplier/small_stem and train.*:
  augment.*             the on-device augmentations of each view (crop, flip, jitter, blur).
  model.head_hidden/out the projection head g (Dense - BN - ReLU - Dense).
  model.batch_norm_views  'separate' (each view its own BatchNorm batch, as the reference) | 'joint'.
  loss.temperature      NT-Xent temperature.
  monitor.*             the online linear probe on the scan labels (probe_accuracy in the log).
data.set_size must be 1 (one slice per view).
"""

from configs import base


def get_config(arg=None):
  config = base.get_config(arg)
  config.method = 'simclr'
  config.data.set_size = 1
  return config
