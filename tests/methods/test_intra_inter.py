"""Intra-inter clustering: token masking, the mask and inter losses against plain references, the
slice-stack sampler's crop-or-pad, the configs, each stage loading the previous one's weights, and
(slow) the objectives trained by the loop, the stages script and resume."""

import json
import math
import os
import subprocess
import sys

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs.intra_inter as intra_inter_config
from data_pipelines import volumes
from data_pipelines.samplers import resize_slice
from data_pipelines.sources.base import Scan
from dsset import augment3d, checkpointing, config_validation, models, train
from dsset.config_validation import ConfigError
from dsset.methods import METHODS, make_method
from dsset.methods.intra_inter import (IntraInterMethod, mask_count, masked_mse, released_mse,
                                       token_mask)
from dsset.methods.swav import swav_loss, unit_prototypes
from tests import xla_env
from tests.data_pipelines import format_fixtures
from tests.methods.test_swav import numpy_sinkhorn
from tests.test_config_validation import leaf_keys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny(stage, **overrides):
  config = intra_inter_config.get_config(f'{stage},tiny')
  config.update_from_flattened_dict(overrides)
  return config


# ceil(ratio * T), as the issue and the released MaskGenerator ask; 0.1 * 30 is 3.0000000000000004.
@pytest.mark.parametrize('num_tokens, ratio, expected', [
    (8, 0.1, 1), (30, 0.1, 3), (64, 0.1, 7), (7, 0.3, 3)])
def test_masking_replaces_exactly_ceil_ratio_tokens_per_volume_and_follows_the_key(
    num_tokens, ratio, expected):
  assert mask_count(num_tokens, ratio) == expected == math.ceil(round(ratio * num_tokens, 9))
  mask = np.asarray(token_mask(jax.random.PRNGKey(0), 16, num_tokens, ratio))
  assert mask.shape == (16, num_tokens) and mask.dtype == bool
  assert (mask.sum(axis=1) == expected).all()
  np.testing.assert_array_equal(
      mask, np.asarray(token_mask(jax.random.PRNGKey(0), 16, num_tokens, ratio)))
  assert not np.array_equal(mask, np.asarray(token_mask(jax.random.PRNGKey(1), 16, num_tokens,
                                                        ratio)))
  if expected < num_tokens:
    assert len({row.tobytes() for row in mask}) > 1  # each volume its own positions


def test_mask_losses_match_numpy_references():
  rng = np.random.default_rng(0)
  n, t, d, ratio = 6, 10, 4, 0.25  # 3 volumes x 2 views; ceil(2.5) = 3 masked, int(2.5) = 2
  predictions, targets = rng.normal(size=(2, n, t, d)).astype(np.float32)
  mask = np.zeros((n, t), bool)
  for row in range(n):
    mask[row, rng.permutation(t)[:mask_count(t, ratio)]] = True
  errors = [np.mean((predictions[i, j] - targets[i, j])**2)
            for i in range(n) for j in range(t) if mask[i, j]]
  np.testing.assert_allclose(float(masked_mse(predictions, targets, mask)), np.mean(errors),
                             rtol=1e-6)
  # Released: nn.MSELoss of each view (mean over its elements), summed, / int(ratio * T).
  views = [np.mean((predictions[v * 3:(v + 1) * 3] - targets[v * 3:(v + 1) * 3])**2)
           for v in range(2)]
  np.testing.assert_allclose(float(released_mse(predictions, targets, ratio)), sum(views) / 2,
                             rtol=1e-6)
  # Below 10 slices int(0.1 * T) is 0; the division is by 1 then.
  np.testing.assert_allclose(float(released_mse(predictions[:, :8], targets[:, :8], 0.1)),
                             sum(np.mean((predictions[v * 3:(v + 1) * 3, :8]
                                          - targets[v * 3:(v + 1) * 3, :8])**2)
                                 for v in range(2)), rtol=1e-6)


