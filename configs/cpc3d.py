"""3D contrastive predictive coding (Taleb et al.): the 3D U-Net encoder codes a grid of patches of
a random cube of a scan, a GRU reads the context rows of every column and linear predictors
name the codes of the following rows among the batch's others (python -m dsset.main
--config=configs/cpc3d.py[:paper|:tiny] --workdir=DIR; dsset.methods.cpc3d defines rows, columns,
context and losses). The encoder is exported for configs/segment3d.py and
configs/linear_eval3d.py.

Keys this method reads:
  data.volume_size, data.voxel_mm   the cube (voxels per side) and its isotropic voxel size in mm
                                    (0 = the scan's own voxels); docs/data.md, "Volumes".
  model.unet3d.*                    encoder widths and dropout; volume_size / cpc3d.grid must be
                                    a multiple of 2 ** len(model.unet3d.filters).
  cpc3d.grid                        G: patches per side of the cube (G^3 per volume).
  cpc3d.context_rows                R: rows (along the cube's axis 0) the GRU reads.
  cpc3d.prediction_steps            K: rows after the context that are predicted (R + K <= G).
  cpc3d.context                     'pyramid' (the released code: the context rows widen by one
                                    patch per side and row away from the predictions) | 'column'.
  cpc3d.code_size                   length of a patch code (a linear layer on the pooled features).
  cpc3d.gru_units                   the GRU's state (the context vector).
  cpc3d.loss                        'infonce' (the paper: every other patch code of the batch is a
                                    negative) | 'binary' (the released code: sigmoid of the mean
                                    product, one random other column as the negative).
  cpc3d.flip_prob, cpc3d.crop_fraction   per-patch augmentation: flip along axis 0, then a random
                                    crop of that share of the side, zero-padded back (released
                                    code: 0.5 and 7/8).
  train.*, monitor.*, checkpoint.*  as every method. augment3d.* is not read.
Variants:
  ''     this CPU: 48^3 cubes of 2.5 mm voxels as a 3 x 3 x 3 grid of 16^3 patches, 2 context rows
         predict the last row (one step), batch 4, Adam 1e-3.
         Why 2.5 mm: at the phantom's own 5 mm a 48^3 cube is 240 mm deep and the scan 160 mm, so
         a third of the rows would be zero padding, whose identical codes no prediction can tell
         apart; at 2.5 mm (120 mm) the cube is all scan, as in rpl3d/jigsaw3d
         (--config.data.voxel_mm=0 keeps the scans' own voxels).
         Why not the paper's grid: 4 x 4 x 4 needs 64^3 cubes for the encoder's 16^3 minimum
         patch, and a step of 4 such cubes (256 patches, the voxels of four 64^3 volumes) took
         6-10 s on this shared 2-core CPU, against 3 s for 48^3 (108 patches). Two context rows
         rather than the released code's split of a 3-grid (1 row predicting 2) keep a real
         pyramid (10 patches) for the GRU to read.
  paper  128^3 cubes, 4 x 4 x 4 grid of 32^3 patches, 2 context rows predicting 2, code 1024,
         GRU 256, Adam 1e-4, batch 32 (the released configs/train/cpc_3d.json).
  tiny   16^3 cubes as the paper's 4 x 4 x 4 grid (2 + 2 rows) of 4^3 patches through the
         two-level tiny encoder, code 16, GRU 8 (tests: every part of the paper's geometry at a
         test's cost).
"""

import ml_collections

from configs import base


def get_config(arg=None):
  config = base.get_config(arg)
  config.method = 'cpc3d'
  config.model.backbone = 'unet3d'
  config.data.volume_size = 48
  config.train.batch_size = 4
  config.train.optimizer = 'adam'
  config.train.learning_rate = 1e-3
  config.cpc3d = ml_collections.ConfigDict()
  c = config.cpc3d
  c.grid = 3
  c.context_rows = 2
  c.prediction_steps = 1
  c.context = 'pyramid'
  c.code_size = 1024
  c.gru_units = 256
  c.loss = 'infonce'
  c.flip_prob = 0.5
  c.crop_fraction = 7 / 8
  if arg in ('paper', 'tiny'):
    c.grid = 4
    c.prediction_steps = 2
  else:
    config.data.voxel_mm = 2.5
  if arg == 'paper':
    config.data.volume_size = 128
    config.train.batch_size = 32
    config.train.learning_rate = 1e-4
  elif arg == 'tiny':
    base.tiny_3d_settings(config)  # 16^3 cubes, so 4^3 patches
    c.code_size = 16
    c.gru_units = 8
  return config
