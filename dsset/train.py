"""The one training loop: init (sharded), step, checkpoint, log, resume.

The state is a plain dict pytree (params, batch_stats, opt_state, the online probe's params and
optimiser state, step, rng, count of skipped non-finite steps). It is created already replicated on
the device mesh from abstract shapes, donated to the jitted step, and saved whole with the data
iterator's position, so a second run on the same workdir continues with the next batch.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from data_pipelines import pipeline
from data_pipelines.sources import make_source
from dsset import checkpointing, config_validation, optim, parallel, preemption
from dsset.methods import METHODS
from dsset.models import LinearHead, feature_dim
from dsset.reporting import Reporter


COMPILATION_CACHE_ENV = 'DSSET_COMPILATION_CACHE'


def enable_compilation_cache() -> None:
  """Turns on JAX's persistent compilation cache unless the user chose otherwise.

  Compiling the training step dominates short runs on CPU (tens of seconds for ResNet-18); with the
  cache a resumed or repeated run of the same config skips it. DSSET_COMPILATION_CACHE names the
  folder ('' or 'off' disables); a cache folder set through JAX's own config is left alone.
  """
  if jax.config.jax_compilation_cache_dir:
    return
  default = os.path.join(os.path.expanduser('~'), '.cache', 'dsset', 'xla')
  path = os.environ.get(COMPILATION_CACHE_ENV, default)
  if path in ('', 'off', '0'):
    return
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


class TrainingError(RuntimeError):
  """Training cannot go on (non-finite loss); the message says what to change."""


class Interrupted(Exception):
  """Training stopped early on a signal, after saving a checkpoint at `step`."""

  def __init__(self, step: int, signum: int | None):
    super().__init__(f'stopped after step {step}')
    self.step = step
    self.signum = signum


def prepare_workdir(workdir: str, config) -> str:
  """Creates the workdir, proves it is writable, and records the resolved config."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test_{os.getpid()}')
    with open(probe, 'wb') as f:
      f.write(b'\0' * 4096)
    os.remove(probe)
  except OSError as e:
    raise config_validation.ConfigError(
        f'--workdir={workdir} is not a writable folder: {e.strerror or e}') from None
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json.tmp'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(os.path.join(workdir, 'config.json.tmp'), os.path.join(workdir, 'config.json'))
  return workdir


