"""Optimisers and learning-rate schedules from config (optax)."""

from __future__ import annotations

import math

import jax
import optax


# adam: L2-style decay added to the gradient (as the reference PyTorch code); adamw: decoupled decay
# (fine-tuning and segmentation); sgd with momentum; lars.
OPTIMIZERS = ('adam', 'adamw', 'sgd', 'lars')


def steps_per_epoch(num_records: int, batch_size: int) -> int:
  """Steps of one pass over num_records examples: ceil(records / batch), so every record comes at
  least once (the stream runs on into the next epoch rather than dropping a partial batch)."""
  return max(1, math.ceil(num_records / batch_size))


def steps_from_epochs(train_config, num_records: int, record_name: str) -> str:
  """Sets train.num_steps from train.num_epochs and train.warmup_steps from train.warmup_epochs
  (each when > 0), with epochs of num_records examples (record_name says what they are, e.g.
  'slices'); returns the line that tells the user.

  Run once, when the train data is known and before the schedule is built, so the schedule, the
  loop, checkpoints and a resume all see the same step counts (config.json records them).
  """
  epochs, warmup_epochs = int(train_config.num_epochs), int(train_config.warmup_epochs)
  batch = int(train_config.batch_size)
  per_epoch = steps_per_epoch(num_records, batch)
  said = []
  if epochs:
    train_config.num_steps = epochs * per_epoch
    said.append(f'train.num_epochs={epochs} x {num_records} {record_name} / batch {batch} = '
                f'{train_config.num_steps} steps ({per_epoch} per epoch)')
  if warmup_epochs:
    train_config.warmup_steps = warmup_epochs * per_epoch
    said.append(f'train.warmup_epochs={warmup_epochs} = {train_config.warmup_steps} steps')
  return '; '.join(said)


def learning_rate_schedule(train_config) -> optax.Schedule:
  """Linear warm-up from 0, then cosine decay to 0 at num_steps (or constant)."""
  peak = float(train_config.learning_rate)
  warmup = min(int(train_config.warmup_steps), int(train_config.num_steps))
  if train_config.schedule == 'constant':
    after = optax.constant_schedule(peak)
  else:
    after = optax.cosine_decay_schedule(peak, max(int(train_config.num_steps) - warmup, 1))
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def _decay_mask(params):
  """Weight decay on weight matrices and kernels only: not on biases or BatchNorm scales."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(train_config) -> optax.GradientTransformation:
  """The optimiser train.optimizer names (OPTIMIZERS), with train.* settings."""
  schedule = learning_rate_schedule(train_config)
  wd = float(train_config.weight_decay)
  parts = []
  if train_config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(train_config.grad_clip_norm)))
  if train_config.optimizer == 'lars':
    parts.append(optax.lars(schedule, weight_decay=wd, weight_decay_mask=_decay_mask,
                            trust_ratio_mask=_decay_mask, momentum=train_config.momentum))
  elif train_config.optimizer == 'adamw':
    parts.append(optax.adamw(schedule, weight_decay=wd, mask=_decay_mask))
  else:
    if wd > 0:
      parts.append(optax.add_decayed_weights(wd, mask=_decay_mask))
    if train_config.optimizer == 'adam':
      parts.append(optax.adam(schedule))
    else:
      parts.append(optax.sgd(schedule, momentum=train_config.momentum))
  return optax.chain(*parts)
