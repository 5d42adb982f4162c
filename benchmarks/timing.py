"""Timing and reporting shared by the JAX and PyTorch throughput benchmarks."""

import json
import platform
import statistics
import time
from collections.abc import Callable

WORKLOADS = ('simclr', 'dsset', 'encode')
# Images per step of each workload, as the speed issue fixes them.
SIMCLR_PAIRS = 64
DSSET_SCANS = 16
DSSET_SET_SIZE = 8
ENCODE_IMAGES = 256
TEMPERATURE = 0.1
LEARNING_RATE = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-6
HEAD_HIDDEN = 512
HEAD_OUT = 128
MATMUL_PEAK_SIZE = 2048


def images_per_step(workload: str, scale: int = 1) -> int:
  """Images through the encoder per step; `scale` divides the batch (quick checks only)."""
  return {
      'simclr': 2 * SIMCLR_PAIRS,
      'dsset': 2 * DSSET_SCANS * DSSET_SET_SIZE,
      'encode': ENCODE_IMAGES,
  }[workload] // scale


def step_seconds(run_step: Callable[[], None], warmup: int, steps: int) -> list[float]:
  """Runs `warmup` untimed then `steps` timed steps; run_step must block until its results exist."""
  for _ in range(warmup):
    run_step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    run_step()
    times.append(time.perf_counter() - start)
  return times


def best_flop_rate(run_matmul: Callable[[], None], size: int = MATMUL_PEAK_SIZE,
                   repeats: int = 5) -> float:
  """Float32 FLOP/s of the fastest of `repeats` size^3 matmuls (the peak used for MFU)."""
  run_matmul()
  best = min(step_seconds(run_matmul, 0, repeats))
  return 2 * size**3 / best


def record(framework: str, workload: str, step_times: list[float], images: int,
           model_flops: float, peak_flops: float, **extra) -> dict:
  """The JSON record both benchmarks print."""
  step = statistics.median(step_times)
  return {
      'framework': framework,
      'workload': workload,
      'images_per_s': round(images / step, 2),
      'step_ms_median': round(1e3 * step, 2),
      'step_ms_min': round(1e3 * min(step_times), 2),
      'images_per_step': images,
      'model_flops_per_step': model_flops,
      'model_flop_per_s': round(model_flops / step),
      'matmul_peak_flop_per_s': round(peak_flops),
      'mfu': round(model_flops / step / peak_flops, 4),
      'machine': platform.processor() or platform.machine(),
      'date': time.strftime('%Y-%m-%d'),
      **extra,
  }


def emit(result: dict) -> None:
  print(json.dumps(result), flush=True)
