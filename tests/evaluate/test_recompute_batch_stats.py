"""evaluate.recompute_batch_stats: an encoder's BatchNorm running statistics become the exact
statistics of its train-mode inputs over the train split's images before features are extracted,
checked against numpy on an encoder of two BatchNorms (the second's inputs depend on the first's
batch normalisation)."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import linear_eval
from data_pipelines import pipeline
from dsset.evaluate import features
from dsset.models import layers

EPSILON = 1e-5


class TwoNorms(nn.Module):
  """[N, H, W, C] -> per-position Dense - BatchNorm - ReLU - Dense - BatchNorm -> mean over space."""

  norm: type
  num_features: int = 3

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(self.norm(use_running_average=not train, epsilon=EPSILON)(nn.Dense(4)(x)))
    x = self.norm(use_running_average=not train, epsilon=EPSILON)(nn.Dense(3)(x))
    return x.mean(axis=(1, 2))


def numpy_statistics(params, images, batch_size):
  """Each BatchNorm's mean and variance of its inputs over all images, the network run in train
  mode batch by batch (padding left out), in float64."""
  x = (images.astype(np.float64) / 255.0 - 0.5) / 0.25
  sums = {name: [0.0, 0.0, 0] for name in ('BatchNorm_0', 'BatchNorm_1')}
  for start in range(0, len(x), batch_size):
    h = x[start:start + batch_size]
    for dense, norm in (('Dense_0', 'BatchNorm_0'), ('Dense_1', 'BatchNorm_1')):
      h = h @ params[dense]['kernel'] + params[dense]['bias']
      rows = h.reshape(-1, h.shape[-1])
      sums[norm][0] += rows.sum(0)
      sums[norm][1] += (rows ** 2).sum(0)
      sums[norm][2] += len(rows)
      h = (h - rows.mean(0)) / np.sqrt(rows.var(0) + EPSILON)
      h = np.maximum(h * params[norm]['scale'] + params[norm]['bias'], 0.0)
  return {name: {'mean': s / n, 'var': squares / n - (s / n) ** 2}
          for name, (s, squares, n) in sums.items()}


@pytest.mark.parametrize('norm', [nn.BatchNorm, layers.BatchNorm], ids=['flax', 'cpu_fast_path'])
def test_recomputed_statistics_are_those_of_the_train_images(norm, monkeypatch):
  monkeypatch.setattr(features.FeatureExtractor, 'make_encoder', lambda self, _: TwoNorms(norm))
  config = linear_eval.get_config('tiny')
  config.data.phantom.depth = 8  # 8 train scans: 64 slices, in batches of 40 and 24 (+16 padding)
  config.evaluate.batch_size = 40
  extractor = features.FeatureExtractor(config)  # default 'always'
  assert extractor.batch_stats_settings == {'recompute_batch_stats': 'always',
                                            'batch_stats_recomputed': True}
  images = np.concatenate([scan['slices'] for scan in
                           pipeline.make_eval_dataset(config, 'train', 'scan')])
  assert len(images) == 64
  params = jax.tree.map(lambda p: np.asarray(p, np.float64), extractor.variables['params'])
  # float32 against float64: the train-mode pass normalises with Flax's E[x^2] - E[x]^2, which
  # loses digits on the phantom's near-constant air. The errors the check is for are far larger
  # (counting the 16 padding images moves some statistics by 8 %).
  jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-4),
               extractor.variables['batch_stats'], numpy_statistics(params, images, 40))

  config.evaluate.recompute_batch_stats = 'never'
  untouched = features.FeatureExtractor(config)
  assert not untouched.batch_stats_recomputed
  for stats in untouched.variables['batch_stats'].values():  # still the initial 0 and 1
    np.testing.assert_array_equal(stats['mean'], 0.0)
    np.testing.assert_array_equal(stats['var'], 1.0)
  # An encoder handed in (a fine-tuned one) is never changed, whatever the setting.
  config.evaluate.recompute_batch_stats = 'always'
  handed_in = features.FeatureExtractor(config, variables=untouched.variables)
  assert handed_in.variables is untouched.variables and not handed_in.batch_stats_recomputed
