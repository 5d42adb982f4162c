"""Sampler indices follow docs/data.md ("Samplers") literally; examples follow the batch contract."""

import importlib
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from configs import base
from data_pipelines import pipeline, samplers
from data_pipelines.errors import DataError
from data_pipelines.sources import make_source
from data_pipelines.sources.base import Scan
from dsset.methods import make_method

# Window fractions with few decimals, as users write them; Fraction gives their exact ceil.
omegas = st.integers(1, 99).map(lambda p: p / 100)


class EdgeRng:
  """Stands in for np.random.Generator: returns the lowest or the highest allowed integer and
  records the bound it was asked for, so a test sees the exact range of every draw."""

  def __init__(self, highest: bool):
    self.highest = highest
    self.bounds = []

  def integers(self, high):
    self.bounds.append(high)
    return high - 1 if self.highest else 0


def exact_width(n, omega):
  return math.ceil(Fraction(str(omega)) * n)


@given(n=st.integers(1, 400), omega=omegas)
def test_window_width_is_ceil_of_omega_n_clamped_below_n(n, omega):
  assert samplers.window_width(n, omega) == min(exact_width(n, omega), n - 1)


@given(n=st.integers(5, 400), omega=omegas, highest=st.booleans())
def test_perscan_pair_is_i_and_i_plus_w(n, omega, highest):
  rng = EdgeRng(highest)
  first, second = samplers.perscan_indices(n, omega, rng)
  w = min(exact_width(n, omega), n - 1)
  assert rng.bounds == [n - w]  # i ~ U{0, ..., n - w - 1}
  assert first == (n - w - 1 if highest else 0)
  assert second == first + w


@given(n=st.integers(1, 4), omega=omegas, seed=st.integers(0, 2**32 - 1))
def test_perscan_falls_back_to_one_slice_under_five(n, omega, seed):
  rng = EdgeRng(highest=bool(seed % 2))
  first, second = samplers.perscan_indices(n, omega, rng)
  assert rng.bounds == [n]  # uniform over all slices of the scan
  assert first == second


@given(n=st.integers(1, 300), omega=omegas, k=st.integers(1, 8), highest=st.booleans())
def test_set_is_floor_linspace_of_a_window(n, omega, k, highest):
  rng = EdgeRng(highest)
  indices = samplers.set_indices(n, omega, k, rng)
  w = min(exact_width(n, omega), n - 1)
  i = n - w - 1 if highest else 0
  assert rng.bounds == [n - w]
  expected = np.floor(np.linspace(i, i + w, k)).astype(int)
  np.testing.assert_array_equal(indices, expected)
  assert indices.min() >= 0 and indices.max() <= n - 1


class StartRng:
  """Stands in for np.random.Generator: draws the given start and records the range it was asked
  for."""

  def __init__(self, start):
    self.start = start
    self.bounds = []

  def integers(self, high):
    self.bounds.append(high)
    return self.start


def reference_window(n, omega):
  """(width, allowed starts) of the reference code's window (DavidTorpey/deepset-simclr,
  src/data/dataset.py): w = ceil(omega * n) and a start uniform in 0..n - w - 1, except that when
  no such start exists the window is slice 0 alone."""
  w = math.ceil(Fraction(str(omega)) * n)
  return (w, range(n - w)) if w <= n - 1 else (0, range(1))


def reference_set(n, omega, k, start):
  """The reference's set for a window start: linspace over the window, truncated to integers."""
  w, _ = reference_window(n, omega)
  return [int(x) for x in np.linspace(start, start + w, k)]


def test_sets_are_the_references_at_its_window_for_every_scan_length():
  # omega = 0.5 (the reference's): scans shorter than K repeat indices exactly as the reference's.
  assert reference_set(2, 0.5, 3, start=0) == [0, 0, 1]
  for n in range(1, 41):
    starts = reference_window(n, 0.5)[1]
    for k in range(1, 7):
      for start in starts:
        rng = StartRng(start)
        assert samplers.set_indices(n, 0.5, k, rng).tolist() == reference_set(n, 0.5, k, start)
        assert rng.bounds == [len(starts)]


def test_set_start_is_uniform_over_every_allowed_start():
  rng = np.random.default_rng(0)
  starts = {samplers.set_indices(20, 0.5, 3, rng)[0] for _ in range(500)}
  assert starts == set(range(20 - 10))


class CountingSource:
  """Scans of the given lengths whose slice k holds the value (k + 1) / 255 everywhere, so the uint8
  images of a view spell out which slices were chosen."""

  num_classes = 0

  def __init__(self, lengths, size=6):
    self.lengths = lengths
    self.size = size

  def __len__(self):
    return len(self.lengths)

  def __getitem__(self, index):
    n = self.lengths[index]
    values = (np.arange(n, dtype=np.float32) + 1) / 255
    volume = np.broadcast_to(values[:, None, None], (n, self.size, self.size)).copy()
    return Scan(volume=volume, spacing=(1.0, 1.0, 1.0), scan_id=f'scan{index}', label=index)


def chosen_slices(example):
  """Slice index of every valid image of an example, as [2][K] lists."""
  views, mask = example['views'], example['mask']
  return [[int(views[v, j, 0, 0, 0]) - 1 for j in range(views.shape[1]) if mask[v, j]]
          for v in range(2)]


