"""evaluate.report_split='val': every reported number is on val and the test split is never read;
the default still reports test. Tiny phantom runs; the expected scores are recomputed here."""

import json
import os

import jax
import numpy as np
import pytest

from configs import finetune, knn_eval, linear_eval, linear_eval3d, segment3d
from data_pipelines.sources import phantom
from dsset import compare, train
from dsset.evaluate import features, metrics, probes, segment
from dsset.methods import make_method
from dsset.methods.downstream import classification_plots, softmax
from tests.evaluate.test_eval_run import tiny_eval_config
from tests.evaluate.test_segment import tiny_segment_config


class SplitGuard:
  """Records every phantom split a run opens; opening test fails while `block_test` is set."""

  def __init__(self):
    self.reads: list[str] = []
    self.block_test = True

  def wrap(self, make_source):
    def guarded(data_config, split):
      self.reads.append(split)
      if split == 'test' and self.block_test:
        raise AssertionError('the test split was read')
      return make_source(data_config, split)
    return guarded


@pytest.fixture
def guard(monkeypatch):
  # The phantom module's own make_source: every route to a split (the pipeline, segmentation's
  # read_volumes, the 3D sources) goes through it.
  split_guard = SplitGuard()
  monkeypatch.setattr(phantom, 'make_source', split_guard.wrap(phantom.make_source))
  return split_guard


def _ready(config, workdir):
  """The method with its data read, as the loop leaves it before training, and its workdir. Which
  split is reported does not depend on training, so the tests below finish from given variables
  (the loop's own path from the config to eval.json and the summary runs in the kNN test)."""
  os.makedirs(workdir)
  method = make_method(config)
  method.make_train_iterator()
  return method, str(workdir)


def _read(workdir):
  with open(os.path.join(workdir, 'eval.json')) as f:
    return json.load(f)


def _assert_scores(result, expected):
  for key, value in expected.items():
    assert result[key] == pytest.approx(value, abs=1e-6), key


def _scores_line(method, result, workdir):
  """The summary line without its workdir (pytest's folder names hold 'test')."""
  return method.summary(result, workdir).split('; results in')[0]


def test_linear_probe_chooses_and_reports_on_val_and_the_default_on_test(guard, tmp_path):
  config = tiny_eval_config(linear_eval, report_split='val')
  method, workdir = _ready(config, tmp_path / 'val')
  # A grid of random probes in place of trained ones (the choice on val and the scores depend only
  # on the grid, not on how it was trained).
  rng = np.random.default_rng(0)
  grid = [float(w) for w in config.evaluate.weight_decays]
  kernel = rng.normal(size=(len(grid), method._num_features, 4)).astype(np.float32)
  bias = rng.normal(size=(len(grid), 4)).astype(np.float32)
  variables = {'params': {'kernel': kernel, 'bias': bias}, 'batch_stats': {}}
  result = on_val = method.finish(variables, workdir)
  assert set(guard.reads) == {'train', 'val'}

  # The reference: the features a default run extracts, by an extractor of its own.
  guard.block_test = False
  default, default_dir = _ready(tiny_eval_config(linear_eval), tmp_path / 'test')
  data = default._data
  mean, scale = probes.standardiser(data['train'].features)

  def logits(split, i):
    return ((data[split].features - mean) / scale) @ kernel[i] + bias[i]

  # The probe chosen by hand on val, and its val scores.
  val = data['val']
  accuracy = [metrics.accuracy(val.labels, np.argmax(logits('val', i), axis=1))
              for i in range(len(grid))]
  best = max(range(len(grid)), key=lambda i: (accuracy[i], grid[i]))
  assert result['weight_decay'] == grid[best]
  _assert_scores(result, metrics.classification_metrics(val.labels, softmax(logits('val', best))))
  assert result['report_split'] == 'val'
  assert result['num_examples'] == {'train': len(data['train'].labels), 'val': len(val.labels)}
  assert _read(workdir) == result
  assert os.path.exists(tmp_path / 'val' / 'val_embedding_pca.png')
  assert not os.path.exists(tmp_path / 'val' / 'test_embedding_pca.png')
  line = _scores_line(method, result, workdir)
  assert line.endswith(f'on {len(val.labels)} val examples') and 'test' not in line

  # The default on the same grid: test scores of the probe chosen on val, as before report_split.
  result = default.finish(variables, default_dir)
  test = data['test']
  assert result['weight_decay'] == grid[best]
  _assert_scores(result, metrics.classification_metrics(test.labels, softmax(logits('test', best))))
  assert [result[k] for k in ('accuracy', 'auc')] != [on_val[k] for k in ('accuracy', 'auc')]
  assert result['report_split'] == 'test'
  assert result['num_examples'] == {split: len(d.labels) for split, d in data.items()}
  assert set(result['num_examples']) == {'train', 'val', 'test'}
  for plot in ('confusion', 'embedding'):  # no probe curve: nothing was trained here
    assert os.path.exists(tmp_path / 'test' / classification_plots('test')[plot])
  assert default.summary(result, 'W').endswith(f'on {len(test.labels)} test examples; results in W')


