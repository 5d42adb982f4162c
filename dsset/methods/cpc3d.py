"""3D contrastive predictive coding (Taleb et al., NeurIPS 2020; METHODS.md section 2).

Each example is a random cube of a scan (data_pipelines.volumes, S = data.volume_size voxels per
side), cut on the device into a grid of G x G x G non-overlapping patches (G = cpc3d.grid), each
of side P = S / G (a multiple of 2 ** the encoder's pooled levels). Patch (i, j, k) covers voxels
[iP, (i+1)P) x [jP, (j+1)P) x [kP, (k+1)P) of the cube's axes (0, 1, 2) and has the flat index
i G^2 + j G + k (the released code's order).

Rows and columns. Rows run along axis 0 of the cube (the scan's slice axis): row i holds the G^2
patches whose first grid index is i. Column (j, k) is the G patches with those last two indices;
a volume has G^2 columns, each predicted on its own.
  - Context: rows 0 .. R-1, R = cpc3d.context_rows.
  - Predicted rows ("terms"): R .. R+K-1, K = cpc3d.prediction_steps; the first is the row right
    after the context (the released 3D code skips none), so R + K <= G.
  - The GRU's sequence for column (j, k), cpc3d.context:
      'pyramid' (the released code): row by row from 0 to R-1, row r gives the (2w+1)^2 patches
        (j+dy, k+dz), |dy|, |dz| <= w = R-1-r, dy outer, dz inner, an index past the grid's
        border mirrored back into it (-1 -> 1, G -> G-2); so the last element is the column's own
        patch in row R-1, and each earlier row widens by one patch on every side;
      'column': the column's own patches in rows 0 .. R-1.
    Either way every element lies in a context row: the context never sees a predicted row.
  - configs/cpc3d.py:paper (and :tiny), the paper's G = 4, R = 2, K = 2: a 10-patch pyramid
    (3 x 3 of row 0, then the column's patch of row 1) predicts the column's patches in rows 2
    and 3. The CPU default G = 3, R = 2, K = 1: the same 10-patch pyramid predicts row 2.

Model. Every patch goes through the shared 3D U-Net encoder (unet3d.ENCODER_PATH, exported for
segment3d / linear_eval3d); its pooled features pass a linear layer to the code (cpc3d.code_size,
1024 in the paper). The released code (algorithms/cpc.py, utils/model_utils.py) instead max-pools
the 2^3 bottleneck map of a 32^3 patch to 1^3, flattens it and applies Dense(code_size): the same
linear layer, on the map's max rather than the encoder's global mean, which keeps the code's size
independent of the patch side here. A GRU (cpc3d.gru_units, 256) reads the context sequence of a
column; its final state is the context vector c, and one linear predictor per step k gives the
predicted code W_k c of row R+k.

Losses (cpc3d.loss), scores are dot products between a predicted and an encoded code:
  'infonce' (the paper's): each prediction of step k for column n is scored against the codes of
    every patch in the batch (every volume, every row, context rows included); its own target
    patch's code is the positive, the B G^3 - 1 others are the negatives; cross-entropy, averaged
    over the columns and steps. cpc_accuracy: how often the positive scores highest.
  'binary' (the released code's CPCLayer with binary_crossentropy): per column, the score
    s = mean over steps and code dims of prediction * target code, for the column's own targets
    (label 1) and for the targets of one other column drawn uniformly from all other columns of
    the batch, same or other volume (label 0; preprocess_grid_3d draws a random (volume, column)
    until it differs from the own one); loss = binary cross-entropy of sigmoid(s), averaged over
    the 2 B G^2 pairs. cpc_accuracy: the share of pairs on the right side of 0 (binary_accuracy).

Augmentation, on the device with one key per patch (the released preprocess_volume_3d): the patch
is flipped along axis 0 with probability cpc3d.flip_prob (0.5), then a random sub-box of side
floor(P * cpc3d.crop_fraction) (7/8) is cut and padded back to P with zeros, centred (the low side
gets floor of half the margin): the content shifts by a few voxels and a border of background
frames it. Intensities are in [0, 1] units, so the padding is air (CT) or background (MRI). The
released code also crops the whole volume to 95 % and pads it back before cutting the grid; here
the sampler's random cube placement gives that shift. augment3d.* is not read.

Known leak, as in the released code: in training BatchNorm normalises every patch with statistics
of the whole batch, predicted rows included, so context codes depend on the targets through those
two numbers per channel; with running averages (train=False) the context is exactly blind to them.

Online probe: the mean of a volume's patch features (the encoder's pooled output) with
batch['label'].
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dsset import augment3d
from dsset.config_validation import ConfigError, _one_of, _positive_int, _probability
from dsset.methods.base import StepOutput
from dsset.methods.pretraining import PretrainingMethod
from dsset.methods.rotation3d import Rotation3DMethod, check_3d_encoder
from dsset.models import unet3d

LOSSES = ('infonce', 'binary')
CONTEXTS = ('pyramid', 'column')


def grid_patches(cubes: jax.Array, grid: int) -> jax.Array:
  """Cubes [B, S, S, S, C] -> non-overlapping patches [B, G^3, P, P, P, C], P = S / G, patch
  (i, j, k) at flat index i G^2 + j G + k."""
  b, s = cubes.shape[0], cubes.shape[1]
  c, p = cubes.shape[-1], s // grid
  x = cubes.reshape(b, grid, p, grid, p, grid, p, c)
  x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(b, grid ** 3, p, p, p, c)


def _mirror(index: int, grid: int) -> int:
  """A grid index reflected back into [0, grid) about its border cells (-1 -> 1, G -> G-2)."""
  period = 2 * (grid - 1)
  index = abs(index) % period
  return period - index if index >= grid else index


def context_indices(grid: int, context_rows: int, context: str) -> np.ndarray:
  """Flat patch indices [G^2, T] of each column's context sequence (module docstring)."""
  rows = []
  for j in range(grid):
    for k in range(grid):
      sequence = []
      for r in range(context_rows):
        width = context_rows - 1 - r if context == 'pyramid' else 0
        for dy in range(-width, width + 1):
          for dz in range(-width, width + 1):
            sequence.append(r * grid * grid + _mirror(j + dy, grid) * grid + _mirror(k + dz, grid))
      rows.append(sequence)
  return np.asarray(rows, np.int32)


