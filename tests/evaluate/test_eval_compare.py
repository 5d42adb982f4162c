"""dsset.compare on fake eval.json files."""

import json
import os
import subprocess
import sys

import pytest

from dsset import compare


def _write(path, method, accuracy, seed, kind='linear'):
  os.makedirs(path)
  with open(os.path.join(path, 'eval.json'), 'w') as f:
    json.dump({'method': method, 'kind': kind, 'level': 'scan', 'label_fraction': 1.0,
               'seed': seed, 'accuracy': accuracy, 'balanced_accuracy': accuracy, 'auc': 0.9}, f)
  return str(path)


def test_report_groups_by_method_and_kind(tmp_path):
  runs = [_write(tmp_path / 'a0', 'deepset', 0.8, 0), _write(tmp_path / 'a1', 'deepset', 0.6, 1),
          _write(tmp_path / 'b0', 'random init', 0.25, 0),
          _write(tmp_path / 'c0', 'deepset', 0.5, 0, kind='knn')]
  out = tmp_path / 'report' / 'report.md'
  rows = compare.write_report(runs, str(out))
  assert [(r['method'], r['kind'], r['n']) for r in rows] == [
      ('deepset', 'knn', 1), ('deepset', 'linear', 2), ('random init', 'linear', 1)]
  deepset = rows[1]
  assert deepset['accuracy_mean'] == pytest.approx(0.7)
  assert deepset['accuracy_std'] == pytest.approx(0.1414, abs=1e-4)  # sample std of 0.8, 0.6
  text = out.read_text()
  assert '| deepset | linear | scan | 1 | 2 | 0.700 ± 0.141 |' in text
  assert os.path.getsize(tmp_path / 'report' / 'report.png') > 1000


def test_cli_names_the_run_without_results(tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'dsset.compare', str(tmp_path),
                         f'--out={tmp_path / "r.md"}'], capture_output=True, text=True,
                        check=False)
  assert proc.returncode == 1
  assert str(tmp_path / 'eval.json') in proc.stderr


def test_segmentation_runs_get_a_dice_column(tmp_path):
  seg = tmp_path / 's0'
  os.makedirs(seg)
  with open(seg / 'eval.json', 'w') as f:
    json.dump({'method': 'deepset', 'kind': 'segment', 'level': 'slice', 'label_fraction': 1.0,
               'seed': 0, 'dice_mean': 0.52, 'dice_per_class': {'1': 0.9}}, f)
  runs = [_write(tmp_path / 'a0', 'deepset', 0.8, 0), str(seg)]
  out = tmp_path / 'report.md'
  compare.write_report(runs, str(out))
  text = out.read_text()
  assert '| method | eval | level | labels | runs | accuracy | balanced_accuracy | auc | dice_mean |' in text
  assert '| deepset | segment | slice | 1 | 1 | - | - | - | 0.520 ± 0.000 |' in text
  assert '| deepset | linear | scan | 1 | 1 | 0.800 ± 0.000 | 0.800 ± 0.000 | 0.900 ± 0.000 | - |' in text
