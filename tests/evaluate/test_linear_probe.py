"""The linear probe trained by the training loop equals full-batch Adam on logistic regression
written out in numpy, one model per weight decay."""

import jax
import numpy as np

from configs import linear_eval
from dsset import parallel, train
from dsset.evaluate import features, probes
from dsset.methods import make_method


def _softmax(z):
  z = z - z.max(axis=1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=1, keepdims=True)


def _numpy_probe(x, y, num_classes, weight_decay, steps, lr, grid_size):
  """Full-batch Adam (optax defaults) on mean cross-entropy + wd/2 |W|^2, from zeros.

  The loop's loss is the mean over the grid of the probes' losses, so each probe's gradient is
  1/grid_size of its own; Adam is scale-free up to its epsilon, which the reference mirrors.
  """
  w, b = np.zeros((x.shape[1], num_classes)), np.zeros(num_classes)
  m = [np.zeros_like(w), np.zeros_like(b)]
  v = [np.zeros_like(w), np.zeros_like(b)]
  onehot = np.eye(num_classes)[y]
  for t in range(1, steps + 1):
    p = _softmax(x @ w + b)
    gw = (x.T @ (p - onehot) / len(y) + weight_decay * w) / grid_size
    gb = (p - onehot).mean(0) / grid_size
    for i, (param, g) in enumerate(((w, gw), (b, gb))):
      m[i] = 0.9 * m[i] + 0.1 * g
      v[i] = 0.999 * v[i] + 0.001 * g * g
      step = lr * (m[i] / (1 - 0.9**t)) / (np.sqrt(v[i] / (1 - 0.999**t)) + 1e-8)
      param -= step
  return w, b


def test_loop_trained_probe_matches_a_numpy_reference(tmp_path):
  config = linear_eval.get_config('tiny')
  config.train.num_steps = 25
  config.evaluate.weight_decays = (0.0, 0.1)
  method = make_method(config)
  mesh = parallel.make_mesh(jax.devices())  # 8 devices: a padded full batch
  variables = train._train(config, method, str(tmp_path), mesh,
                           method.make_train_iterator(batch_multiple=mesh.devices.size))
  extractor = features.FeatureExtractor(config)
  data = method.split_features(extractor)
  mean, scale = probes.standardiser(data['train'].features)
  x = (data['train'].features - mean) / scale
  for index, weight_decay in enumerate(config.evaluate.weight_decays):
    w, b = _numpy_probe(x.astype(np.float64), data['train'].labels, 4, weight_decay, 25, 0.05, 2)
    np.testing.assert_allclose(variables['params']['kernel'][index], w, rtol=2e-3, atol=2e-4)
    np.testing.assert_allclose(variables['params']['bias'][index], b, rtol=2e-3, atol=2e-4)
