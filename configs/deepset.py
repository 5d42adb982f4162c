"""DeepSet SimCLR (DS-SimCLR): each view is a set of K evenly spaced slices of a random window of one
scan, encoded by a Deep Set (python -m dsset.main --config=configs/deepset.py[:paper|:compare|:tiny]
--workdir=DIR).

Keys this method reads: those of simclr.py, and
  data.set_size           K, slices per set.
  data.window             omega, the window width as a fraction of the scan's slices.
  data.short_scans        a set from a scan shorter than K: 'repeat' (the reference: K slices,
                          some repeated) or 'pad' (min(n, K) slices, the rest masked out).
  data.min_slices         (every method) scans with fewer slices are left out; K leaves out the
                          scans too short for a set, for every method alike.
  model.pooling, model.rho  set pooling ('sum' | 'mean') and the optional rho MLP after it.
"""

from configs import base


def get_config(arg=None):
  config = base.get_config(arg)
  config.method = 'deepset'
  config.data.set_size = 3
  config.data.window = 0.5
  if arg == 'paper':
    config.model.rho = True  # the reference's dedicated_deepset_mlp (configs/example.yaml)
  return config