@pytest.mark.parametrize('queue_length', [0, 4])
def test_inter_loss_is_swav_on_the_volume_features(queue_length):
  """SwAV's swapped prediction between the two views' volume features (the unit mean of the
  output tokens) scored against unit prototypes, codes by Sinkhorn (with a full queue)."""
  rng = np.random.default_rng(queue_length)
  b, t, d, k = 5, 6, 8, 7
  swav = tiny('stage3').swav
  tokens = rng.normal(size=(2 * b, t, d)).astype(np.float32)
  kernel = unit_prototypes({'inter_prototypes': {'kernel': rng.normal(size=(d, k))}},
                           'inter_prototypes')['inter_prototypes']['kernel']
  volume = models.volume_feature(jnp.asarray(tokens))
  queue = {}
  if queue_length:
    past = rng.normal(size=(2, queue_length, d)).astype(np.float32)
    queue = {'queue': jnp.asarray(past), 'queue_filled': jnp.asarray(queue_length)}
  loss, metrics, new_queue = swav_loss(volume @ kernel, volume, kernel, queue, swav)

  means = tokens.astype(np.float64).mean(axis=1)
  features = means / np.linalg.norm(means, axis=1, keepdims=True)
  scores = features @ np.asarray(kernel, np.float64)
  codes = []
  for view in range(2):
    rows = scores[view * b:(view + 1) * b]
    if queue_length:
      rows = np.concatenate([past[view] @ np.asarray(kernel, np.float64), rows])
    codes.append(numpy_sinkhorn(rows, swav.epsilon, swav.sinkhorn_iterations)[-b:])
  total = 0.0
  for i in range(b):
    for view, other in ((0, 1), (1, 0)):
      logits = scores[view * b + i] / swav.temperature
      log_p = logits - np.log(np.sum(np.exp(logits)))
      total -= np.sum(codes[other][i] * log_p)
  np.testing.assert_allclose(float(loss), total / (2 * b), rtol=1e-4)
  assert 1 <= float(metrics['clusters_used']) <= k
  if queue_length:
    assert float(metrics['queue_in_use']) == 1
    np.testing.assert_allclose(new_queue['queue'][0, :queue_length], features[:b][:queue_length],
                               rtol=1e-5, atol=1e-6)
  else:
    assert new_queue is None


def test_the_3d_views_take_the_loops_raw_keys():
  """The loop's keys are raw uint32 pairs; the views must equal those of the same typed key."""
  aug = tiny('stage3').intra_inter.augment
  aug.transforms = ('flip', 'gamma')  # two transforms: cheap to compile
  volumes_ = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, 4, 5, 6, 1)), jnp.uint8)
  raw = jax.random.PRNGKey(3)
  views = augment3d.intra_inter_views(raw, volumes_, aug)
  assert views.shape == (3, 2, 4, 5, 6, 1)
  np.testing.assert_array_equal(
      views, augment3d.intra_inter_views(jax.random.wrap_key_data(raw), volumes_, aug))


class Scans:
  """An in-memory source of scans with the given slice counts."""

  num_classes = 2

  def __init__(self, depths):
    rng = np.random.default_rng(0)
    self.scans = [Scan(rng.uniform(size=(depth, 20, 24)).astype(np.float32), (2.0, 1.0, 1.0),
                       f'scan{i}', label=i % 2) for i, depth in enumerate(depths)]

  def __len__(self):
    return len(self.scans)

  def __getitem__(self, index):
    return self.scans[index]


def test_stack_sampler_crops_a_random_run_of_t_slices_and_zero_pads_short_scans():
  source = Scans([20, 5])
  sampler = volumes.SliceStackSampler(source, num_slices=8, image_size=16, channels=1)
  starts = set()
  for seed in range(60):
    example = sampler.random_map(0, np.random.default_rng(seed))
    assert example['slices'].shape == (8, 16, 16, 1) and example['slices'].dtype == np.uint8
    assert example['valid'].all() and example['scan_id'] == 0 and example['label'] == 0
    start = volumes.stack_indices(20, 8, np.random.default_rng(seed))[0]
    starts.add(int(start))
    for position in range(8):
      np.testing.assert_array_equal(example['slices'][position],
                                    resize_slice(source[0].volume[start + position], 16, 1))
  assert min(starts) == 0 and max(starts) == 12  # every start of 8 consecutive slices of 20

  offsets = set()
  for seed in range(40):
    example = sampler.random_map(1, np.random.default_rng(seed))
    valid = example['valid']
    offset = int(np.argmax(valid))
    offsets.add(offset)
    np.testing.assert_array_equal(valid, (np.arange(8) >= offset) & (np.arange(8) < offset + 5))
    assert not example['slices'][~valid].any()  # padding: zero images
    for j in range(5):
      np.testing.assert_array_equal(example['slices'][offset + j],
                                    resize_slice(source[1].volume[j], 16, 1))
  assert offsets == {0, 1, 2, 3}
  # Centred without a generator.
  np.testing.assert_array_equal(volumes.stack_indices(20, 8, None), np.arange(6, 14))
  np.testing.assert_array_equal(volumes.stack_indices(5, 8, None), [-1, 0, 1, 2, 3, 4, -1, -1])


