"""Alternates the JAX and PyTorch throughput benchmarks in fresh processes and compares medians.

    python benchmarks/compare_torch.py [--rounds 3] [--workload simclr dsset encode]
        [--backbone resnet18] [--image-size 64]

Each round runs both benchmarks once (who goes first alternates), so slow drifts of the machine hit
both frameworks alike. Prints every benchmark's JSON line as it arrives, then one summary line per
workload (medians over rounds, their ratio, the per-round ratios) and the JAX cost of a DS-SimCLR
image relative to a SimCLR image.
"""

import argparse
import json
import pathlib
import statistics
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
SCRIPTS = {'jax': HERE / 'throughput.py', 'torch': HERE / 'torch_reference.py'}


def _run(framework: str, options: list[str]) -> list[dict]:
  result = subprocess.run([sys.executable, str(SCRIPTS[framework]), *options],
                          capture_output=True, text=True, check=True)
  records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{')]
  for rec in records:
    print(json.dumps(rec), flush=True)
  return records


def summarise(records: list[dict]) -> list[dict]:
  """Per-workload medians of images_per_s per framework, their ratio and the per-round ratios."""
  by_workload = {}
  for rec in records:
    by_workload.setdefault(rec['workload'], {}).setdefault(rec['framework'], []).append(
        rec['images_per_s'])
  summary = []
  for workload, rates in by_workload.items():
    jax_rates, torch_rates = rates.get('jax', []), rates.get('torch', [])
    row = {'summary': workload, 'jax_images_per_s': jax_rates, 'torch_images_per_s': torch_rates}
    if jax_rates and torch_rates:
      row['jax_median'] = statistics.median(jax_rates)
      row['torch_median'] = statistics.median(torch_rates)
      row['ratio_of_medians'] = round(row['jax_median'] / row['torch_median'], 3)
      row['round_ratios'] = [round(j / t, 3) for j, t in zip(jax_rates, torch_rates)]
    summary.append(row)
  return summary


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--workload', nargs='+', default=['simclr', 'dsset', 'encode'])
  parser.add_argument('--backbone', default='resnet18')
  parser.add_argument('--image-size', default='64')
  parser.add_argument('--steps', default='15')
  args = parser.parse_args(argv)
  options = ['--workload', *args.workload, '--backbone', args.backbone,
             '--image-size', args.image_size, '--steps', args.steps]
  records = []
  for round_index in range(args.rounds):
    order = ('jax', 'torch') if round_index % 2 == 0 else ('torch', 'jax')
    for framework in order:
      records += _run(framework, options)
  summary = summarise(records)
  for row in summary:
    print(json.dumps(row), flush=True)
  jax_median = {row['summary']: statistics.median(row['jax_images_per_s'])
                for row in summary if row['jax_images_per_s']}
  if 'simclr' in jax_median and 'dsset' in jax_median:
    extra = jax_median['simclr'] / jax_median['dsset'] - 1
    print(json.dumps({'summary': 'dsset_cost_per_image_vs_simclr', 'jax': round(extra, 3)}))


if __name__ == '__main__':
  main()
