"""dsset.compare on fake eval.json files."""

import json
import os
import subprocess
import sys

import pytest

from dsset import compare


def _write(path, method, accuracy, seed, kind='linear', test=8, label_fraction=1.0,
           backbone='resnet10', **extra):
  os.makedirs(path)
  with open(os.path.join(path, 'eval.json'), 'w') as f:
    json.dump({'method': method, 'backbone': backbone, 'kind': kind, 'level': 'scan',
               'label_fraction': label_fraction,
               'seed': seed, 'accuracy': accuracy, 'balanced_accuracy': accuracy, 'auc': 0.9,
               'num_examples': {'train': 32, 'val': test, 'test': test}, **extra}, f)
  return str(path)


def _table_line(text, start):
  (line,) = [line for line in text.splitlines() if line.startswith(start)]
  return line


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
  assert '| method | encoder | eval | level | labels | n | test set | accuracy |' in text
  assert '| deepset | resnet10 | linear | scan | 100 % | 2 | 8 scans | 0.700 ± 0.141 |' in text
  # One run: its value, no '± 0.000'.
  assert _table_line(text, '| random init |') == (
      '| random init | resnet10 | linear | scan | 100 % | 1 | 8 scans | 0.250 | 0.250 | 0.900 |')
  assert '4 evaluation runs in 3 groups' in text and '(3 runs)' not in text
  assert 'single run' not in text  # one row has two runs
  assert 'one example moves accuracy by 0.125' in text  # 8 test scans
  assert os.path.getsize(tmp_path / 'report' / 'report.png') > 1000


def test_single_runs_are_called_noisy_and_chance_comes_from_the_class_count(tmp_path):
  runs = [_write(tmp_path / 'p', 'deepset', 0.25, 0, num_classes=4),
          _write(tmp_path / 'r', 'random init', 0.375, 0, num_classes=4, label_fraction=0.1)]
  out = tmp_path / 'report.md'
  rows = compare.write_report(runs, str(out))
  assert [r['accuracy_chance'] for r in rows] == [0.25, 0.25]
  assert [r['auc_chance'] for r in rows] == [0.5, 0.5]
  text = out.read_text()
  assert text.startswith('# Evaluation comparison\n')
  assert 'runs)' not in text.splitlines()[0]
  assert 'Every row is a single run' in text
  assert 'with 8 test examples one example moves accuracy by 0.125' in text
  assert _table_line(text, '| deepset |') == (
      '| deepset | resnet10 | linear | scan | 100 % | 1 | 8 scans | 0.250 | 0.250 | 0.900 |')
  assert '| random init | resnet10 | linear | scan | 10 % | 1 | 8 scans | 0.375 |' in text
  assert _table_line(text, '| chance |') == '| chance |  |  |  |  |  |  | 0.250 | 0.250 | 0.500 |'
  assert '±' not in _table_line(text, '| deepset |')


def test_without_a_class_count_only_the_auc_chance_is_given(tmp_path):
  out = tmp_path / 'report.md'
  rows = compare.write_report([_write(tmp_path / 'a', 'deepset', 0.5, 0, test=30)], str(out))
  assert rows[0]['accuracy_chance'] is None and rows[0]['auc_chance'] == 0.5
  text = out.read_text()
  assert _table_line(text, '| chance |') == '| chance |  |  |  |  |  |  | ? | ? | 0.500 |'
  assert 'class count is not recorded' in text
  assert '| 30 scans |' in text


def test_label_fractions_are_percentages():
  assert [compare.label_percent(f) for f in (1.0, 0.1, 0.25, 0.01, 0.005)] == [
      '100 %', '10 %', '25 %', '1 %', '0.5 %']


