"""model.batch_norm_views: how the two views of a pair meet BatchNorm in the contrastive methods."""

import flax.linen as nn
import jax
import numpy as np
import pytest

import configs.simclr
from dsset.methods import make_method
from dsset.models import layers

MOMENTUM = 0.9
EPSILON = 1e-5


class OneNorm(nn.Module):
  """The contrastive model's interface (views, mask, train) -> (h, z) around one BatchNorm."""

  norm: type

  @nn.compact
  def __call__(self, views, mask, train):
    x = views.reshape(views.shape[0], -1)
    return x, self.norm(use_running_average=not train, momentum=MOMENTUM, epsilon=EPSILON)(x)


def normalised(x):
  return (x - x.mean(0)) / np.sqrt(x.var(0) + EPSILON)


@pytest.mark.parametrize('norm', [nn.BatchNorm, layers.BatchNorm], ids=['flax', 'cpu_fast_path'])
def test_separate_views_have_their_own_statistics_and_joint_mixes_them(norm):
  rng = np.random.default_rng(0)
  # Two views [2, B, K, H, W, C] whose means differ by far more than their spread.
  views = rng.normal(size=(2, 6, 1, 2, 2, 1)).astype(np.float32)
  views[1] += 5.0
  x_first, x_second = views[0].reshape(6, -1), views[1].reshape(6, -1)
  both = np.concatenate([x_first, x_second])
  mask = np.ones((2, 6, 1), bool)
  config = configs.simclr.get_config('tiny')
  stats = {}
  for mode in ('separate', 'joint'):
    config.model.batch_norm_views = mode
    method = make_method(config)
    method.model = OneNorm(norm)
    variables = method.model.init(jax.random.key(0), views[0], mask[0], train=False)
    (h, z), stats[mode] = jax.jit(method.apply_train)(variables['params'],
                                                      variables['batch_stats'], views, mask)
    np.testing.assert_array_equal(h, both)
    if mode == 'separate':  # each view normalised on its own: zero mean within each view
      expected = np.concatenate([normalised(x_first), normalised(x_second)])
    else:  # one batch of 2B rows, as before the key existed: each view is off-centre
      expected = normalised(both)
      assert np.all(np.abs(z[:6].mean(0)) > 0.5)
    np.testing.assert_allclose(z, expected, rtol=1e-4, atol=1e-4)
  # Running averages from mean 0 / var 1: the reference's two calls update them one view after
  # the other; 'joint' updates them once with the statistics of all 2B rows.
  step = lambda r, s: MOMENTUM * r + (1 - MOMENTUM) * s
  np.testing.assert_allclose(stats['separate']['BatchNorm_0']['mean'],
                             step(step(0.0, x_first.mean(0)), x_second.mean(0)), rtol=1e-5)
  np.testing.assert_allclose(stats['separate']['BatchNorm_0']['var'],
                             step(step(1.0, x_first.var(0)), x_second.var(0)), rtol=1e-5)
  np.testing.assert_allclose(stats['joint']['BatchNorm_0']['mean'], step(0.0, both.mean(0)),
                             rtol=1e-5)
  np.testing.assert_allclose(stats['joint']['BatchNorm_0']['var'], step(1.0, both.var(0)),
                             rtol=1e-5)
