"""DeepCluster-v2 on slices: k-means pseudo-labels from a memory bank of projections (python -m
dsset.main --config=configs/deepcluster_v2.py[:paper|:compare|:tiny] --workdir=DIR;
dsset.methods.deepcluster).

Keys this method reads: those of simclr.py except loss.*, and
  deepcluster.num_prototypes     clusters of each k-means head (one prototype layer per head).
  deepcluster.temperature        softmax temperature of the prototype scores (0.1).
  deepcluster.kmeans_iterations  spherical k-means rounds at each epoch start (10).
  deepcluster.train_prototypes   let gradients move the prototypes between k-means rounds (the
                                 released scripts keep them fixed to the centroids).
The first epoch (train slices / train.batch_size steps, rounded up) only fills the memory bank; the
loss is 0 there and the encoder does not move. k-means needs at least as many train slices as the
largest head has clusters: the phantom's default 192 scans give 136 train scans, 4352 slices.
Variants:
  ''       3 x 3000 clusters.
  paper    the VISSL recipe as far as this project goes: ResNet-50, 3 x 3000, LARS with 0.3 per 256
           examples (batch 256), weight decay 1e-6, two 224 px views (grey slices resized to 224;
           multi-crop's small views are not implemented). Set train.num_epochs (epochs over the
           train slices).
  compare  the shared comparison settings (configs/base.py compare_settings), 3 x 3000 clusters.
  tiny     12 phantom scans (48 train slices: 6 steps an epoch), 2 x 8 clusters, 3 k-means rounds,
           14 steps (bank filled, then two k-means epochs).
"""

import ml_collections

from configs import base


def get_config(arg=None):
  config = base.get_config(arg)
  config.method = 'deepcluster_v2'
  config.data.set_size = 1
  # SwAV's code (DeepCluster-v2's too) runs the views of one size through the model in one call.
  config.model.batch_norm_views = 'joint'
  config.deepcluster = ml_collections.ConfigDict()
  d = config.deepcluster
  d.num_prototypes = (3000, 3000, 3000)
  d.temperature = 0.1
  d.kmeans_iterations = 10
  d.train_prototypes = False
  if arg == 'paper':
    base.vissl_paper_settings(config)
  elif arg == 'tiny':
    config.data.phantom.num_scans = 12
    config.train.num_steps = 14
    d.num_prototypes = (8, 8)
    d.kmeans_iterations = 3
  return config
