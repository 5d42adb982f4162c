"""SimCLR baseline: both views are one slice drawn uniformly from all slices of all scans."""

from configs import base


def get_config(arg=None):
  config = base.get_config(arg)
  config.method = 'simclr'
  config.data.set_size = 1
  return config