def test_simclr_records_visit_every_slice_of_every_scan_once():
  source = CountingSource([3, 7, 1, 5])
  sampler = samplers.SimclrSampler(source, image_size=4, channels=1)
  assert sampler.num_records == 16
  pairs = [sampler.locate(r) for r in range(sampler.num_records)]
  assert pairs == [(s, i) for s, n in enumerate(source.lengths) for i in range(n)]
  example = sampler.map(8)  # records 3..9 are the slices of scan 1
  assert chosen_slices(example) == [[5], [5]] and example['scan_id'] == 1


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), omega=omegas, seed=st.integers(0, 2**32 - 1))
def test_perscan_sampler_reads_the_drawn_slices(n, omega, seed):
  sampler = samplers.PerScanSampler(CountingSource([n]), image_size=4, channels=3, omega=omega)
  example = sampler.random_map(0, np.random.default_rng(seed))
  first, second = samplers.perscan_indices(n, omega, np.random.default_rng(seed))
  assert chosen_slices(example) == [[first], [second]]
  assert example['views'].shape == (2, 1, 4, 4, 3) and example['mask'].all()


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), omega=omegas, k=st.integers(1, 5), seed=st.integers(0, 2**32 - 1),
       short_scans=st.sampled_from(samplers.SHORT_SCANS))
def test_deepset_sampler_draws_two_independent_windows(n, omega, k, seed, short_scans):
  sampler = samplers.DeepSetSampler(CountingSource([n]), image_size=4, channels=1, omega=omega,
                                    set_size=k, short_scans=short_scans)
  example = sampler.random_map(0, np.random.default_rng(seed))
  size = min(k, n) if short_scans == 'pad' else k
  rng = np.random.default_rng(seed)
  expected = [samplers.set_indices(n, omega, size, rng).tolist() for _ in range(2)]
  assert chosen_slices(example) == expected
  # 'pad': mask False and zero images beyond the scan's n slices; 'repeat': K real slices.
  assert example['mask'].sum(axis=1).tolist() == [size] * 2
  assert not example['views'][:, size:].any()


@pytest.mark.parametrize('short_scans, indices, mask', [
    ('repeat', [0, 0, 1], [True, True, True]),  # reference_set(2, 0.5, 3, start=0)
    ('pad', [0, 1], [True, True, False]),
])
def test_k3_on_a_two_slice_scan(short_scans, indices, mask):
  sampler = samplers.DeepSetSampler(CountingSource([2]), image_size=4, channels=1, omega=0.5,
                                    set_size=3, short_scans=short_scans)
  example = sampler.random_map(0, np.random.default_rng(0))
  assert chosen_slices(example) == [indices] * 2
  assert example['mask'].tolist() == [mask] * 2


def test_unknown_short_scans_value_names_the_key():
  with pytest.raises(DataError, match='data.short_scans'):
    samplers.DeepSetSampler(CountingSource([2]), image_size=4, channels=1, omega=0.5, set_size=3,
                            short_scans='drop')


def test_resize_slice_is_bilinear_uint8_repeated_to_channels():
  ramp = np.tile(np.linspace(0, 1, 16, dtype=np.float32), (8, 1))  # non-square: aspect not kept
  out = samplers.resize_slice(ramp, 4, 3)
  assert out.shape == (4, 4, 3) and out.dtype == np.uint8
  assert (out[..., 0] == out[..., 2]).all()
  assert (np.diff(out[0, :, 0].astype(int)) > 0).all()  # the ramp survives
  np.testing.assert_array_equal(samplers.resize_slice(np.full((5, 5), 0.5), 5, 1), 128)


@pytest.mark.parametrize('cap, edge, expected', [
    (0, None, 16),  # 0: slices ship at the model's input size
    (8, None, 16),  # a cap below data.image_size changes nothing
    (40, None, 40),  # a source that does not know its slices' size ships at the cap
    (40, 24, 24),  # never above the largest native edge a source declares ...
    (40, 12, 16),  # ... nor below data.image_size
])
def test_ship_size_rule(cap, edge, expected):
  source = CountingSource([3])
  if edge is not None:
    source.max_slice_edge = edge
  assert samplers.ship_size(source, 16, cap) == expected


@pytest.mark.parametrize('config_file', ['simclr', 'perscan', 'deepset', 'deepcluster_v2'])
def test_pretraining_ships_at_the_ship_size_and_evaluation_at_image_size(config_file):
  config = importlib.import_module(f'configs.{config_file}').get_config('tiny')
  config.data.image_size = 16  # the tiny phantom's slices are 32 px: cropped from 32, not 16
  sampler = make_method(config).make_sampler(make_source(config.data, 'train'))
  assert sampler.ship_size == 32 == config.data.phantom.height
  batch = next(pipeline.make_train_iterator(config, sampler, process_index=0, process_count=1))
  b, k = config.train.batch_size, config.data.set_size
  assert batch['views'].shape == (b, 2, k, 32, 32, 1)
  eval_example = next(iter(pipeline.make_eval_dataset(config, 'train', 'slice')))
  assert eval_example['image'].shape == (16, 16, 1)
