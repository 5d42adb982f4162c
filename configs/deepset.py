"""DeepSet SimCLR: each view is a set of K evenly spaced slices of a random window of one scan."""

from configs import base


def get_config(arg=None):
  config = base.get_config(arg)
  config.method = 'deepset'
  config.data.set_size = 3
  config.data.window = 0.5
  return config
