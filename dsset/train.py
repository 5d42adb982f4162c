"""The one training loop, for every method: init (sharded), step, checkpoint, log, resume, finish.

Pretraining and downstream heads (linear probe, fine-tuning, segmentation) run through it alike; the
method (dsset.methods) supplies the batches, variables, loss and what happens at the end (an encoder
export, or eval.json). The state is a plain dict pytree (params, batch_stats, opt_state, the online
probe's params and optimiser state, step, rng, count of skipped non-finite steps, and the
method's own untrained state when it keeps one: Method.init_method_state). It is created
already on the device mesh from abstract shapes (replicated, but for method state a method splits
over devices: state_shardings), donated to the jitted step, and saved
whole with the data iterator's position, so a second run on the same workdir continues with the
next batch.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from dsset import checkpointing, config_validation, optim, parallel, preemption, reporting
from dsset.methods import Method, make_method
from dsset.models import LinearHead
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


# Host batch key of each row's copy of its process's stop vote (dsset.preemption): the step turns
# the votes of all processes into one answer that every process reads alike.
STOP_VOTE = 'stop_vote'
# Host batch key the samplers set to 1 for an example that stands in for an unreadable scan
# (data.on_bad_scan='skip'); the loop logs their running count as skipped_examples.
REPLACED = 'replaced'


def initialisation_key(rng: jax.Array) -> jax.Array:
  """An 'rbg' key seeded from rng, for drawing the initial weights.

  XLA:CPU compiles the initialisers several times faster with it than with the default threefry
  generator (measured on 2 cores: the tiny SimCLR init 18.6 s -> see docs/performance.md; the tiny
  3D encoder 10 s -> 1.1 s), and the initial draw needs only a seeded, reproducible generator (the
  same on one backend; CPU and GPU draws differ). Training randomness stays threefry: its bits do
  not depend on how the batch is sharded.
  """
  seed = jax.random.randint(rng, (), 0, jnp.iinfo(jnp.int32).max)
  return jax.random.key(seed, impl='rbg')


class Trainer:
  """Builds the pure state and step functions of one method."""

  def __init__(self, config, method: Method):
    self.config = config
    self.method = method
    self.tx = optim.make_optimizer(config.train)
    self.schedule = optim.learning_rate_schedule(config.train)
    self.num_classes = method.monitor_classes
    self.probe = LinearHead(num_classes=max(self.num_classes, 1))
    self.probe_tx = optax.adam(float(config.monitor.learning_rate))

  def init_state(self, rng: jax.Array) -> dict[str, Any]:
    model_rng, probe_rng, state_rng = jax.random.split(rng, 3)
    variables = self.method.init(initialisation_key(model_rng))
    probe_params = self.probe.init(
        probe_rng, jnp.zeros((1, max(self.method.monitor_dim, 1))))['params']
    method_state = self.method.init_method_state(variables)
    # Only methods with state get the key: the others' checkpoints keep their exact layout.
    extra = {'method_state': method_state} if method_state else {}
    return {
        **extra,
        'step': jnp.zeros((), jnp.int32),
        'params': variables['params'],
        'batch_stats': variables.get('batch_stats', {}),
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

  def train_step(self, state, batch, phase):
    """One update; returns (new state, metrics, whether any process voted to stop)."""
    batch = dict(batch)
    votes = batch.pop(STOP_VOTE, None)
    any_vote = jnp.any(votes) if votes is not None else jnp.zeros((), bool)
    replaced = batch.pop(REPLACED, None)
    rng = jax.random.fold_in(state['rng'], state['step'])
    method_state = state.get('method_state', {})
    # The hook's key is derived apart from the loss's, which stays what it always was.
    start_params, method_state = self.method.before_step(
        state['params'], method_state, state['step'], jax.random.fold_in(rng, 0x6d657468), phase)

    def loss_fn(params):
      return self.method.loss_with_state(params, state['batch_stats'], method_state, batch, rng,
                                         phase)

    (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(start_params)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = self.tx.update(grads, state['opt_state'], start_params)
    params = optax.apply_updates(start_params, updates)
    for path in self.method.frozen_paths(phase):
      # Decoupled weight decay would still move parameters whose gradient is zero.
      params = checkpointing.replace_subtree(params, path,
                                             checkpointing.subtree(start_params, path))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite step is never applied. In 'stop' mode the state also freezes after the first
    # one, so whatever the host saves later is the last good state.
    apply = finite
    if self.config.train.on_nonfinite == 'stop':
      apply = apply & (state['nonfinite_steps'] == 0)
    keep = lambda new, old, ok=apply: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    # A method may hold the update back (StepOutput.apply_update) without the step counting as
    # non-finite; what before_step set up is kept then.
    update = apply if out.apply_update is None else apply & out.apply_update
    new_state = dict(state)
    new_state.update(
        step=state['step'] + 1,
        params=keep(params, keep(start_params, state['params']), update),
        batch_stats=keep(out.batch_stats, state['batch_stats']),
        opt_state=keep(opt_state, state['opt_state'], update),
        nonfinite_steps=state['nonfinite_steps'] + (~finite).astype(jnp.int32),
    )
    if 'method_state' in state:
      new_method_state = method_state if out.method_state is None else out.method_state
      new_state['method_state'] = keep(new_method_state, state['method_state'])
    metrics = dict(out.metrics, loss=loss, grad_norm=grad_norm,
                   param_norm=optax.global_norm(state['params']),
                   learning_rate=self.schedule(state['step']),
                   nonfinite=(~finite).astype(jnp.float32))
    if replaced is not None:
      metrics['replaced_examples'] = jnp.sum(replaced).astype(jnp.float32)
    if self.num_classes and out.monitor_features is not None:
      probe_params, probe_opt, probe_loss, probe_acc = self._probe_update(
          state, out.monitor_features, out.monitor_labels)
      new_state.update(probe_params=keep(probe_params, state['probe_params']),
                       probe_opt_state=keep(probe_opt, state['probe_opt_state']))
      metrics.update(probe_loss=probe_loss, probe_accuracy=probe_acc)
    return new_state, metrics, any_vote


def _mean_metrics(window: list[dict[str, jax.Array]]
                  ) -> tuple[dict[str, float], int | None, float]:
  """Averages a window of step metrics; also returns the index of the first non-finite step and
  the number of examples that stood in for unreadable scans."""
  host = jax.device_get(window)
  first_bad = next((i for i, m in enumerate(host) if m['nonfinite'] > 0), None)
  replaced = float(sum(m.pop('replaced_examples', 0.0) for m in host))
  keys = host[0].keys()
  return {k: float(np.mean([m[k] for m in host])) for k in keys}, first_bad, replaced


def train_and_evaluate(config, workdir: str, devices=None) -> dict[str, Any]:
  """Runs what `config` describes in workdir (resuming if it holds a checkpoint): trains the
  config's method, then finishes it (encoder export, or evaluation and eval.json).

  Returns the method's result (for evaluations, the content of eval.json).
  devices: the devices to train on (default: every device of every process).
  """
  parallel.initialize_distributed(config.distributed)
  config_validation.validate(config)
  method = make_method(config)
  enable_compilation_cache()
  mesh = parallel.make_mesh(devices)
  is_main = jax.process_index() == 0
  variables = None
  if method.trains:
    parallel.check_batch_size(config.train.batch_size, mesh)
    # Reads the data (and checks it) before anything is written to the workdir.
    train_iter = method.make_train_iterator(jax.process_index(), jax.process_count(),
                                            batch_multiple=mesh.devices.size)
    if config.train.num_epochs or config.train.warmup_epochs:
      # Steps from epochs, now that the data is known: before the schedule and the checkpoint
      # manager exist, and written to config.json, so a resume counts the same steps.
      said = optim.steps_from_epochs(config.train, *method.epoch_records())
      if is_main:
        print(said, file=sys.stderr, flush=True)
    workdir = prepare_workdir(workdir, config)
    variables = _train(config, method, workdir, mesh, train_iter)
  else:
    workdir = prepare_workdir(workdir, config)
  result = {}
  if is_main:
    result = method.finish(variables, workdir)
    print(method.summary(result, workdir), file=sys.stderr, flush=True)
  return result


def state_shardings(method: Method, abstract_state: dict, mesh) -> dict:
  """The loop state's sharding: replicated, except the method state, which lies as the method's
  method_state_specs say (a memory bank split by rows over the data axis)."""
  repl = parallel.replicated(mesh)
  shardings = jax.tree.map(lambda _: repl, abstract_state)
  if 'method_state' in abstract_state:
    specs = method.method_state_specs(abstract_state['method_state'])
    shardings['method_state'] = jax.tree.map(
        lambda spec: NamedSharding(mesh, spec), specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec))
  return shardings


def _train(config, method: Method, workdir: str, mesh, train_iter) -> dict[str, Any]:
  """Trains to train.num_steps from the method's train_iter; returns the final
  {'params', 'batch_stats'} on the host."""
  is_main = jax.process_index() == 0
  trainer = Trainer(config, method)
  repl = parallel.replicated(mesh)
  abstract = jax.eval_shape(trainer.init_state, jax.random.PRNGKey(config.seed))
  state_sharding = state_shardings(method, abstract, mesh)
  abstract = jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                                    sharding=sharding),
                          abstract, state_sharding)

  manager = checkpointing.make_manager(workdir, config.checkpoint)
  start_step = manager.latest_step() or 0
  if start_step:
    state = checkpointing.restore(manager, start_step, abstract, train_iter)
  else:
    state = jax.jit(trainer.init_state, out_shardings=state_sharding)(
        jax.random.PRNGKey(config.seed))
    if config.init_from:
      state = _init_encoder_from(method, state, state_sharding)

  num_steps = int(config.train.num_steps)
  reporter = Reporter(workdir, num_steps, start_step, enabled=is_main)
  if start_step:
    reporter.message(f'Resuming from the checkpoint at step {start_step} in {workdir}')
  # Running count of stand-ins for unreadable scans, continued from the log across resumes.
  steps, counts = reporting.read_metric(workdir, 'skipped_examples')
  skipped_examples = float(counts[steps <= start_step][-1]) if np.any(steps <= start_step) else 0.0
  step_fn = jax.jit(trainer.train_step, donate_argnums=0, static_argnums=2,
                    out_shardings=(state_sharding, repl, repl))
  window: list[dict[str, jax.Array]] = []
  tick = time.perf_counter()
  steps_in_window = 0
  step = start_step
  with preemption.StopRequest() as stop:
    try:
      for step in range(start_step + 1, num_steps + 1):
        local = next(train_iter)
        local[STOP_VOTE] = np.full(len(next(iter(local.values()))), stop.vote())
        batch = parallel.global_batch(local, mesh)
        state, metrics, any_vote = step_fn(state, batch, method.phase(step))
        # From the batch itself: a full-batch probe's batch is its train split, not train.batch_size.
        images_per_step = len(next(iter(batch.values()))) * method.images_per_example()
        if step == start_step + 1:
          # The first call compiles; keep that out of the throughput figures.
          jax.block_until_ready(metrics)
          reporter.message(
              f'Compiled and ran the first step in {time.perf_counter() - tick:.1f} s')
          tick = time.perf_counter()
          steps_in_window = -1
        window.append(metrics)
        steps_in_window += 1
        stopping = stop.requested(step, manager, any_vote)
        is_log = step % config.train.log_every_steps == 0 or step == num_steps or stopping
        is_ckpt = step % config.checkpoint.every_steps == 0 or step == num_steps or stopping
        if not (is_log or is_ckpt):
          continue
        last, first_bad, replaced = _mean_metrics(window)
        if first_bad is not None and config.train.on_nonfinite == 'stop':
          bad_step = step - len(window) + 1 + first_bad
          good = manager.latest_step()
          raise TrainingError(
              f'non-finite loss or gradients at step {bad_step}; training stopped. '
              + (f'The last good checkpoint (step {good}) is intact. ' if good else '')
              + 'Lower train.learning_rate, set train.grad_clip_norm, or set '
              'train.on_nonfinite=skip to skip such steps.')
        elapsed = time.perf_counter() - tick
        if steps_in_window > 0 and images_per_step:
          last['images_per_s'] = images_per_step * steps_in_window / max(elapsed, 1e-9)
        last['skipped_steps'] = float(jax.device_get(state['nonfinite_steps']))
        if REPLACED in local:
          skipped_examples += replaced
          last['skipped_examples'] = skipped_examples
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
  return jax.device_get({'params': state['params'], 'batch_stats': state['batch_stats']})


def _init_encoder_from(method: Method, state, state_sharding):
  host = jax.device_get({'params': state['params'], 'batch_stats': state['batch_stats']})
  state = dict(state, **method.load_init_from(host))
  return jax.device_put(state, state_sharding)
