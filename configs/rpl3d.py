"""Relative 3D patch location (Taleb et al.): the 3D U-Net encoder learns which of the 26 neighbours
of the centre patch of a 3^3 grid over a random cube it is shown (python -m dsset.main
--config=configs/rpl3d.py[:paper|:tiny] --workdir=DIR; dsset.methods.rpl3d). The encoder is
exported for configs/segment3d.py and configs/linear_eval3d.py.

Keys this method reads:
  rpl3d.patches_per_side   n: the cube is split into n^3 cells (odd, >= 3; n^3 - 1 classes).
  rpl3d.patch_jitter       least room (voxels) a patch leaves in its cell: its side is the largest
                           multiple of 2^len(model.unet3d.filters) at most data.volume_size // n -
                           patch_jitter, and it is placed at random inside the cell.
  data.volume_size, data.voxel_mm   the cube (voxels per side) and its voxel size in mm.
  model.unet3d.*, model.pretext_hidden, model.pretext_dropout   encoder and pretext head.
  augment3d.*              on-device augmentation of the cube before the patches are cut; the
                           geometric part is off, as in the released code.
  train.*, monitor.*, checkpoint.*  as every method (the probe reads the centre patch).
Variants:
  ''     this CPU: 64^3 cubes of 2.5 mm voxels (cells of 21, patches of 16^3), jitter 3, batch 8,
         Adam 1e-3. At the scans' own 5 mm a 64^3 cube would be twice the default phantom's
         length (zero padded); --config.data.voxel_mm=0 keeps the scans' own voxels.
  paper  128^3 cubes (cells of 42, patches of 32^3: the encoder needs multiples of 16 where the
         released code used 39^3), jitter 3, batch 32, Adam 1e-4 (HealthML rpl_3d.json).
  tiny   tests: 16^3 cubes, a two-level encoder, 4^3 patches, jitter 1.
"""

import ml_collections

from configs import base


def patch_task_settings(config, arg, section: str) -> ml_collections.ConfigDict:
  """What rpl3d and jigsaw3d share: the 3D encoder, the grid keys in `section`, the cube sizes of
  each variant; returns the section."""
  config.model.backbone = 'unet3d'
  config.augment3d.flip_prob = 0.0
  config.augment3d.rotate90 = False
  config.train.optimizer = 'adam'
  config.train.learning_rate = 1e-3
  config.data.volume_size = 64
  if arg not in ('paper', 'tiny'):
    # 2.5 mm voxels: a 64^3 cube spans 160 mm, the default phantom's length (32 slices of 5 mm),
    # so cubes are all scan, from the same scans segment3d fine-tunes on (at their own 5 mm).
    config.data.voxel_mm = 2.5
  config[section] = ml_collections.ConfigDict()
  s = config[section]
  s.patches_per_side = 3
  s.patch_jitter = 3
  if arg == 'paper':
    config.data.volume_size = 128
    config.train.learning_rate = 1e-4
  elif arg == 'tiny':
    base.tiny_3d_settings(config)
    s.patch_jitter = 1
  return s


def get_config(arg=None):
  config = base.get_config(arg)
  config.method = 'rpl3d'
  patch_task_settings(config, arg, 'rpl3d')
  config.train.batch_size = 32 if arg == 'paper' else 8
  return config
