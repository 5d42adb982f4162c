"""Comparison report of evaluation runs: python -m dsset.compare RUN_DIR... --out=report.md.

Each RUN_DIR holds an eval.json (dsset.evaluate). Runs are grouped by (pretraining method or
'random init', encoder, evaluation kind, level, label fraction, report split), so 2D and 3D runs (a
ResNet's and a 3D U-Net's random init, say) can share one table without being pooled, and neither
can scores on val (evaluate.report_split='val', while settings are chosen) and on test; an eval.json
without report_split is on test. The Markdown table gives each group's number of runs n (the
seeds), the size of the split it is scored on ('8 scans' of test; '228 val scans') and its scores:
the value for a single run, mean ± sample std for several. A last row gives the chance level of each
score, and a bar plot PNG (n and split size under each group, chance marked on each bar) is written
beside the report.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

import numpy as np

CLASSIFICATION_METRICS = ('accuracy', 'balanced_accuracy', 'auc')
SEGMENTATION_METRICS = ('dice_mean',)
GROUP_KEYS = ('method', 'backbone', 'kind', 'level', 'label_fraction', 'report_split')
# Segmentation is scored per slice (2D) or over whole volumes (3D); its eval.json has no 'level'.
DEFAULT_LEVEL = {'segment': 'slice', 'segment3d': 'volume'}
SEGMENTATION_KINDS = tuple(DEFAULT_LEVEL)


class CompareError(ValueError):
  """A run folder without a readable eval.json."""


def metrics_of(run: dict) -> tuple[str, ...]:
  """The scores an eval.json of this kind reports."""
  return SEGMENTATION_METRICS if run.get('kind') in SEGMENTATION_KINDS else CLASSIFICATION_METRICS


def chance_level(metric: str, num_classes: int | None) -> float | None:
  """The score of guessing, where the eval.json allows knowing it (else None).

  AUC: 0.5. Balanced accuracy: 1 / classes; accuracy: 1 / classes too, which is exact when the
  test classes are balanced (a constant guess of the largest class scores its share). Needs the
  class count; Dice has no single chance level.
  """
  if metric == 'auc':
    return 0.5
  if metric in ('accuracy', 'balanced_accuracy') and num_classes:
    return 1.0 / num_classes
  return None


def columns(rows: Sequence[dict]) -> list[str]:
  """Every metric of the table's rows: classification scores, then Dice, whatever the row order."""
  present = {m for row in rows for m in row['metrics']}
  return [m for m in (*CLASSIFICATION_METRICS, *SEGMENTATION_METRICS) if m in present]


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


def _reported_size(run: dict) -> int | None:
  """The size of the split an eval.json is scored on, num_examples[report_split] (scans or slices,
  by its level), None if not recorded."""
  counts = run.get('num_examples')
  size = counts.get(run['report_split']) if isinstance(counts, dict) else None
  return int(size) if size is not None else None


def summarise(runs: Sequence[dict]) -> list[dict]:
  """One row per group: the group keys, 'n', its 'metrics', and '<metric>_mean' / '_std' of each.

  std is the sample standard deviation (ddof=1); 0 for a group of one run. Also 'reported_sizes'
  (the sorted distinct sizes of the split the runs are scored on, report_split: test, or val; empty
  when not recorded), 'num_classes' (when every run records the same count, else None) and
  '<metric>_chance' (chance_level, None if unknown).
  """
  groups: dict[tuple, list[dict]] = {}
  for run in runs:
    if 'level' not in run and run.get('kind') in DEFAULT_LEVEL:
      run = {**run, 'level': DEFAULT_LEVEL[run['kind']]}
    # eval.json files written before the encoder was recorded still group (as encoder '?'); those
    # written before evaluate.report_split existed were all scored on test.
    run = {'backbone': '?', 'report_split': 'test', **run}
    # Scan features other than the mean of slice features are another evaluation of the encoder.
    if run.get('scan_features', 'mean') != 'mean' and 'kind' in run:
      run['kind'] = f"{run['kind']} ({run['scan_features']})"
    missing = [k for k in (*GROUP_KEYS, *metrics_of(run)) if k not in run]
    if missing:
      raise CompareError(f'an eval.json lacks {", ".join(missing)}')
    groups.setdefault(tuple(run[k] for k in GROUP_KEYS), []).append(run)
  rows = []
  for key in sorted(groups, key=lambda k: tuple(str(v) for v in k)):
    members = groups[key]
    row = dict(zip(GROUP_KEYS, key), n=len(members), metrics=metrics_of(members[0]))
    row['reported_sizes'] = sorted({s for s in map(_reported_size, members) if s is not None})
    classes = {m.get('num_classes') for m in members}
    row['num_classes'] = classes.pop() if len(classes) == 1 else None
    for metric in row['metrics']:
      values = np.asarray([m[metric] for m in members], dtype=np.float64)
      row[f'{metric}_mean'] = float(np.mean(values))
      row[f'{metric}_std'] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
      row[f'{metric}_chance'] = chance_level(metric, row['num_classes'])
    rows.append(row)
  return rows


