"""SwAV on slices: online clustering by swapped prediction of Sinkhorn codes (python -m dsset.main
--config=configs/swav.py[:paper|:compare|:tiny] --workdir=DIR; dsset.methods.swav).

Keys this method reads: those of simclr.py except loss.*, and
  swav.num_prototypes           K, prototypes (a bias-free linear layer on the unit projection).
  swav.temperature              softmax temperature of the swapped prediction (SwAV: 0.1).
  swav.epsilon                  Sinkhorn-Knopp entropic regularisation (SwAV: 0.05).
  swav.sinkhorn_iterations      Sinkhorn-Knopp iterations (SwAV: 3).
  swav.freeze_prototypes_steps  the prototypes' updates are discarded for this many first steps.
  swav.queue_length             projections of past examples (per view) that join the batch in
                                Sinkhorn once the queue is full; 0 = no queue. Matters for small
                                batches: codes over 32 examples and 3000 prototypes are nearly flat.
  swav.num_small_crops          SwAV's multi-crop: N small views per example besides the two large
                                ones, cut from the same slice; 0 = off (two views, as before).
                                Needs model.batch_norm_views 'joint'. Codes come from the large
                                views; every other view predicts each large view's codes.
  swav.small_crop_size          side of a small view in pixels, <= data.image_size; by default
                                half of data.image_size (rounded up), following an override of it.
  swav.small_crop_scale         area range of a small view's random resized crop (SwAV: 0.05-0.14).
  swav.large_crop_scale         area range of the two large views' crops when num_small_crops > 0
                                (SwAV: 0.14-1); with 0 they keep augment.crop_scale.
Variants:
  ''       3000 prototypes, a queue of 1024, prototypes frozen for the 30 warm-up steps.
  paper    the VISSL/SwAV ImageNet recipe as far as this project goes: ResNet-50, 3000 prototypes,
           LARS with 0.3 per 256 examples (batch 256, so 0.3), weight decay 1e-6, queue 3840,
           prototypes frozen 313 steps, multi-crop as SwAV's 2 x 224 + 6 x 96: two 224 px views
           (data.image_size 224, as configs/base.py's vissl_paper_settings; grey slices resized
           to 224) and six 96 px views. Set train.num_epochs (epochs over the train slices).
  compare  the shared comparison settings (configs/base.py compare_settings) with a queue of 1024.
  tiny     16 prototypes and a queue of 16, for tests.
"""

import ml_collections

from configs import base


def get_config(arg=None):
  config = base.get_config(arg)
  config.method = 'swav'
  config.data.set_size = 1
  # SwAV's code (DeepCluster-v2's too) runs the views of one size through the model in one call.
  config.model.batch_norm_views = 'joint'
  config.swav = ml_collections.ConfigDict()
  s = config.swav
  s.num_prototypes = 3000
  s.temperature = 0.1
  s.epsilon = 0.05
  s.sinkhorn_iterations = 3
  s.freeze_prototypes_steps = int(config.train.warmup_steps)
  s.queue_length = 1024
  s.num_small_crops = 0
  # A reference, so that an override of data.image_size (here or on the command line) moves it too.
  s.small_crop_size = (config.data.get_ref('image_size') + 1) // 2
  s.small_crop_scale = (0.05, 0.14)
  s.large_crop_scale = (0.14, 1.0)
  if arg == 'paper':
    base.vissl_paper_settings(config)
    s.queue_length = 3840
    s.freeze_prototypes_steps = 313
    s.num_small_crops = 6
    s.small_crop_size = 96
  elif arg == 'tiny':
    s.num_prototypes = 16
    s.queue_length = 16
    s.freeze_prototypes_steps = 0
  return config
