"""3D exemplar networks (Taleb et al.): the 3D U-Net encoder learns embeddings in which a random
view of a cube lies nearer the cube than another cube of the batch, by a triplet loss
(python -m dsset.main --config=configs/exemplar3d.py[:paper|:tiny] --workdir=DIR;
dsset.methods.exemplar3d). The encoder is exported for configs/segment3d.py and
configs/linear_eval3d.py.

Keys this method reads:
  data.volume_size, data.voxel_mm   the cube (voxels per side) and its isotropic voxel size in mm
                                    (0 = the scan's own voxels); docs/data.md, "Volumes".
  model.unet3d.*                    encoder widths (filters per level, bottleneck) and dropout.
  exemplar3d.code_size              length of the sigmoid embedding (paper and released code: 1024).
  exemplar3d.margin                 triplet margin alpha (1.0, both).
  exemplar3d.distance               'squared_l2' (the paper: sum of squared differences) |
                                    'mean_squared' (the released code: their mean over the code,
                                    at most 1, so margin 1 is never met).
  exemplar3d.pretext_head           put the pretext head (model.pretext_hidden,
                                    model.pretext_dropout) between the encoder and the embedding;
                                    the released code has none (False).
  exemplar3d.augment.*              the anchor's random view (dsset.augment3d.exemplar_augment),
                                    the released code's augment_exemplar_3d values: flip_prob 0.5
                                    per axis; per plane rotate_prob 0.5, of which quarter_turn_prob
                                    0.5 a quarter turn and the rest a uniform free angle;
                                    color_prob 0.5 of a brightness shift uniform in
                                    +-brightness_delta (0.125, in [0, 1] voxel units) and a contrast
                                    factor uniform in contrast_range (0.5, 1.5); zoom_prob 0.15 of a
                                    zoom per axis uniform in zoom_range (0.8, 1.2).
  train.*, monitor.*, checkpoint.*  as every method (augment3d.* is not read: see above).
Variants:
  ''     this CPU: 32^3 cubes, batch 8, Adam 1e-3 (as rotation3d's default).
  paper  128^3 cubes, batch 2, Adam 1e-4: the released code's exemplar_3d.json (which draws
         negatives from the dataset; here, with a batch of 2, each cube is the other's negative).
  tiny   tests: base.tiny_3d_settings (16^3 cubes, a two-level encoder) and a 16-d embedding.
"""

import ml_collections

from configs import base


def get_config(arg=None):
  config = base.get_config(arg)
  config.method = 'exemplar3d'
  config.model.backbone = 'unet3d'
  config.data.volume_size = 32
  config.train.batch_size = 8
  config.train.optimizer = 'adam'
  config.train.learning_rate = 1e-3
  config.exemplar3d = ml_collections.ConfigDict()
  e = config.exemplar3d
  e.code_size = 1024
  e.margin = 1.0
  e.distance = 'squared_l2'
  e.pretext_head = False
  e.augment = ml_collections.ConfigDict()
  a = e.augment
  a.flip_prob = 0.5
  a.rotate_prob = 0.5
  a.quarter_turn_prob = 0.5
  a.color_prob = 0.5
  a.brightness_delta = 0.125
  a.contrast_range = (0.5, 1.5)
  a.zoom_prob = 0.15
  a.zoom_range = (0.8, 1.2)
  if arg == 'paper':
    config.data.volume_size = 128
    config.train.batch_size = 2
    config.train.learning_rate = 1e-4
  elif arg == 'tiny':
    base.tiny_3d_settings(config)
    e.code_size = 16
  return config
