"""Optimisers and learning-rate schedules from config (optax)."""

from __future__ import annotations

import jax
import optax


# adam: L2-style decay added to the gradient (as the reference PyTorch code); adamw: decoupled decay
# (fine-tuning and segmentation); sgd with momentum; lars.
OPTIMIZERS = ('adam', 'adamw', 'sgd', 'lars')


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
