"""Comparison report of evaluation runs: python -m dsset.compare RUN_DIR... --out=report.md.

Each RUN_DIR holds an eval.json (dsset.evaluate). Runs are grouped by (pretraining method or
'random init', evaluation kind, level, label fraction); the Markdown table gives mean +- std over
the runs of a group (the seeds), and a bar plot PNG is written beside the report.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

import numpy as np

CLASSIFICATION_METRICS = ('accuracy', 'balanced_accuracy', 'auc')
SEGMENTATION_METRICS = ('dice_mean',)
GROUP_KEYS = ('method', 'kind', 'level', 'label_fraction')


class CompareError(ValueError):
  """A run folder without a readable eval.json."""


def metrics_of(run: dict) -> tuple[str, ...]:
  """The scores an eval.json of this kind reports."""
  return SEGMENTATION_METRICS if run.get('kind') == 'segment' else CLASSIFICATION_METRICS


def columns(rows: Sequence[dict]) -> list[str]:
  """Every metric of the table's rows, in first-seen order (classification, then Dice)."""
  seen = []
  for row in rows:
    seen += [m for m in row['metrics'] if m not in seen]
  return seen


def read_runs(run_dirs: Sequence[str]) -> list[dict]:
  """The eval.json of every run folder (a path to an eval.json itself is accepted too)."""
  runs = []
  for run_dir in run_dirs:
    path = run_dir if run_dir.endswith('.json') else os.path.join(run_dir, 'eval.json')
    try:
      with open(path) as f:
        runs.append(json.load(f))
    except (OSError, ValueError) as e:
      raise CompareError(f'{path}: cannot read an evaluation result ({e}); run '
                         'python -m dsset.evaluate.main on that folder first') from None
  return runs


def summarise(runs: Sequence[dict]) -> list[dict]:
  """One row per group: the group keys, 'n', its 'metrics', and '<metric>_mean' / '_std' of each.

  std is the sample standard deviation (ddof=1); 0 for a group of one run.
  """
  groups: dict[tuple, list[dict]] = {}
  for run in runs:
    missing = [k for k in (*GROUP_KEYS, *metrics_of(run)) if k not in run]
    if missing:
      raise CompareError(f'an eval.json lacks {", ".join(missing)}')
    groups.setdefault(tuple(run[k] for k in GROUP_KEYS), []).append(run)
  rows = []
  for key in sorted(groups, key=lambda k: tuple(str(v) for v in k)):
    members = groups[key]
    row = dict(zip(GROUP_KEYS, key), n=len(members), metrics=metrics_of(members[0]))
    for metric in row['metrics']:
      values = np.asarray([m[metric] for m in members], dtype=np.float64)
      row[f'{metric}_mean'] = float(np.mean(values))
      row[f'{metric}_std'] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    rows.append(row)
  return rows


def _cell(row: dict, metric: str) -> str:
  if metric not in row['metrics']:
    return '-'
  return f'{row[f"{metric}_mean"]:.3f} ± {row[f"{metric}_std"]:.3f}'


def markdown_table(rows: Sequence[dict]) -> str:
  metrics = columns(rows)
  header = ['method', 'eval', 'level', 'labels', 'runs', *metrics]
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for r in rows:
    cells = [r['method'], r['kind'], r['level'], f'{r["label_fraction"]:g}', str(r['n'])]
    cells += [_cell(r, m) for m in metrics]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def bar_plot(rows: Sequence[dict], path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows)), 3.8))
  metrics = columns(rows)
  width = 0.8 / len(metrics)
  positions = np.arange(len(rows))
  for i, metric in enumerate(metrics):
    # A row without this metric gets no bar (NaN heights are not drawn).
    ax.bar(positions + (i - (len(metrics) - 1) / 2) * width,
           [r.get(f'{metric}_mean', np.nan) for r in rows], width,
           yerr=[r.get(f'{metric}_std', 0.0) for r in rows], capsize=3, label=metric)
  ax.set_xticks(positions)
  ax.set_xticklabels([f'{r["method"]}\n{r["kind"]}, {r["level"]}, {r["label_fraction"]:g}'
                      for r in rows], fontsize=8)
  ax.set_ylim(0, 1)
  ax.set_ylabel('test score (mean ± std over seeds)')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_report(run_dirs: Sequence[str], out: str) -> list[dict]:
  """Writes the Markdown report `out` and `<out without .md>.png`; returns the table rows."""
  rows = summarise(read_runs(run_dirs))
  plot_path = os.path.splitext(out)[0] + '.png'
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  bar_plot(rows, plot_path)
  with open(out, 'w') as f:
    f.write(f'# Evaluation comparison ({len(run_dirs)} runs)\n\n'
            'Test-split scores, mean ± sample std over runs (seeds).\n\n')
    f.write(markdown_table(rows))
    f.write(f'\n![scores]({os.path.basename(plot_path)})\n')
  return rows


def main(argv: Sequence[str] | None = None) -> None:
  import argparse
  parser = argparse.ArgumentParser(prog='python -m dsset.compare',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('runs', nargs='+', help='evaluation folders holding eval.json')
  parser.add_argument('--out', required=True,
                      help='Markdown report to write (the plot: same name, .png)')
  args = parser.parse_args(argv)
  try:
    rows = write_report(args.runs, args.out)
  except CompareError as e:
    print(f'dsset: error: {e}', file=sys.stderr)
    sys.exit(1)
  print(markdown_table(rows), end='')


if __name__ == '__main__':
  main()
