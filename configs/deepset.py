"""DeepSet SimCLR (DS-SimCLR): each view is a set of K evenly spaced slices of a random window of one
scan, encoded by a Deep Set (python -m dsset.main --config=configs/deepset.py[:paper|:compare|:tiny]
--workdir=DIR).

Keys this method reads: those of simclr.py, and
  data.set_size           K, slices per set.
  data.window             omega, the window width as a fraction of the scan's slices.
  data.variable_set_size  pad the sets of scans shorter than K and mask the missing slices
                          (otherwise such scans are left out).
  model.pooling, model.rho  set pooling ('sum' | 'mean') and the optional rho MLP after it.
"""

from configs import base


def get_config(arg=None):
  config = base.get_config(arg)
  config.method = 'deepset'
  config.data.set_size = 3
  config.data.window = 0.5
  return config