def test_reported_sizes_name_their_unit_and_range():
  row = {'level': 'slice', 'reported_sizes': [48]}
  assert compare.size_text(row) == '48 slices'
  assert compare.size_text({'level': 'scan', 'reported_sizes': [8, 12]}) == '8-12 scans'
  assert compare.size_text({'level': 'scan', 'reported_sizes': []}) == '?'


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
    # As dsset.methods.segment writes it: no 'level' (segmentation is per slice).
    json.dump({'method': 'deepset', 'kind': 'segment', 'label_fraction': 1.0, 'num_classes': 6,
               'seed': 0, 'dice_mean': 0.52, 'dice_per_class': {'1': 0.9},
               'num_examples': {'train': 96, 'test': 48}}, f)
  runs = [_write(tmp_path / 'a0', 'deepset', 0.8, 0), str(seg)]
  out = tmp_path / 'report.md'
  compare.write_report(runs, str(out))
  text = out.read_text()
  assert ('| method | encoder | eval | level | labels | n | test set | accuracy | balanced_accuracy | auc '
          '| dice_mean |') in text
  assert '| deepset | ? | segment | slice | 100 % | 1 | 48 slices | - | - | - | 0.520 |' in text
  assert '| deepset | resnet10 | linear | scan | 100 % | 1 | 8 scans | 0.800 | 0.800 | 0.900 | - |' in text
  assert _table_line(text, '| chance |').endswith('| ? | ? | 0.500 | - |')


def test_3d_segmentation_runs_are_whole_volumes(tmp_path):
  seg = tmp_path / 's3d'
  os.makedirs(seg)
  with open(seg / 'eval.json', 'w') as f:
    # As dsset.methods.segment3d writes it: Dice over every voxel of the test scans.
    json.dump({'method': 'rotation3d', 'kind': 'segment3d', 'label_fraction': 0.1,
               'num_classes': 6, 'seed': 0, 'dice_mean': 0.25, 'dice_per_class': {'1': 0.5},
               'num_examples': {'train': 3, 'test': 8}}, f)
  out = tmp_path / 'report.md'
  compare.write_report([str(seg)], str(out))
  assert '| rotation3d | ? | segment3d | volume | 10 % | 1 | 8 scans | 0.250 |' in out.read_text()


def test_2d_and_3d_encoders_are_separate_rows(tmp_path):
  # A ResNet's and a 3D U-Net's random init are different baselines: one table, two rows.
  runs = [_write(tmp_path / 'r2d', 'random init', 0.5, 0),
          _write(tmp_path / 'r3d', 'random init', 0.25, 0, backbone='unet3d'),
          _write(tmp_path / 'r3d1', 'random init', 0.75, 1, backbone='unet3d')]
  rows = compare.write_report(runs, str(tmp_path / 'report.md'))
  assert [(r['backbone'], r['n'], r['accuracy_mean']) for r in rows] == [
      ('resnet10', 1, 0.5), ('unet3d', 2, 0.5)]
  text = (tmp_path / 'report.md').read_text()
  assert '| random init | unet3d | linear | scan | 100 % | 2 | 8 scans | 0.500 ± 0.354 |' in text


def test_scan_features_other_than_the_mean_are_their_own_rows(tmp_path):
  runs = [_write(tmp_path / 'm0', 'intra_inter:inter', 0.5, 0, scan_features='mean'),
          _write(tmp_path / 't0', 'intra_inter:inter', 0.7, 0, scan_features='slice_transformer'),
          _write(tmp_path / 't1', 'intra_inter:inter', 0.6, 1, scan_features='slice_transformer'),
          _write(tmp_path / 'old', 'intra_inter:inter', 0.4, 2)]  # written before scan_features
  rows = compare.write_report(runs, str(tmp_path / 'report.md'))
  assert [(r['kind'], r['n']) for r in rows] == [('linear', 2), ('linear (slice_transformer)', 2)]
  text = (tmp_path / 'report.md').read_text()
  assert '| intra_inter:inter | resnet10 | linear (slice_transformer) | scan | 100 % | 2 |' in text
