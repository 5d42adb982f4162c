"""Train-step throughput of dsset methods as configured: one JSON line per method config.

    python benchmarks/method_step.py configs/rotation3d.py configs/rpl3d.py configs/cpc3d.py \
        [--set data.volume_size=32 --set train.batch_size=8] [--steps 5 --rounds 3]

Each CONFIG is a config file with an optional variant (configs/x.py:tiny), as dsset.main takes it.
Every method is built as the training loop builds it (dsset.train.Trainer: the method's loss, the
optimiser, the online probe), its step jitted once and fed one real batch from the method's own
train pipeline on the configured data (the phantom by default), on one device. So the figures are
the step alone, without input waiting. Methods are timed in turns, `--rounds` times, so a drift of
the machine's speed hits them alike; the record gives the median step over all rounds.

Per method: examples (volumes, slices or scans, as the method's batch counts them) per second,
step time, compile time, and the batch's shape. Compare methods' figures from one run only.
"""

import pathlib
import sys

if __package__ in (None, ''):  # run as a script from a checkout: make `dsset` importable.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import dsset  # noqa: E402  (first: it puts dsset's XLA:CPU flag in place before JAX starts)
import argparse  # noqa: E402
import ast  # noqa: E402
import importlib  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

from benchmarks import timing  # noqa: E402
from dsset import config_validation, parallel  # noqa: E402
from dsset.methods import make_method  # noqa: E402
from dsset.train import Trainer  # noqa: E402

del dsset


def load_config(spec: str, overrides: list[str]):
  """'configs/x.py[:variant]' plus 'key=value' overrides -> the validated ConfigDict."""
  path, _, variant = spec.partition(':')
  name = pathlib.Path(path).stem
  config = importlib.import_module(f'configs.{name}').get_config(variant or None)
  for item in overrides:
    key, sep, text = item.partition('=')
    if not sep:
      raise SystemExit(f'--set {item!r}: expected key=value')
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text  # a bare string
    node = config
    *parents, leaf = key.split('.')
    for part in parents:
      node = node[part]
    node[leaf] = value
  config_validation.validate(config)
  return config


class MethodStep:
  """One method's jitted train step on one real batch."""

  def __init__(self, spec: str, overrides: list[str]):
    self.spec = spec
    self.config = load_config(spec, overrides)
    self.method = make_method(self.config)
    mesh = parallel.make_mesh(jax.devices()[:1])
    train_iter = self.method.make_train_iterator()
    self.batch = parallel.global_batch(next(train_iter), mesh)
    self.examples = len(next(iter(self.batch.values())))
    trainer = Trainer(self.config, self.method)
    self.state = jax.jit(trainer.init_state)(jax.random.PRNGKey(int(self.config.seed)))
    self.phase = self.method.phase(1)
    self.step_fn = jax.jit(trainer.train_step, donate_argnums=0, static_argnums=2)
    start = time.perf_counter()
    self.run()
    self.compile_s = time.perf_counter() - start

  def run(self) -> None:
    self.state, metrics, _ = self.step_fn(self.state, self.batch, self.phase)
    jax.block_until_ready(metrics)

  def record(self, step_times: list[float]) -> dict:
    step = statistics.median(step_times)
    d = self.config.data
    return {
        'framework': 'jax',
        'workload': 'method_step',
        'config': self.spec,
        'method': self.config.method,
        'examples_per_step': self.examples,
        'examples_per_s': round(self.examples / step, 2),
        'step_ms_median': round(1e3 * step, 1),
        'step_ms_min': round(1e3 * min(step_times), 1),
        'compile_s': round(self.compile_s, 1),
        'steps_timed': len(step_times),
        'batch_shapes': {k: list(v.shape) for k, v in self.batch.items()},
        'volume_size': int(d.volume_size) if 'volume' in self.batch else None,
        'image_size': int(d.image_size) if 'volume' not in self.batch else None,
        'cpu_fast_path': str(self.config.model.cpu_fast_path),
        'backend': jax.default_backend(),
        'machine': platform.processor() or platform.machine(),
        'date': time.strftime('%Y-%m-%d'),
    }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('configs', nargs='+', help='config files, e.g. configs/rpl3d.py[:tiny]')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='override a config key in every config (repeatable)')
  parser.add_argument('--steps', type=int, default=5, help='timed steps per method per round')
  parser.add_argument('--warmup', type=int, default=1, help='untimed steps after compiling')
  parser.add_argument('--rounds', type=int, default=3, help='turns over all methods')
  args = parser.parse_args(argv)
  steps = [MethodStep(spec, args.set) for spec in args.configs]
  times = {id(s): [] for s in steps}
  for _ in range(args.rounds):
    for s in steps:
      times[id(s)] += timing.step_seconds(s.run, args.warmup, args.steps)
  for s in steps:
    timing.emit(s.record(times[id(s)]))


if __name__ == '__main__':
  main()
