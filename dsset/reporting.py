"""Where training metrics go: metrics.jsonl, TensorBoard, and a progress display.

Only process 0 writes (the others get a reporter that does nothing), so multi-host runs produce one
log. At each log step a plain line `step N/M loss=... ...` is printed; on a terminal it is written
above a tqdm bar that shows rate and ETA with only the loss beside it, so the metrics never squeeze
the bar (otherwise, in CI and SLURM logs, the lines alone keep the log readable).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np
import tqdm


LINE_KEYS = ('loss', 'probe_accuracy', 'learning_rate', 'images_per_s')
# Beside the bar: short enough that an 80-column terminal keeps a wide bar.
BAR_KEYS = ('loss',)


def _format(metrics: dict[str, float], keys=LINE_KEYS) -> str:
  return ' '.join(f'{k}={metrics[k]:.4g}' for k in keys if k in metrics)


class Reporter:
  """Writes one JSON object per logged step and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, num_steps: int, initial_step: int, enabled: bool = True,
               stream=None):
    self.enabled = enabled
    self.num_steps = num_steps
    self.stream = sys.stderr if stream is None else stream
    self._bar = None
    self._tb = None
    self._jsonl = None
    if not enabled:
      return
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', buffering=1)
    from tensorboardX import SummaryWriter  # imported lazily: it is slow to import
    self._tb = SummaryWriter(logdir=workdir, flush_secs=30)
    if self.stream.isatty():
      self._bar = tqdm.tqdm(total=num_steps, initial=initial_step, unit='step',
                            dynamic_ncols=True, file=self.stream)
    self._last_step = initial_step

  def message(self, text: str) -> None:
    """A line for the user that does not break the progress bar."""
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text, file=self.stream)
    else:
      print(text, file=self.stream, flush=True)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    record = {'step': int(step), 'time': time.time(), **{
        k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()}}
    self._jsonl.write(json.dumps(record) + '\n')
    for k, v in clean.items():
      if math.isfinite(v):
        self._tb.add_scalar(k, v, step)
    self.message(f'step {step}/{self.num_steps} {_format(clean)}')
    if self._bar is not None:
      self._bar.set_postfix_str(_format(clean, BAR_KEYS), refresh=False)
      self._bar.update(step - self._last_step)
    self._last_step = step

  def close(self) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.close()
    self._tb.close()
    self._jsonl.close()


def read_metric(workdir: str, key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of one metric from workdir/metrics.jsonl, in step order; the last record of
  a step wins (a step is logged again only when a crash lost its checkpoint)."""
  by_step = {}
  path = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        record = json.loads(line)
        if key in record:
          by_step[int(record['step'])] = float(record[key])
  steps = np.asarray(sorted(by_step), np.int64)
  return steps, np.asarray([by_step[s] for s in steps], np.float64)