class Trainer:
  """Builds the pure step and state functions for one config."""

  def __init__(self, config, num_classes: int):
    self.config = config
    self.method = METHODS[config.method](config)
    self.tx = optim.make_optimizer(config.train)
    self.schedule = optim.learning_rate_schedule(config.train)
    self.num_classes = num_classes if config.monitor.enabled else 0
    self.probe = LinearHead(num_classes=max(self.num_classes, 1))
    self.probe_tx = optax.adam(float(config.monitor.learning_rate))
    # The set encoder (sum/mean pooling, rho) keeps the backbone's feature length.
    self.feature_dim = feature_dim(config.model)

  def init_state(self, rng: jax.Array) -> dict[str, Any]:
    model_rng, probe_rng, state_rng = jax.random.split(rng, 3)
    variables = self.method.init(model_rng)
    probe_params = self.probe.init(probe_rng, jnp.zeros((1, self.feature_dim)))['params']
    return {
        'step': jnp.zeros((), jnp.int32),
        'params': variables['params'],
        'batch_stats': variables['batch_stats'],
        'opt_state': self.tx.init(variables['params']),
        'probe_params': probe_params,
        'probe_opt_state': self.probe_tx.init(probe_params),
        'rng': state_rng,
        'nonfinite_steps': jnp.zeros((), jnp.int32),
    }

  def _probe_update(self, state, features, labels):
    """One step of the stop-gradient linear probe; returns (params, opt_state, loss, accuracy)."""
    features = jax.lax.stop_gradient(features.astype(jnp.float32))
    valid = (labels >= 0).astype(jnp.float32)
    safe_labels = jnp.maximum(labels, 0)

    def probe_loss(p):
      logits = self.probe.apply({'params': p}, features)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, safe_labels)
      return jnp.sum(ce * valid) / jnp.maximum(valid.sum(), 1.0), logits

    (loss, logits), grads = jax.value_and_grad(probe_loss, has_aux=True)(state['probe_params'])
    updates, opt_state = self.probe_tx.update(grads, state['probe_opt_state'])
    # Accuracy of the predictions made before this update: an online, held-out-like estimate.
    correct = (jnp.argmax(logits, -1) == safe_labels).astype(jnp.float32)
    accuracy = jnp.sum(correct * valid) / jnp.maximum(valid.sum(), 1.0)
    return optax.apply_updates(state['probe_params'], updates), opt_state, loss, accuracy

  def train_step(self, state, batch):
    rng = jax.random.fold_in(state['rng'], state['step'])

    def loss_fn(params):
      return self.method.loss(params, state['batch_stats'], batch, rng, train=True)

    (loss, (batch_stats, metrics, features)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state['params'])
    grad_norm = optax.global_norm(grads)
    updates, opt_state = self.tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite step is never applied. In 'stop' mode the state also freezes after the first
    # one, so whatever the host saves later is the last good state.
    apply = finite
    if self.config.train.on_nonfinite == 'stop':
      apply = apply & (state['nonfinite_steps'] == 0)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)
    new_state = dict(state)
    new_state.update(
        step=state['step'] + 1,
        params=keep(params, state['params']),
        batch_stats=keep(batch_stats, state['batch_stats']),
        opt_state=keep(opt_state, state['opt_state']),
        nonfinite_steps=state['nonfinite_steps'] + (~finite).astype(jnp.int32),
    )
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm,
                   param_norm=optax.global_norm(state['params']),
                   learning_rate=self.schedule(state['step']),
                   nonfinite=(~finite).astype(jnp.float32))
    if self.num_classes:
      labels = jnp.concatenate([batch['label'], batch['label']], axis=0)
      probe_params, probe_opt, probe_loss, probe_acc = self._probe_update(
          state, features, labels)
      new_state.update(probe_params=keep(probe_params, state['probe_params']),
                       probe_opt_state=keep(probe_opt, state['probe_opt_state']))
      metrics.update(probe_loss=probe_loss, probe_accuracy=probe_acc)
    return new_state, metrics


def _mean_metrics(window: list[dict[str, jax.Array]]) -> tuple[dict[str, float], int | None]:
  """Averages a window of step metrics; also returns the index of the first non-finite step."""
  host = jax.device_get(window)
  first_bad = next((i for i, m in enumerate(host) if m['nonfinite'] > 0), None)
  keys = host[0].keys()
  return {k: float(np.mean([m[k] for m in host])) for k in keys}, first_bad