def target_indices(grid: int, context_rows: int, prediction_steps: int) -> np.ndarray:
  """Flat patch indices [G^2, K] of each column's predicted patches, rows R .. R+K-1."""
  columns = np.arange(grid * grid)
  rows = context_rows + np.arange(prediction_steps)
  return (rows[None, :] * grid * grid + columns[:, None]).astype(np.int32)


def crop_and_pad(patch: jax.Array, starts: jax.Array, crop: int) -> jax.Array:
  """The sub-box of side `crop` at `starts` (3 ints) of a patch [P, P, P, C], zero-padded back to
  P, centred: the low side gets (P - crop) // 2 zeros (the released pad_to_final_size_3d)."""
  side = patch.shape[0]
  low = (side - crop) // 2
  out = patch
  for axis in range(3):
    position = jnp.arange(side)
    source = jnp.clip(position - low + starts[axis], 0, side - 1)
    inside = (position >= low) & (position < low + crop)
    shape = [1] * patch.ndim
    shape[axis] = side
    out = jnp.where(inside.reshape(shape), jnp.take(out, source, axis=axis), 0)
  return out


def augment_patch(key: jax.Array, patch: jax.Array, flip_prob: float,
                  crop_fraction: float) -> jax.Array:
  """One float patch [P, P, P, C]: flipped along axis 0 with probability flip_prob, then
  crop_and_pad with a crop of floor(P * crop_fraction) at a uniform random position."""
  flip_key, crop_key = jax.random.split(key)
  patch = jnp.where(jax.random.bernoulli(flip_key, flip_prob), jnp.flip(patch, 0), patch)
  side = patch.shape[0]
  crop = int(side * crop_fraction)
  starts = jax.random.randint(crop_key, (3,), 0, side - crop + 1)
  return crop_and_pad(patch, starts, crop)


