"""Per-scan SimCLR (PS-SimCLR): the views are slices i and i + ceil(omega * n) of one scan
(python -m dsset.main --config=configs/perscan.py[:paper|:compare|:tiny] --workdir=DIR).

Keys this method reads: those of simclr.py, and
  data.window   omega, the distance between the two slices as a fraction of the scan's slices
                (scans of fewer than 5 slices give two views of one slice, as SimCLR).
data.set_size must be 1 (one slice per view).
"""

from configs import base


def get_config(arg=None):
  config = base.get_config(arg)
  config.method = 'perscan'
  config.data.set_size = 1
  config.data.window = 0.1
  return config
