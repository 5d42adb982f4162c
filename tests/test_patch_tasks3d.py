"""rpl3d and jigsaw3d (Taleb et al.'s patch tasks): the patch grid and the permutations against
plain numpy references, the tuples each task builds (read back from a volume whose voxels hold their
own coordinates), the model, the config checks, and both methods end to end through the one loop
(phantom, resume, NIfTI folder)."""

import functools
import itertools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import jigsaw3d, rpl3d
from dsset import augment3d, patches3d
from dsset.config_validation import ConfigError, validate
from dsset.methods import make_method
from dsset.methods.patch_tasks3d import PatchTupleModel
from dsset.methods.rpl3d import neighbour_index
from dsset.models import UNet3DEncoder
from tests.data_pipelines import format_fixtures
from tests.test_methods_3d import (CONSTANT, check_resume_equals_uninterrupted, exported, metrics,
                                   run, tiny, write_nifti_folder)

# Exact geometry for the tuple tests: no intensity change, so the voxels' values survive.
NO_INTENSITY = {'augment3d.intensity_scale': (1.0, 1.0), 'augment3d.intensity_shift': (0.0, 0.0)}


def test_grid_sizes_of_the_variants():
  assert patches3d.make_grid(64, 3, 3, 16) == (3, 21, 16)  # '': 18 voxels of room -> 16
  assert patches3d.make_grid(128, 3, 3, 16) == (3, 42, 32)  # paper: 39 -> 32
  assert patches3d.make_grid(16, 3, 1, 4) == (3, 5, 4)  # tiny
  assert patches3d.make_grid(128, 3, 3, 16).centre == 13
  with pytest.raises(ValueError, match='cells of 16'):
    patches3d.make_grid(48, 3, 3, 16)