VARIANTS = [','.join(part for part in (stage, size) if part)
            for stage in ('', *intra_inter_config.STAGES) for size in ('', 'paper', 'compare',
                                                                       'tiny')]


@pytest.mark.parametrize('arg', VARIANTS)
def test_every_variant_is_valid_and_fully_checked(arg):
  config = intra_inter_config.get_config(arg)
  config_validation.validate(config)
  assert set(leaf_keys(config)) == set(config_validation.rules(config)) | {'method'}
  if config.method == 'intra_inter':
    assert METHODS['intra_inter'] is IntraInterMethod
    assert config.intra_inter.objective == {'stage2': 'mask', 'stage3': 'inter'}.get(
        arg.split(',')[0], 'joint')
  else:
    assert config.method == 'swav' and arg.startswith('stage1')
  # Every stage of a size has the same encoder and slices: each export fits the next stage.
  joint = intra_inter_config.get_config(intra_inter_config.parse(arg)[1])
  for key in ('model.backbone', 'model.width_multiplier', 'model.small_stem', 'data.image_size',
              'data.channels'):
    section, leaf = key.split('.')
    assert config[section][leaf] == joint[section][leaf], key


@pytest.mark.parametrize('key, value, named', [
    ('intra_inter.augment.anisotropy_factor', (0.5, 2.0), None),
    ('intra_inter.augment.noise_std', (-0.1, 0.2), None),
    ('intra_inter.augment.blur_sigma', (2.0, 1.0), None),
    ('intra_inter.augment.flip_axes', (3,), None),
    ('intra_inter.augment.transforms', ('flip', 'warp'), None),
    ('intra_inter.augment.num_transforms', 4, None),
    ('intra_inter.mask_ratio', 0.0, None),
    ('intra_inter.weights', (0, 0, 0), None),
    ('intra_inter.objective', 'intra', None),
    ('data.num_slices', 0, None),
    ('model.slice_transformer.num_heads', 3, 'model.slice_transformer.d_model'),
    ('model.backbone', 'unet3d', None),
    ('swav.num_small_crops', 2, None),  # multi-crop is stage 1's (swav), not intra_inter's
])
def test_a_bad_value_names_its_key(key, value, named):
  with pytest.raises(ConfigError, match=(named or key).replace('.', r'\.')):
    config_validation.validate(tiny('joint', **{key: value}))


def test_unknown_variants_are_named():
  for arg in ('stage4', 'stage2,stage3', 'tiny,paper'):
    with pytest.raises(ValueError, match='stage1.*tiny'):
      intra_inter_config.get_config(arg)


def random_variables(method, seed):
  """Variables of the method's shapes, filled with distinct random numbers (no compilation)."""
  shapes = jax.eval_shape(method.init, jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)


