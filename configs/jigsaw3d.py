"""3D jigsaw puzzles (Taleb et al.): the 3D U-Net encoder learns which of 100 permutations shuffled
the 27 patches of a 3^3 grid over a random cube (python -m dsset.main
--config=configs/jigsaw3d.py[:paper|:tiny] --workdir=DIR; dsset.methods.jigsaw3d). The encoder is
exported for configs/segment3d.py and configs/linear_eval3d.py.

Keys this method reads:
  jigsaw3d.patches_per_side   n: the cube is split into n^3 cells, one patch each.
  jigsaw3d.patch_jitter       least room (voxels) a patch leaves in its cell (see configs/rpl3d.py).
  jigsaw3d.num_permutations   P: the classes; chosen once by maximal Hamming distance, kept in the
                              checkpoint.
  jigsaw3d.permutation_seed   seed of the candidates the permutations are chosen from.
  data.volume_size, data.voxel_mm, model.*, augment3d.*, train.*, monitor.*, checkpoint.*   as in
                              configs/rpl3d.py (the probe reads the mean of the patches' features).
Variants:
  ''     this CPU: 64^3 cubes of 2.5 mm voxels (patches of 16^3), jitter 3, batch 4 (108 patches
         a step), Adam 1e-3; the voxel size as in configs/rpl3d.py.
  paper  128^3 cubes (patches of 32^3 where the released code used 39^3), jitter 3, 100
         permutations, batch 8, Adam 1e-4 (HealthML jigsaw_3d.json).
  tiny   tests: 16^3 cubes, a two-level encoder, 4^3 patches, jitter 1.
"""

from configs import base
from configs.rpl3d import patch_task_settings


def get_config(arg=None):
  config = base.get_config(arg)
  config.method = 'jigsaw3d'
  s = patch_task_settings(config, arg, 'jigsaw3d')
  s.num_permutations = 100
  s.permutation_seed = 0
  config.train.batch_size = 8 if arg == 'paper' else 4
  return config