def test_grid_starts_keep_each_patch_inside_its_cell_and_depend_only_on_the_key():
  grid = patches3d.PatchGrid(3, 7, 4)
  draw = jax.jit(jax.vmap(lambda k: patches3d.grid_starts(k, grid)))
  starts = np.asarray(draw(jax.random.split(jax.random.key(0), 200)))  # [200, 27, 3]
  for i, (d, h, w) in enumerate(itertools.product(range(3), repeat=3)):  # row-major cells
    offsets = starts[:, i] - np.array([d, h, w]) * grid.cell
    assert offsets.min() == 0 and offsets.max() == grid.cell - grid.patch
  # Every patch and axis draws its own offset.
  assert len({tuple(s) for s in starts[0] - starts[0] // grid.cell * grid.cell}) > 1
  again = np.asarray(draw(jax.random.split(jax.random.key(0), 200)))
  np.testing.assert_array_equal(starts, again)
  other = np.asarray(draw(jax.random.split(jax.random.key(1), 200)))
  assert not np.array_equal(starts, other)


def test_cut_patches_matches_numpy_slicing():
  rng = np.random.default_rng(0)
  volume = rng.random((12, 12, 12, 2), dtype=np.float32)
  starts = rng.integers(0, 12 - 5 + 1, (6, 3))
  got = np.asarray(jax.jit(patches3d.cut_patches, static_argnums=2)(
      jnp.asarray(volume), jnp.asarray(starts, jnp.int32), 5))
  for patch, (d, h, w) in zip(got, starts):
    np.testing.assert_array_equal(patch, volume[d:d + 5, h:h + 5, w:w + 5])


def greedy_max_hamming_loop(count, length, seed, candidates):
  """The greedy choice written plainly: distances recomputed from scratch for every candidate."""
  rng = np.random.default_rng(seed)
  pool = np.argsort(rng.random((candidates, length)), axis=1)
  chosen = [0]
  while len(chosen) < count:
    best, best_distance = None, -1
    for c in range(candidates):
      if c in chosen:
        continue
      distance = min(sum(int(a != b) for a, b in zip(pool[c], pool[j])) for j in chosen)
      if distance > best_distance:
        best, best_distance = c, distance
    chosen.append(best)
  return pool[chosen]


def min_pairwise_hamming(perms):
  return min(int(np.sum(a != b)) for a, b in itertools.combinations(perms, 2))


@pytest.mark.parametrize('count, length, seed', [(12, 9, 0), (20, 27, 3)])
def test_max_hamming_permutations_match_a_plain_greedy_loop(count, length, seed):
  got = patches3d.max_hamming_permutations(count, length, seed, candidates=150)
  np.testing.assert_array_equal(got, greedy_max_hamming_loop(count, length, seed, 150))


def test_the_jigsaw_permutations_are_distinct_far_apart_and_seeded():
  perms = patches3d.max_hamming_permutations(100, 27, 0)
  assert perms.shape == (100, 27) and perms.dtype == np.int32
  np.testing.assert_array_equal(np.sort(perms, axis=1), np.broadcast_to(np.arange(27), (100, 27)))
  greedy = min_pairwise_hamming(perms)
  # The first 100 candidates, taken as they come, are closer together than the greedy choice.
  rng = np.random.default_rng(0)
  assert greedy > min_pairwise_hamming(np.argsort(rng.random((100, 27)), axis=1))
  np.testing.assert_array_equal(perms, patches3d.max_hamming_permutations(100, 27, 0))
  assert not np.array_equal(perms, patches3d.max_hamming_permutations(100, 27, 1))


def test_rpl_classes_follow_the_released_numbering():
  labels = np.arange(26)
  released = np.array([c if c < 13 else c + 1 for c in labels])  # preprocess_rpl.py
  np.testing.assert_array_equal(np.asarray(neighbour_index(jnp.asarray(labels), 13)), released)


def coordinate_volumes(batch, size):
  """Float volumes [B, S, S, S, 1] whose voxel (d, h, w) holds d * S^2 + h * S + w."""
  flat = np.arange(size ** 3, dtype=np.float32).reshape((size,) * 3 + (1,))
  return jnp.asarray(np.broadcast_to(flat, (batch,) + flat.shape))


def decoded_starts(method, tuples):
  """The scan voxel [B, K, 3] each patch starts at, after checking every patch is a contiguous
  block of the cube (normalise is (v - 0.5) / 0.25, undone exactly in float32)."""
  size, p = int(method.config.data.volume_size), method.grid.patch
  coords = np.rint(np.asarray(tuples)[..., 0] * augment3d.INPUT_STD + augment3d.INPUT_MEAN)
  coords = coords.astype(np.int64)
  starts = np.stack(np.unravel_index(coords[:, :, 0, 0, 0], (size,) * 3), axis=-1)
  block = np.stack(np.meshgrid(*[np.arange(p)] * 3, indexing='ij'), axis=-1)  # [p, p, p, 3]
  expected = starts[:, :, None, None, None, :] + block
  np.testing.assert_array_equal(
      coords, np.ravel_multi_index(np.moveaxis(expected, -1, 0), (size,) * 3))
  return starts


def assert_in_cells(method, starts, indices):
  cells = np.stack(np.unravel_index(np.asarray(indices), (method.grid.per_side,) * 3), axis=-1)
  offsets = starts - cells * method.grid.cell
  assert offsets.min() >= 0 and offsets.max() <= method.grid.cell - method.grid.patch


# Batch of coordinate volumes per task: enough draws to meet most of rpl's 26 classes.
TUPLE_BATCH = {'rpl3d': 64, 'jigsaw3d': 6}


@functools.cache
def tuple_maker(module):
  """(method, its initial state, jitted make_tuples) of the tiny config: compiled once per task."""
  method = make_method(tiny(module, **NO_INTENSITY))
  return method, method.init_method_state({}), jax.jit(method.make_tuples)


def tuples_of(module, seed):
  method, state, make_tuples = tuple_maker(module)
  volumes = coordinate_volumes(TUPLE_BATCH[method.config.method], 16)
  return make_tuples(jax.random.key(seed), volumes, state)


def test_rpl_tuples_are_the_centre_and_the_labelled_neighbour():
  method, _, _ = tuple_maker(rpl3d)
  tuples, indices, labels = tuples_of(rpl3d, 0)
  assert tuples.shape == (64, 2, 4, 4, 4, 1) and method.num_classes == 26
  starts = decoded_starts(method, tuples)
  assert_in_cells(method, starts, indices)
  # The neighbour's direction from the centre cell, enumerated row-major without (0, 0, 0).
  directions = [d for d in itertools.product((-1, 0, 1), repeat=3) if d != (0, 0, 0)]
  cells = starts // method.grid.cell
  for cell, index, label in zip(cells, np.asarray(indices), np.asarray(labels)):
    assert index[0] == 13
    np.testing.assert_array_equal(cell[0], [1, 1, 1])
    np.testing.assert_array_equal(cell[1] - cell[0], directions[label])
  assert len(set(np.asarray(labels).tolist())) > 15  # uniform over 26 classes, 64 draws


def test_jigsaw_tuples_put_patch_perm_i_at_position_i():
  method, state, _ = tuple_maker(jigsaw3d)
  perms = np.asarray(state['permutations'])
  np.testing.assert_array_equal(perms, patches3d.max_hamming_permutations(100, 27, 0))
  tuples, indices, labels = tuples_of(jigsaw3d, 1)
  assert tuples.shape == (6, 27, 4, 4, 4, 1)
  starts = decoded_starts(method, tuples)
  np.testing.assert_array_equal(indices, perms[np.asarray(labels)])
  assert_in_cells(method, starts, indices)


def test_jigsaw_reads_its_permutations_from_the_method_state():
  # The loop restores the state from the checkpoint: a resumed run solves the saved puzzles even
  # if a new run (another numpy, another permutation_seed) would choose others.
  method, state, _ = tuple_maker(jigsaw3d)
  saved = {'permutations': state['permutations'][::-1]}
  indices, labels = method.draw_tuples(jax.random.key(0), 8, saved)
  np.testing.assert_array_equal(indices, np.asarray(saved['permutations'])[np.asarray(labels)])


@pytest.mark.parametrize('module', [rpl3d, jigsaw3d])
def test_tuples_depend_only_on_the_key(module):
  first = tuples_of(module, 3)
  jax.tree.map(np.testing.assert_array_equal, first, tuples_of(module, 3))
  assert not np.array_equal(first[0], tuples_of(module, 4)[0])


def test_patch_tuple_model_encodes_each_patch_alone_and_keeps_the_order():
  model = PatchTupleModel(UNet3DEncoder((4,), 8), hidden=(16,), dropout=0.5, num_classes=5)
  tuples = jax.random.normal(jax.random.key(0), (3, 2, 4, 4, 4, 1))

  @jax.jit
  def outputs(tuples):
    variables = model.init(jax.random.key(1), tuples, train=False)
    encoder = {name: tree['backbone'] for name, tree in variables.items()}
    alone = model.backbone.apply(encoder, tuples[:, 1], train=False)
    return (model.apply(variables, tuples, train=False), alone,
            model.apply(variables, tuples[:, ::-1], train=False))

  (h, logits), alone, (swapped_h, swapped_logits) = outputs(tuples)
  assert h.shape == (3, 2, 8) and logits.shape == (3, 5)
  np.testing.assert_allclose(alone, h[:, 1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(swapped_h, h[:, ::-1], rtol=1e-5, atol=1e-6)
  assert not np.allclose(swapped_logits, logits)  # the head sees the order


@pytest.mark.parametrize('module, key, value, match', [
    (rpl3d, 'rpl3d.patches_per_side', 4, 'rpl3d.patches_per_side=4'),
    (rpl3d, 'data.volume_size', 12, 'data.volume_size=12.*rpl3d.patch_jitter'),
    (jigsaw3d, 'jigsaw3d.patch_jitter', 2, 'jigsaw3d.patch_jitter=2'),
    (jigsaw3d, 'jigsaw3d.num_permutations', 5000, 'jigsaw3d.num_permutations=5000'),
    (jigsaw3d, 'jigsaw3d.permutation_seed', -1, 'jigsaw3d.permutation_seed'),
])
def test_config_errors_name_their_keys(module, key, value, match):
  with pytest.raises(ConfigError, match=match):
    validate(tiny(module, **{key: value}))


# End to end, one compiled step per method by default: jigsaw3d on the phantom (with the online
# probe), rpl3d on a NIfTI folder (no labels, so no probe); each with a 2 + 2 resumed run that must
# equal its 4-step run. The other pairings run under -m slow.
def on_nifti(module, folder):
  """A stand-in for the config module whose configs read the NIfTI folder (what the shared resume
  check of tests/test_methods_3d.py takes)."""
  def get_config(arg=None):
    config = module.get_config(arg)
    config.data.update(format_fixtures.data_config(folder, volume_size=16, voxel_mm=1.5))
    config.train.batch_size = 4
    return config
  return types.SimpleNamespace(get_config=get_config)


def run_tiny(module, workdir, **keys):
  run(tiny(module, **CONSTANT, **keys), str(workdir))
  return metrics(workdir)


def check_run(log, name, steps, probe):
  assert [m['step'] for m in log] == list(range(1, steps + 1))
  for m in log:
    assert np.isfinite(m[f'{name}_loss']) and 0 <= m[f'{name}_accuracy'] <= 1
    assert ('probe_accuracy' in m) == probe


@pytest.fixture(scope='module')
def jigsaw_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('jigsaw3d')
  run_tiny(jigsaw3d, workdir, **{'train.num_steps': 4})
  return workdir


@pytest.fixture(scope='module')
def rpl_nifti_run(tmp_path_factory):
  module = on_nifti(rpl3d, write_nifti_folder(tmp_path_factory.mktemp('nifti') / 'scans'))
  workdir = tmp_path_factory.mktemp('rpl3d')
  run_tiny(module, workdir, **{'train.num_steps': 4})
  return module, workdir


def test_jigsaw3d_trains_with_the_probe_and_exports_the_3d_encoder(jigsaw_run):
  check_run(metrics(jigsaw_run), 'jigsaw3d', 4, probe=True)
  encoder = exported(jigsaw_run)
  assert set(encoder['params']) == {'ConvBlock3D_0', 'ConvBlock3D_1', 'ConvBlock3D_2'}


def test_jigsaw3d_resume_equals_uninterrupted(jigsaw_run, tmp_path):
  check_resume_equals_uninterrupted(jigsaw3d, jigsaw_run, tmp_path)


def test_rpl3d_trains_on_a_nifti_folder_and_exports_the_3d_encoder(rpl_nifti_run):
  _, workdir = rpl_nifti_run
  check_run(metrics(workdir), 'rpl3d', 4, probe=False)
  assert exported(workdir)['params']


@pytest.mark.slow  # stateless: jigsaw3d's resume (with method state) runs by default
def test_rpl3d_resume_equals_uninterrupted(rpl_nifti_run, tmp_path):
  module, workdir = rpl_nifti_run
  check_resume_equals_uninterrupted(module, workdir, tmp_path)


@pytest.mark.slow
def test_rpl3d_trains_on_the_phantom_with_the_probe(tmp_path):
  check_run(run_tiny(rpl3d, tmp_path), 'rpl3d', 2, probe=True)


@pytest.mark.slow
def test_jigsaw3d_trains_on_a_nifti_folder(tmp_path):
  module = on_nifti(jigsaw3d, write_nifti_folder(tmp_path / 'scans'))
  check_run(run_tiny(module, tmp_path / 'run'), 'jigsaw3d', 2, probe=False)