def read_msgpack(path):
  with open(path, 'rb') as f:
    return flax.serialization.msgpack_restore(f.read())


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_each_stage_loads_the_previous_ones_weights_exactly(tmp_path):
  stage1 = make_method(intra_inter_config.get_config('stage1,tiny'))
  first = random_variables(stage1, 1)
  for n in (1, 2):
    os.makedirs(tmp_path / f'stage{n}')
  stage1.finish(first, str(tmp_path / 'stage1'))

  stage2 = make_method(tiny('stage2', init_from=str(tmp_path / 'stage1')))
  fresh = random_variables(stage2, 2)
  second = stage2.load_init_from(fresh)
  for collection in ('params', 'batch_stats'):
    assert_trees_equal(second[collection]['backbone'], first[collection]['backbone'])
  # A 2D workdir holds no slice transformer: the rest keeps its initialisation.
  for name in ('slice_embedding', 'slice_transformer', 'mask_token', 'decoder'):
    assert_trees_equal(second['params'][name], fresh['params'][name])
  second['params'] = dict(second['params'], **random_variables(stage2, 3)['params'])
  second['params']['backbone'] = first['params']['backbone']
  exported = stage2.finish(second, str(tmp_path / 'stage2'))
  assert exported['slice_transformer'].endswith(checkpointing.SLICE_TRANSFORMER_FILE)

  stage3 = make_method(tiny('stage3', init_from=str(tmp_path / 'stage2')))
  fresh = random_variables(stage3, 4)
  third = stage3.load_init_from(fresh)
  for collection in ('params', 'batch_stats'):
    assert_trees_equal(third[collection]['backbone'], first[collection]['backbone'])
  for name in ('slice_embedding', 'slice_transformer'):
    assert_trees_equal(third['params'][name], second['params'][name])
  assert_trees_equal(third['params']['inter_prototypes'], fresh['params']['inter_prototypes'])

  wider = make_method(tiny('stage3', init_from=str(tmp_path / 'stage2'),
                           **{'model.slice_transformer.d_model': 32}))
  with pytest.raises(ConfigError, match='slice_embedding does not match'):
    wider.load_init_from(random_variables(wider, 5))


def test_frozen_parts_phases_and_the_optional_projection_head():
  stage2 = make_method(tiny('stage2'))
  assert stage2.frozen_paths(stage2.phase(1)) == (('backbone',), ('slice_embedding',))
  joint = make_method(tiny('joint', **{'swav.freeze_prototypes_steps': 2}))
  assert [joint.frozen_paths(joint.phase(step)) for step in (1, 2, 3)] == [
      (('inter_prototypes',), ('intra_prototypes',))] * 2 + [()]
  config = tiny('stage3')
  for head, width in ((True, config.model.head_out),
                      (False, config.model.slice_transformer.d_model)):  # released: no head
    method = make_method(tiny('stage3', **{'intra_inter.projection_head': head}))
    variables = jax.eval_shape(method.init, jax.random.PRNGKey(0))
    assert set(variables['params']) == {'backbone', 'slice_embedding', 'slice_transformer',
                                        'inter_prototypes'} | ({'inter_head'} if head else set())
    assert variables['params']['inter_prototypes']['kernel'].shape == (width, 8)
    assert method.init_method_state(variables)['inter']['queue'].shape == (2, 8, width)


# ---------------------------------------------------------------------------------------------
# Training through the loop: compiling the step takes tens of seconds, so these run under -m slow.

def run(config, workdir):
  return train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])


def metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


CONSTANT = {'train.schedule': 'constant', 'train.warmup_steps': 0}


@pytest.mark.slow
@pytest.mark.parametrize('stage, logged', [
    ('stage2', {'mask_loss'}),
    ('stage3', {'inter_loss', 'inter_clusters_used', 'inter_cluster_entropy',
                'inter_queue_in_use'}),
])
def test_a_stage_trains_and_logs_its_terms(stage, logged, tmp_path):
  config = tiny(stage, **{'train.num_steps': 2})
  run(config, tmp_path)
  log = metrics(tmp_path)
  assert [m['step'] for m in log] == [1, 2]
  for m in log:
    assert logged <= set(m) and all(np.isfinite(m[key]) for key in logged)
    assert 0 <= m['probe_accuracy'] <= 1
  assert (tmp_path / checkpointing.SLICE_TRANSFORMER_FILE).exists()


@pytest.mark.slow
def test_joint_resume_equals_uninterrupted(tmp_path):
  config = tiny('joint', **CONSTANT, **{'train.num_steps': 2})
  run(config, tmp_path / 'split')
  config.train.num_steps = 4
  run(config, tmp_path / 'split')
  run(config, tmp_path / 'whole')
  split, whole = metrics(tmp_path / 'split'), metrics(tmp_path / 'whole')
  assert [m['step'] for m in split] == [1, 2, 3, 4]
  for key in ('loss', 'intra_loss', 'mask_loss', 'inter_loss', 'inter_queue_in_use'):
    np.testing.assert_allclose([m[key] for m in split], [m[key] for m in whole], rtol=1e-5)
  np.testing.assert_allclose([m['loss'] for m in split],
                             [m['intra_loss'] + m['mask_loss'] + m['inter_loss'] for m in split],
                             rtol=1e-5)
  for name in (checkpointing.BACKBONE_FILE, checkpointing.SLICE_TRANSFORMER_FILE):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 read_msgpack(tmp_path / 'split' / name), read_msgpack(tmp_path / 'whole' / name))