def _cell(row: dict, metric: str) -> str:
  """'0.700 ± 0.141' over several runs; the plain value for one run (which has no spread)."""
  if metric not in row['metrics']:
    return '-'
  if row['n'] == 1:
    return f'{row[f"{metric}_mean"]:.3f}'
  return f'{row[f"{metric}_mean"]:.3f} ± {row[f"{metric}_std"]:.3f}'


def label_percent(fraction: float) -> str:
  """A label fraction as a percentage: 1.0 -> '100 %', 0.1 -> '10 %', 0.005 -> '0.5 %'."""
  return f'{100 * float(fraction):.3g} %'


def size_text(row: dict, name_split: bool = False) -> str:
  """'8 scans' / '48 slices' of test (a range if the runs of the row differ); '?' when not recorded.
  A row scored on val always names it ('228 val scans'); name_split names test too ('8 test
  scans')."""
  sizes = row['reported_sizes']
  split = row.get('report_split', 'test')
  named = name_split or split != 'test'
  if not sizes and not named:
    return '?'
  unit = 'scans' if row['level'] in ('scan', 'volume') else 'slices' if row['level'] == 'slice' else 'examples'
  count = ('?' if not sizes else str(sizes[0]) if len(sizes) == 1
           else f'{sizes[0]}-{sizes[-1]}')
  return f'{count} {split} {unit}' if named else f'{count} {unit}'


def _chance_cell(rows: Sequence[dict], metric: str) -> str:
  values = sorted({r[f'{metric}_chance'] for r in rows if metric in r['metrics']},
                  key=lambda v: (v is None, v or 0.0))
  if values == [None]:
    return '-' if metric in SEGMENTATION_METRICS else '?'
  return ' / '.join('?' if v is None else f'{v:.3f}' for v in values)


def _splits(rows: Sequence[dict]) -> list[str]:
  """The splits the rows are scored on, sorted: ['test'], ['val'] or ['test', 'val']."""
  return sorted({r['report_split'] for r in rows})


def markdown_table(rows: Sequence[dict]) -> str:
  """The table: one row per group, then the chance level of every score column.

  A table of test rows only keeps its 'test set' column; with val rows the column is 'scored on'
  and every cell names its split, so that no val score passes for a test one."""
  metrics = columns(rows)
  only_test = _splits(rows) == ['test']
  header = ['method', 'encoder', 'eval', 'level', 'labels', 'n',
            'test set' if only_test else 'scored on', *metrics]
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for r in rows:
    cells = [r['method'], r['backbone'], r['kind'], r['level'], label_percent(r['label_fraction']),
             str(r['n']), size_text(r, name_split=not only_test)]
    cells += [_cell(r, m) for m in metrics]
    lines.append('| ' + ' | '.join(cells) + ' |')
  blanks = [''] * (len(header) - len(metrics) - 1)
  lines.append('| ' + ' | '.join(['chance', *blanks, *(_chance_cell(rows, m) for m in metrics)])
               + ' |')
  return '\n'.join(lines) + '\n'