def test_knn_on_val_through_the_loop(guard, tmp_path, capsys):
  config = tiny_eval_config(knn_eval, report_split='val', level='slice')
  result = train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
  assert 'test' not in guard.reads
  extractor = features.make_extractor(config)
  bank = features.extract_split(config, extractor, 'train', 'slice')
  val = features.extract_split(config, extractor, 'val', 'slice')
  scores = probes.knn_scores(bank.features, bank.labels, val.features, len(phantom.CLASS_NAMES),
                             k=config.evaluate.knn_k, temperature=config.evaluate.knn_temperature)
  _assert_scores(result, metrics.classification_metrics(val.labels, scores))
  assert _read(tmp_path) == result
  assert (result['report_split'], result['num_examples']) == (
      'val', {'train': len(bank.labels), 'val': len(val.labels)})
  assert f'on {len(val.labels)} val examples; results in' in capsys.readouterr().err


def test_segmentation_reports_dice_on_val_and_the_default_on_test(guard, tmp_path):
  config = tiny_segment_config(report_split='val')
  method, workdir = _ready(config, tmp_path / 'val')
  variables = jax.device_get(jax.jit(method.init)(jax.random.key(0)))  # a random-init U-Net
  result = on_val = method.finish(variables, workdir)
  assert set(guard.reads) == {'train', 'val'}

  def expected(split):
    volumes = segment.read_volumes(config, split)
    pred = segment.predict(method.model, variables, volumes.images,
                           int(config.evaluate.batch_size))
    scores = segment.dice(pred, volumes.masks, method.model.num_classes)
    return len(volumes.images), {'dice_background': scores[0],
                                 'dice_mean': float(np.nanmean(scores[1:]))}

  count, dice = expected('val')
  _assert_scores(result, dice)
  # Every slice of the 8 train scans (8 slices each).
  assert (result['report_split'], result['num_examples']) == ('val', {'train': 64, 'val': count})
  assert _read(workdir) == result
  line = _scores_line(method, result, workdir)
  assert line.endswith(f'on {count} val examples') and 'val Dice' in line and 'test' not in line

  guard.block_test = False
  default, workdir = _ready(tiny_segment_config(), tmp_path / 'test')
  result = default.finish(variables, workdir)
  count, dice = expected('test')
  _assert_scores(result, dice)
  assert (result['report_split'], result['num_examples']) == ('test', {'train': 64, 'test': count})
  assert result['dice_per_class'] != on_val['dice_per_class']


@pytest.mark.parametrize('module', [finetune, linear_eval3d, segment3d],
                         ids=['finetune', 'linear_eval3d', 'segment3d'])
def test_other_evaluations_on_val_never_read_test(guard, tmp_path, module):
  config = module.get_config('tiny')
  config.evaluate.report_split = 'val'
  method, workdir = _ready(config, tmp_path / 'eval')
  result = method.finish(jax.device_get(jax.jit(method.init)(jax.random.key(0))), workdir)
  assert set(guard.reads) == {'train', 'val'}
  assert _read(workdir) == result
  assert result['report_split'] == 'val'
  assert set(result['num_examples']) == {'train', 'val'} and result['num_examples']['val'] > 0


def _eval_json(path, method, accuracy, split=None, size=8, seed=0):
  os.makedirs(path)
  result = {'method': method, 'backbone': 'resnet10', 'kind': 'linear', 'level': 'scan',
            'label_fraction': 1.0, 'seed': seed, 'accuracy': accuracy,
            'balanced_accuracy': accuracy, 'auc': 0.9, 'num_classes': 4,
            'num_examples': {'train': 32, 'val': size, **({} if split == 'val' else {'test': 8})}}
  if split is not None:  # None: an eval.json written before report_split, on test
    result['report_split'] = split
  with open(os.path.join(path, 'eval.json'), 'w') as f:
    json.dump(result, f)
  return str(path)


def test_compare_keeps_val_rows_apart_from_test_rows(tmp_path):
  runs = [_eval_json(tmp_path / 'old', 'deepset', 0.5),
          _eval_json(tmp_path / 'new', 'deepset', 0.7, 'test', seed=1),
          _eval_json(tmp_path / 'v0', 'deepset', 0.9, 'val', size=228),
          _eval_json(tmp_path / 'v1', 'deepset', 0.8, 'val', size=228, seed=1)]
  out = tmp_path / 'report.md'
  rows = compare.write_report(runs, str(out))
  assert [(r['report_split'], r['n'], r['reported_sizes']) for r in rows] == [
      ('test', 2, [8]), ('val', 2, [228])]
  assert [r['accuracy_mean'] for r in rows] == pytest.approx([0.6, 0.85])
  text = out.read_text()
  assert '| method | encoder | eval | level | labels | n | scored on | accuracy |' in text
  assert '| deepset | resnet10 | linear | scan | 100 % | 2 | 8 test scans | 0.600 ± 0.141 |' in text
  assert '| deepset | resnet10 | linear | scan | 100 % | 2 | 228 val scans | 0.850 ± 0.071 |' in text
  assert 'never pooled with test scores' in text
  assert 'The smallest evaluation set has 8 examples' in text

  # Val rows alone: the split is named in the cells and the notes; no 'test set' column.
  rows = compare.write_report(runs[2:], str(tmp_path / 'val.md'))
  text = (tmp_path / 'val.md').read_text()
  assert text.count('228 val scans') == 1 and 'Val-split scores of 2 evaluation runs' in text
  assert 'test set' not in text