@pytest.mark.slow
def test_eight_devices_match_one(tmp_path):
  """Sinkhorn codes, the queue and BatchNorm span the global batch: sharding changes nothing."""
  assert len(jax.devices()) == 8
  config = tiny('joint', **CONSTANT, **{'train.num_steps': 3, 'train.batch_size': 8,
                                        'swav.queue_length': 8})
  run(config, tmp_path / 'one')
  train.train_and_evaluate(config, str(tmp_path / 'eight'))
  one, eight = metrics(tmp_path / 'one'), metrics(tmp_path / 'eight')
  assert [m['inter_queue_in_use'] for m in one] == [0, 1, 1]
  for key in ('loss', 'intra_loss', 'mask_loss', 'inter_loss', 'inter_clusters_used'):
    np.testing.assert_allclose([m[key] for m in eight], [m[key] for m in one], rtol=1e-4,
                               atol=1e-5)


@pytest.mark.slow
def test_stage3_trains_on_a_nifti_folder(tmp_path):
  folder = tmp_path / 'scans'
  folder.mkdir()
  rng = np.random.default_rng(0)
  for name, depth in (('a', 20), ('b', 6), ('c', 11)):  # b is shorter than a stack: padded
    format_fixtures.write_nifti(str(folder / f'{name}.nii.gz'),
                                rng.normal(0, 300, (depth, 14, 9)).astype(np.float32))
  config = tiny('stage3')
  # data_config is base's whole data section: the stack and slice size go through it.
  config.data.update(format_fixtures.data_config(folder, num_slices=8, image_size=32))
  config.monitor.enabled = False
  config.train.batch_size = 2
  config.train.num_steps = 2
  run(config, tmp_path / 'run')
  assert [m['step'] for m in metrics(tmp_path / 'run')] == [1, 2]


@pytest.mark.slow
def test_stages_script_chains_skips_finished_stages_and_resumes(tmp_path):
  out = tmp_path / 'stages'
  # One CPU device, as a user's laptop has.
  env = dict(os.environ, VARIANT='tiny', PYTHON=sys.executable, XLA_FLAGS=xla_env.ONE_DEVICE)

  def script(extra=''):
    result = subprocess.run([os.path.join(REPO, 'scripts', 'intra_inter_stages.sh'), str(out)],
                            cwd=REPO, env=dict(env, EXTRA=extra), capture_output=True,
                            text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout

  said = script()
  assert [line for line in said.splitlines() if line.startswith('==')] == [
      f'== stage {n} -> {out}/stage{n}' for n in (1, 2, 3)]
  for n in (2, 3):
    with open(out / f'stage{n}' / 'config.json') as f:
      assert json.load(f)['init_from'] == str(out / f'stage{n - 1}')
  # Stage 2 kept the encoder it loaded (frozen, eval-mode BatchNorm): the CLI passed init_from
  # through and the weights arrived exactly.
  assert_trees_equal(read_msgpack(out / 'stage2' / checkpointing.BACKBONE_FILE),
                     read_msgpack(out / 'stage1' / checkpointing.BACKBONE_FILE))
  assert (out / 'stage3' / checkpointing.SLICE_TRANSFORMER_FILE).exists()

  assert '==' not in script()  # every stage finished: nothing runs
  # A stage stopped before its export resumes from its checkpoint.
  for name in (checkpointing.BACKBONE_FILE, checkpointing.SLICE_TRANSFORMER_FILE):
    os.remove(out / 'stage3' / name)
  said = script('--config.train.num_steps=5')
  assert [line for line in said.splitlines() if line.startswith('==')] == [
      f'== stage 3 -> {out}/stage3']
  assert [m['step'] for m in metrics(out / 'stage3')] == [1, 2, 3, 4, 5]