def augment_patches(rng: jax.Array, patches: jax.Array, flip_prob: float,
                    crop_fraction: float) -> jax.Array:
  """Patches [B, L, P, P, P, C] (uint8 or [0, 1] float) -> augmented float32, one key per
  patch."""
  if patches.dtype == jnp.uint8:
    patches = patches.astype(jnp.float32) / 255.0
  lead = patches.shape[:2]
  flat = patches.reshape(-1, *patches.shape[2:])
  keys = jax.random.split(rng, flat.shape[0])
  out = jax.vmap(lambda k, p: augment_patch(k, p, flip_prob, crop_fraction))(keys, flat)
  return out.reshape(*lead, *out.shape[1:])


def infonce_loss(predictions: jax.Array, codes: jax.Array,
                 positives: jax.Array) -> tuple[jax.Array, jax.Array]:
  """predictions [N, K, D] against candidate codes [M, D]; positives [N, K]: the candidate index
  of each prediction's target. Returns (mean cross-entropy, share whose positive scores highest)."""
  logits = jnp.einsum('nkd,md->nkm', predictions, codes)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, positives).mean()
  accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == positives)
  return loss, accuracy


def binary_loss(predictions: jax.Array, targets: jax.Array,
                negatives: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The released code's scoring: predictions and targets [N, K, D]; negatives [N], the column
  whose targets are row n's negative. Returns (mean binary cross-entropy over the 2N pairs,
  share of pairs scored on the right side of 0)."""
  positive = jnp.mean(predictions * targets, axis=(1, 2))
  negative = jnp.mean(predictions * targets[negatives], axis=(1, 2))
  # -log sigmoid(s) for the positives, -log(1 - sigmoid(s)) = -log sigmoid(-s) for the negatives.
  loss = 0.5 * (jnp.mean(optax.sigmoid_binary_cross_entropy(positive, 1.0))
                + jnp.mean(optax.sigmoid_binary_cross_entropy(negative, 0.0)))
  # Keras' binary_accuracy: a pair is called positive when sigmoid(s) > 0.5, i.e. s > 0.
  accuracy = 0.5 * (jnp.mean(positive > 0) + jnp.mean(negative <= 0))
  return loss, accuracy


def draw_negative_columns(rng: jax.Array, count: int) -> jax.Array:
  """For each of `count` columns, another column uniformly among the count - 1 others."""
  offsets = jax.random.randint(rng, (count,), 1, count)
  return (jnp.arange(count) + offsets) % count


class CPCModel(nn.Module):
  """patches [B, L, P, P, P, C] (normalised) -> dict of
    features [B, L, F]      the encoder's pooled features per patch,
    codes [B, L, D]         the patch codes,
    context [B, G^2, U]     each column's context vector (the GRU's final state),
    predictions [B, G^2, K, D]  one predicted code per step.
  context_index [G^2, T] and prediction_steps as in the module docstring (static)."""

  backbone: nn.Module
  code_size: int
  gru_units: int
  prediction_steps: int
  context_index: tuple[tuple[int, ...], ...]

  @nn.compact
  def __call__(self, patches: jax.Array, train: bool) -> dict[str, jax.Array]:
    b, length = patches.shape[:2]
    features = self.backbone(patches.reshape(b * length, *patches.shape[2:]), train=train)
    codes = nn.Dense(self.code_size, name='code')(features).reshape(b, length, self.code_size)
    index = np.asarray(self.context_index)
    columns, steps = index.shape
    sequences = codes[:, index].reshape(b * columns, steps, self.code_size)
    context, _ = nn.RNN(nn.GRUCell(self.gru_units), return_carry=True, name='gru')(sequences)
    predictions = jnp.stack([nn.Dense(self.code_size, name=f'predictor_{k}')(context)
                             for k in range(self.prediction_steps)], axis=1)
    return {'features': features.reshape(b, length, -1), 'codes': codes,
            'context': context.reshape(b, columns, self.gru_units),
            'predictions': predictions.reshape(b, columns, self.prediction_steps,
                                               self.code_size)}


class CPC3DMethod(PretrainingMethod):
  """cpc3d: config keys under config.cpc3d (configs/cpc3d.py)."""

  encoder_path = unet3d.ENCODER_PATH
  config_rules = {
      'cpc3d.grid': _positive_int(),
      'cpc3d.context_rows': _positive_int(),
      'cpc3d.prediction_steps': _positive_int(),
      'cpc3d.context': _one_of(*CONTEXTS),
      'cpc3d.code_size': _positive_int(),
      'cpc3d.gru_units': _positive_int(),
      'cpc3d.loss': _one_of(*LOSSES),
      'cpc3d.flip_prob': _probability(),
      'cpc3d.crop_fraction': ((lambda v: isinstance(v, (int, float)) and 0 < v <= 1),
                              'a number in (0, 1] (1 = no crop)'),
  }

  def __init__(self, config):
    super().__init__(config)
    c = config.cpc3d
    self.grid = int(c.grid)
    self.context_index = context_indices(self.grid, int(c.context_rows), str(c.context))
    self.target_index = target_indices(self.grid, int(c.context_rows), int(c.prediction_steps))
    self.model = CPCModel(backbone=unet3d.make_unet3d(config.model), code_size=int(c.code_size),
                          gru_units=int(c.gru_units), prediction_steps=int(c.prediction_steps),
                          context_index=tuple(map(tuple, self.context_index.tolist())))

  @classmethod
  def check_config(cls, config):
    check_3d_encoder(config)
    c, size = config.cpc3d, config.data.volume_size
    if c.grid < 2:
      raise ConfigError(f'config key cpc3d.grid={c.grid} is invalid: CPC needs at least 2 rows '
                        '(a context row and a predicted one)')
    if c.context_rows + c.prediction_steps > c.grid:
      raise ConfigError(f'config keys cpc3d.context_rows={c.context_rows} + '
                        f'cpc3d.prediction_steps={c.prediction_steps} exceed cpc3d.grid='
                        f'{c.grid} rows')
    factor = 2 ** len(config.model.unet3d.filters)
    if size % c.grid or (size // c.grid) % factor:
      raise ConfigError(
          f'config keys data.volume_size={size} and cpc3d.grid={c.grid}: the patch side '
          f'volume_size / grid must be a whole multiple of {factor} (2 ** the '
          f'{len(config.model.unet3d.filters)} pooled levels of model.unet3d.filters)')
    if int(size // c.grid * c.crop_fraction) < 1:
      raise ConfigError(f'config key cpc3d.crop_fraction={c.crop_fraction} leaves no voxel of a '
                        f'{size // c.grid}^3 patch')

  # One random cube of data.volume_size per scan, as rotation3d draws them.
  make_sampler = Rotation3DMethod.make_sampler

  def images_per_example(self):
    return self.grid ** 3  # encoder passes (patches) per volume

  def init(self, rng):
    side = int(self.config.data.volume_size) // self.grid
    patches = jnp.zeros((1, self.grid ** 3, side, side, side, 1))
    return self.model.init(rng, patches, train=False)

  def patches(self, cubes: jax.Array, rng: jax.Array) -> jax.Array:
    """The batch's cubes [B, S, S, S, 1] -> the model's augmented, normalised patches."""
    c = self.config.cpc3d
    patches = augment_patches(rng, grid_patches(cubes, self.grid), float(c.flip_prob),
                              float(c.crop_fraction))
    return augment3d.normalise(patches)

  def loss(self, params, batch_stats, batch, rng, phase):
    del phase
    augment_key, negative_key = jax.random.split(rng)
    out, updates = self.model.apply({'params': params, 'batch_stats': batch_stats},
                                    self.patches(batch['volume'], augment_key), train=True,
                                    mutable=['batch_stats'])
    codes, predictions = out['codes'], out['predictions']
    b, length, size = codes.shape
    columns, steps = self.target_index.shape
    predictions = predictions.reshape(b * columns, steps, size)
    if self.config.cpc3d.loss == 'infonce':
      # A target's row in the flattened codes: its volume's offset plus its flat patch index.
      positives = (jnp.arange(b)[:, None, None] * length + self.target_index[None]).reshape(
          b * columns, steps)
      loss, accuracy = infonce_loss(predictions, codes.reshape(b * length, size), positives)
    else:
      targets = codes[:, self.target_index].reshape(b * columns, steps, size)
      loss, accuracy = binary_loss(predictions, targets,
                                   draw_negative_columns(negative_key, b * columns))
    return loss, StepOutput(updates['batch_stats'],
                            {'cpc_loss': loss, 'cpc_accuracy': accuracy},
                            jnp.mean(out['features'], axis=1), batch['label'])
