"""The throughput benchmarks run their workloads and report the fields the speed issue asks for."""

import pytest

from benchmarks import compare_torch, throughput

REQUIRED = {'workload', 'images_per_s', 'step_ms_median', 'compile_s', 'backend', 'device_count',
            'model_flop_per_s', 'mfu'}
# A sixteenth of each workload's batch at 32 px: the same code paths, a few seconds each.
QUICK = dict(image_size=32, warmup=1, steps=2, scale=16, peak_flops=1e11)


@pytest.mark.parametrize('workload', [
    'encode', pytest.param('dsset', marks=pytest.mark.slow),
    pytest.param('simclr', marks=pytest.mark.slow)])
def test_jax_benchmark_reports_required_fields(workload):
  result = throughput.run(workload, **QUICK)
  assert REQUIRED | {'jax_version'} <= set(result)
  assert result['workload'] == workload and result['images_per_s'] > 0
  assert result['backend'] == 'cpu' and result['cpu_fast_path'] is True
  assert 0 < result['mfu'] < 1


@pytest.mark.slow  # benchmark smoke run
def test_torch_reference_reports_required_fields():
  pytest.importorskip('torch')
  from benchmarks import torch_reference
  result = torch_reference.run('dsset', **QUICK)
  assert REQUIRED | {'torch_version'} <= set(result)
  assert 0 < result['mfu'] < 1


def test_summary_takes_medians_and_pairs_rounds():
  records = [{'workload': 'simclr', 'framework': f, 'images_per_s': r}
             for f, r in [('jax', 100), ('torch', 80), ('torch', 100), ('jax', 130), ('jax', 120),
                          ('torch', 90)]]
  (row,) = compare_torch.summarise(records)
  assert row['jax_median'] == 120 and row['torch_median'] == 90
  assert row['ratio_of_medians'] == pytest.approx(1.333, abs=1e-3)
  assert row['round_ratios'] == [1.25, 1.3, 1.333]


# The unet3d workload at a toy size (16^3, 2 volumes, widths 4-8 + 8): the same code paths.
UNET3D_QUICK = dict(image_size=16, warmup=1, steps=1, scale=8, peak_flops=1e11,
                    unet3d_filters=(4, 8), unet3d_bottleneck=8)


@pytest.mark.slow  # benchmark smoke run
def test_unet3d_workload_reports_required_fields():
  result = throughput.run('unet3d', **UNET3D_QUICK)
  assert REQUIRED | {'jax_version'} <= set(result)
  assert result['workload'] == 'unet3d' and result['images_per_step'] == 2
  assert result['backbone'] == 'unet3d' and result['cpu_fast_path'] is True
  assert result['images_per_s'] > 0 and result['model_flops_per_step'] > 0


@pytest.mark.slow  # benchmark smoke run
def test_unet3d_torch_reference_reports_required_fields():
  pytest.importorskip('torch')
  from benchmarks import torch_reference
  result = torch_reference.run('unet3d', **UNET3D_QUICK)
  assert REQUIRED | {'torch_version'} <= set(result)
  assert result['images_per_step'] == 2 and result['images_per_s'] > 0
