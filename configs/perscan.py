"""Per-scan SimCLR: the views are slices i and i + ceil(omega * n) of one scan."""

from configs import base


def get_config(arg=None):
  config = base.get_config(arg)
  config.method = 'perscan'
  config.data.set_size = 1
  config.data.window = 0.1
  return config
