"""Turns SIGTERM / SIGINT into a request to checkpoint and stop at a step boundary.

TPU preemption and SLURM send SIGTERM some seconds before killing a job; Ctrl-C sends SIGINT. The
training loop asks `requested()` after dispatching each step, saves a checkpoint at that step and
exits, so a rerun resumes with no step lost or repeated.

With one process the answer is this process's signal, so training stops after the step in flight;
the loop never runs more than one step ahead of the device, so no backlog of dispatched steps has
to finish first (a stop costs at most the running step and one queued step).
With several, a signal may reach only some of them (a scheduler killing one task, a user's kill),
and a process that stopped alone would leave the others waiting in a collective. So every step
carries each process's vote (`vote()`, one flag per batch row) into the jitted step, which returns
whether any process voted; each process reads that answer for step s - 1 after dispatching step s,
and all of them stop after step s: the same step, decided from the same device value. JAX's own
preemption notice (Orbax's reached_preemption, TPU maintenance events) is honoured too.
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
    self._pending: list[jax.Array] = []  # votes of dispatched steps not yet read
    self._from_other_process = False

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

  def vote(self) -> bool:
    """This process's wish to stop, for the step about to be dispatched."""
    return self.signum is not None

  def requested(self, step: int, manager, any_vote: jax.Array) -> bool:
    """Whether to checkpoint and stop after `step` (all processes answer alike).

    any_vote: the step's output saying whether any process voted to stop in it.
    """
    self._pending.append(any_vote)
    # Waiting for the previous step keeps at most one step queued behind the running one, so a
    # stop never waits for a backlog of dispatched steps (host-side dispatch runs ahead otherwise).
    agreed = len(self._pending) > 1 and bool(jax.device_get(self._pending.pop(0)))
    if jax.process_count() == 1:
      return self.signum is not None
    if agreed and self.signum is None:
      self.signum = signal.SIGTERM  # another process's signal: stop as if this one got it
      self._from_other_process = True
    return agreed or manager.reached_preemption(step)

  @property
  def name(self) -> str:
    if self._from_other_process:
      return 'a stop request from another process'
    return signal.Signals(self.signum).name if self.signum is not None else 'preemption'