def notes(rows: Sequence[dict]) -> str:
  """The paragraph above the table: what n, ± and chance mean, and how noisy single runs are."""
  runs = sum(r['n'] for r in rows)
  splits = _splits(rows)
  # The evaluation set's name in the sentences below: the split when every row shares it.
  split = splits[0] if len(splits) == 1 else 'evaluation'
  scores = {'test': 'Test-split scores', 'val': 'Val-split scores'}.get(
      split, 'Scores, each on the split its row names,')
  text = [f'{scores} of {runs} evaluation run{"s" if runs != 1 else ""} in {len(rows)} '
          f'group{"s" if len(rows) != 1 else ""}. n is the number of runs (seeds) of a row; '
          'scores are mean ± sample std over them where n > 1, the single value where n = 1.']
  if 'val' in splits:
    text.append('Val scores (evaluate.report_split=val) are for choosing settings: optimistic once '
                'settings were chosen on them, never pooled with test scores, and no final result.')
  if any(m in r['metrics'] for r in rows for m in CLASSIFICATION_METRICS):
    text.append('Chance: 0.5 for AUC; 1 / number of classes for balanced accuracy and for '
                'accuracy (exact for balanced test classes)'
                + ('; the class count is not recorded in these eval.json files (?)'
                   if any(r['num_classes'] is None for r in rows
                          if 'accuracy' in r['metrics']) else '') + '.')
  sizes = [s for r in rows for s in r['reported_sizes']]
  if all(r['n'] == 1 for r in rows):
    noisy = 'Every row is a single run, so no spread is shown and a single score is noisy'
    if sizes:
      noisy += (f': with {min(sizes)} {split} examples one example moves accuracy by '
                f'{1 / min(sizes):.3f}')
    text.append(noisy + f'. Compare several seeds (--config.seed) and larger {split} sets before '
                'reading differences.')
  elif sizes and min(sizes) < 50:
    text.append(f'The smallest {split} set has {min(sizes)} examples: one example moves accuracy '
                f'by {1 / min(sizes):.3f}.')
  return '\n'.join(text) + '\n'  # one Markdown paragraph, one sentence group a line


def bar_plot(rows: Sequence[dict], path: str) -> None:
  """Grouped bars per row (error bars where n > 1), chance marked per bar, n and the size of the
  split scored on below."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(max(5, 1.8 * len(rows)), 4.2))
  metrics = columns(rows)
  width = 0.8 / len(metrics)
  positions = np.arange(len(rows))
  chance_drawn = False
  for i, metric in enumerate(metrics):
    x = positions + (i - (len(metrics) - 1) / 2) * width
    # A row without this metric gets no bar (NaN heights are not drawn); one run has no error bar.
    ax.bar(x, [r.get(f'{metric}_mean', np.nan) for r in rows], width,
           yerr=[r.get(f'{metric}_std', 0.0) if r['n'] > 1 else np.nan for r in rows],
           capsize=3, label=metric)
    for xi, r in zip(x, rows):
      chance = r.get(f'{metric}_chance')
      if chance is not None:
        ax.hlines(chance, xi - width / 2, xi + width / 2, colors='black', linestyles='dashed',
                  linewidth=1.2, label=None if chance_drawn else 'chance')
        chance_drawn = True
  ax.set_xticks(positions)
  ax.set_xticklabels([f'{r["method"]} ({r["backbone"]})\n{r["kind"]}, {r["level"]}, '
                      f'{label_percent(r["label_fraction"])} labels\n'
                      f'n={r["n"]}, {size_text(r, name_split=True)}' for r in rows], fontsize=8)
  ax.set_ylim(0, 1)
  ax.set_ylabel(f'{" / ".join(_splits(rows))} score (mean ± std where n > 1)')
  ax.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.0, 1.0))
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
    f.write('# Evaluation comparison\n\n')
    f.write(notes(rows) + '\n')
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
  print(notes(rows) + '\n' + markdown_table(rows), end='')


if __name__ == '__main__':
  main()
