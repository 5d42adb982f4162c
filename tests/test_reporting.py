"""The progress display: a full-width bar on a terminal, a metrics line at every log step."""

import io
import json
import os
import re

import pytest

from dsset.reporting import Reporter

METRICS = {'loss': 3.14159, 'probe_accuracy': 0.25, 'learning_rate': 0.0003,
           'images_per_s': 1234.5}
LINE = 'loss=3.142 probe_accuracy=0.25 learning_rate=0.0003 images_per_s=1234'


class FakeTerminal(io.StringIO):
  """A stream that says it is a terminal (tqdm then draws a bar sized to the terminal)."""

  def isatty(self):
    return True

  def fileno(self):
    return 2


def _frames(text):
  """Every rendering of the bar: the '\\r'-separated pieces holding a '|...|' bar."""
  return [piece for piece in re.split(r'[\r\n]', text) if re.search(r'\|.*\|', piece)]


@pytest.fixture
def terminal(monkeypatch):
  # tqdm asks os.get_terminal_size(stream.fileno()) for the width (dynamic_ncols).
  monkeypatch.setattr(os, 'get_terminal_size', lambda fd=None: os.terminal_size((80, 24)))
  return FakeTerminal()


def test_bar_keeps_its_width_and_metrics_go_on_log_lines(tmp_path, terminal):
  reporter = Reporter(str(tmp_path), num_steps=100, initial_step=0, stream=terminal)
  reporter._bar.mininterval = 0  # pylint: disable=protected-access  # draw every update
  for step in (10, 20, 30):
    reporter.write(step, METRICS)
  reporter.close()
  text = terminal.getvalue()
  lines = [line.strip('\r') for line in text.splitlines()]
  for step in (10, 20, 30):
    assert any(line.endswith(f'step {step}/100 {LINE}') for line in lines), text
  frames = _frames(text)
  assert frames and all(len(f) < 80 for f in frames)
  last = frames[-1]
  assert '30/100' in last and 'loss=3.142' in last and 'probe_accuracy' not in last
  bar = re.search(r'\|(.*)\|', last).group(1)
  assert len(bar) >= 20, last  # all metrics in the postfix squeezed it to one character
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records] == [10, 20, 30]


def test_without_a_terminal_plain_lines_and_no_bar(tmp_path):
  stream = io.StringIO()
  reporter = Reporter(str(tmp_path), num_steps=100, initial_step=50, stream=stream)
  reporter.write(60, METRICS)
  reporter.message('hello')
  reporter.close()
  assert stream.getvalue() == f'step 60/100 {LINE}\nhello\n'


@pytest.mark.parametrize('installed', [True, False])
def test_end_of_run_message_names_tensorboard_only_when_installed(monkeypatch, installed):
  import importlib.util  # pylint: disable=g-import-not-at-top

  from configs import deepset  # pylint: disable=g-import-not-at-top
  from dsset.methods import make_method  # pylint: disable=g-import-not-at-top
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: (object() if installed else None) if name == 'tensorboard'
                      else real(name, *a))
  text = make_method(deepset.get_config('tiny')).summary({}, '/runs/x')
  assert 'tensorboard --logdir /runs/x' in text
  assert ('pip install tensorboard' in text) != installed
