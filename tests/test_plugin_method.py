"""Methods are plug-ins: a method defined here, outside dsset, trains, checkpoints and resumes
through the real command line (dsset.main's flags, config checks, loop and checkpoints)."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import optax

from data_pipelines import pipeline
from data_pipelines.record_iterator import RecordIterator
from dsset import checkpointing, methods, models
from dsset.evaluate import features
from dsset.methods import Method, StepOutput
from tests import xla_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))


class Classifier(nn.Module):
  backbone: nn.Module
  num_classes: int

  @nn.compact
  def __call__(self, images, train: bool):
    return nn.Dense(self.num_classes, name='head')(self.backbone(images, train=train))


class SupervisedMethod(Method):
  """Supervised slice classification on the scan labels: the smallest complete method."""

  def make_train_iterator(self, process_index=0, process_count=1, batch_multiple=1):
    scans = [s for s in pipeline.make_eval_dataset(self.config, 'train', 'scan')
             if s['label'] >= 0]
    images = np.concatenate([s['slices'] for s in scans])
    labels = np.concatenate([np.full(len(s['slices']), s['label'], np.int32) for s in scans])
    self.model = Classifier(models.make_backbone(self.config.model), num_classes=4)

    def make_batch(indices, positions):
      del positions
      return {'images': images[indices], 'label': labels[indices]}

    return RecordIterator(len(images), int(self.config.train.batch_size), make_batch,
                          int(self.config.seed), process_index, process_count)

  def init(self, rng):
    size, channels = self.config.data.image_size, self.config.data.channels
    return self.model.init(rng, jnp.zeros((1, size, size, channels)), train=False)

  def loss(self, params, batch_stats, batch, rng, phase):
    logits, updates = self.model.apply(
        {'params': params, 'batch_stats': batch_stats}, features.normalise_images(batch['images']),
        train=True, mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
    return loss, StepOutput(updates['batch_stats'], {'train_accuracy': accuracy})

  def finish(self, variables, workdir):
    return {'backbone': checkpointing.export_backbone(workdir, variables, self.encoder_path,
                                                      self.config.model)}


# dsset.main as `python -m dsset.main` runs it, with the method above registered first.
CLI = ('import sys; sys.path.insert(0, {tests!r}); import test_plugin_method as t; '
       'from dsset import main, methods; methods.METHODS["supervised"] = t.SupervisedMethod; '
       'from absl import app; main.define_flags(); '
       'app.run(main.main, flags_parser=main.parse_flags)').format(tests=TESTS)


def run_cli(workdir, num_steps):
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  env['XLA_FLAGS'] = xla_env.ONE_DEVICE  # one CPU device, as a user's laptop has
  return subprocess.run(
      [sys.executable, '-c', CLI, '--config=configs/base.py:tiny', f'--workdir={workdir}',
       '--config.method=supervised', f'--config.train.num_steps={num_steps}',
       '--config.train.schedule=constant', '--config.train.warmup_steps=0'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_a_method_defined_outside_dsset_trains_checkpoints_and_resumes(tmp_path):
  assert 'supervised' not in methods.METHODS
  workdir = tmp_path / 'run'
  first = run_cli(workdir, 2)
  assert first.returncode == 0, first.stderr
  second = run_cli(workdir, 4)
  assert second.returncode == 0, second.stderr
  assert 'Resuming from the checkpoint at step 2' in second.stderr
  with open(workdir / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  assert [r['step'] for r in records] == [1, 2, 3, 4]
  assert all(0 <= r['train_accuracy'] <= 1 and np.isfinite(r['loss']) for r in records)
  assert (workdir / 'backbone.msgpack').exists()


def test_an_unknown_method_is_one_clear_line(tmp_path):
  env = dict(os.environ)
  env['XLA_FLAGS'] = xla_env.ONE_DEVICE  # one CPU device, as a user's laptop has
  result = subprocess.run(
      [sys.executable, '-m', 'dsset.main', '--config=configs/base.py:tiny',
       f'--workdir={tmp_path}', '--config.method=supervised'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert "method='supervised'" in result.stderr and 'Traceback' not in result.stderr