def train_and_evaluate(config, workdir: str, devices=None) -> dict[str, float]:
  """Pretrains per config in workdir (resuming if it holds a checkpoint); returns final metrics.

  devices: the devices to train on (default: every device of every process).
  """
  parallel.initialize_distributed(config.distributed)
  config_validation.validate(config)
  workdir = prepare_workdir(workdir, config)
  enable_compilation_cache()
  mesh = parallel.make_mesh(devices)
  parallel.check_batch_size(config.train.batch_size, mesh)
  is_main = jax.process_index() == 0

  # Built once: the pipeline reuses it (a NIfTI or DICOM folder's source reads every header).
  train_source = make_source(config.data, 'train')
  trainer = Trainer(config, train_source.num_classes)
  repl = parallel.replicated(mesh)
  abstract = jax.eval_shape(trainer.init_state, jax.random.PRNGKey(config.seed))
  state_sharding = jax.tree.map(lambda _: repl, abstract)
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl),
                          abstract)

  train_iter = pipeline.make_train_iterator(config, source=train_source)
  manager = checkpointing.make_manager(workdir, config.checkpoint)
  start_step = manager.latest_step() or 0
  if start_step:
    state = checkpointing.restore(manager, start_step, abstract, train_iter)
  else:
    state = jax.jit(trainer.init_state, out_shardings=state_sharding)(
        jax.random.PRNGKey(config.seed))
    if config.init_from:
      state = _init_encoder_from(config, trainer, state, state_sharding)

  num_steps = int(config.train.num_steps)
  reporter = Reporter(workdir, num_steps, start_step, enabled=is_main)
  if start_step:
    reporter.message(f'Resuming from the checkpoint at step {start_step} in {workdir}')
  step_fn = jax.jit(trainer.train_step, donate_argnums=0,
                    out_shardings=(state_sharding, repl))
  images_per_step = config.train.batch_size * trainer.method.images_per_example()
  window: list[dict[str, jax.Array]] = []
  last: dict[str, float] = {}
  tick = time.perf_counter()
  steps_in_window = 0
  step = start_step
  with preemption.StopRequest() as stop:
    try:
      for step in range(start_step + 1, num_steps + 1):
        batch = parallel.global_batch(next(train_iter), mesh)
        state, metrics = step_fn(state, batch)
        if step == start_step + 1:
          # The first call compiles; keep that out of the throughput figures.
          jax.block_until_ready(metrics)
          reporter.message(
              f'Compiled and ran the first step in {time.perf_counter() - tick:.1f} s')
          tick = time.perf_counter()
          steps_in_window = -1
        window.append(metrics)
        steps_in_window += 1
        stopping = stop.requested(step, manager)
        is_log = step % config.train.log_every_steps == 0 or step == num_steps or stopping
        is_ckpt = step % config.checkpoint.every_steps == 0 or step == num_steps or stopping
        if not (is_log or is_ckpt):
          continue
        last, first_bad = _mean_metrics(window)
        if first_bad is not None and config.train.on_nonfinite == 'stop':
          bad_step = step - len(window) + 1 + first_bad
          good = manager.latest_step()
          raise TrainingError(
              f'non-finite loss or gradients at step {bad_step}; training stopped. '
              + (f'The last good checkpoint (step {good}) is intact. ' if good else '')
              + 'Lower train.learning_rate, set train.grad_clip_norm, or set '
              'train.on_nonfinite=skip to skip such steps.')
        elapsed = time.perf_counter() - tick
        if steps_in_window > 0:
          last['images_per_s'] = images_per_step * steps_in_window / max(elapsed, 1e-9)
        last['skipped_steps'] = float(jax.device_get(state['nonfinite_steps']))
        last.pop('nonfinite')
        reporter.write(step, last)
        window, steps_in_window, tick = [], 0, time.perf_counter()
        if is_ckpt:
          checkpointing.save(manager, step, state, train_iter)
        if stopping:
          break
    finally:
      manager.wait_until_finished()
      reporter.close()

  if step < num_steps:
    reporter.message(f'Stopped by {stop.name} after step {step}; the checkpoint is saved. Run the '
                     'same command again to resume.')
    raise Interrupted(step, stop.signum)
  if is_main:
    backbone = checkpointing.export_backbone(
        workdir, {'params': state['params'], 'batch_stats': state['batch_stats']},
        trainer.method.encoder_path, config.model, trainer.method.set_encoder_path)
    reporter.message(
        f'Done: {num_steps} steps. Results in {workdir}:\n'
        f'  metrics.jsonl (per-step metrics), checkpoints/ (resume), {os.path.basename(backbone)} '
        f'(encoder for downstream), TensorBoard: tensorboard --logdir {workdir}')
  return last


def _init_encoder_from(config, trainer: Trainer, state, state_sharding):
  encoder, source_model = checkpointing.load_backbone(config.init_from)
  if source_model.get('backbone') != config.model.backbone:
    raise config_validation.ConfigError(
        f'config key init_from={config.init_from!r} holds a {source_model.get("backbone")} '
        f'encoder but model.backbone={config.model.backbone!r}')
  host = jax.device_get({'params': state['params'], 'batch_stats': state['batch_stats']})
  variables = checkpointing.insert_backbone(host, encoder, trainer.method.encoder_path,
                                            config.init_from)
  state = dict(state, **variables)
  return jax.device_put(state, state_sharding)

