"""Turns SIGTERM / SIGINT into a request to checkpoint and stop at the next step boundary.

TPU preemption and SLURM send SIGTERM some seconds before killing a job; Ctrl-C sends SIGINT. The
training loop polls `requested()` after each step, saves a checkpoint at that step and exits, so a
rerun resumes with no step lost or repeated. With several processes the signal may reach them at
different steps; they then agree through JAX's preemption sync point (Orbax's reached_preemption),
which only exists when jax.distributed is initialised.
"""

from __future__ import annotations

import signal
import threading

import jax

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
  """Context manager that records the first stop signal instead of dying on it."""

  def __init__(self):
    self.signum: int | None = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      # A second Ctrl-C means "now": give up on the clean stop.
      raise KeyboardInterrupt
    self.signum = signum

  def __enter__(self) -> 'StopRequest':
    # Signal handlers can only be installed from the main thread (not, e.g., inside a notebook
    # worker thread); elsewhere the default behaviour stays.
    if threading.current_thread() is threading.main_thread():
      for s in _SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()

  def requested(self, step: int, manager) -> bool:
    """Whether to checkpoint and stop after `step` (all processes answer alike)."""
    if jax.process_count() > 1:
      return self.signum is not None or manager.reached_preemption(step)
    return self.signum is not None

  @property
  def name(self) -> str:
    return signal.Signals(self.signum).name if self.signum is not None else 'preemption'
