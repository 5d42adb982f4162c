"""Intensity policies: raw scanner values -> float32 in [0, 1].

CT is windowed in Hounsfield units (values are physical, so one fixed window fits every scan); MRI
has no absolute scale, so each scan is clipped at its own percentiles and rescaled; 'minmax' uses
each scan's range.

'auto' (the default) chooses one of these once per scan source, when the source is built, from the
first few usable scans in the source's own (sorted) order (`resolve_policy`):

- a modality the source knows decides (when every sampled scan says the same): DICOM Modality 'CT'
  -> 'ct', any other named modality ('MR', 'PT', 'CR', ...; not 'OT' or 'SC') -> 'mri'; the
  phantom generates Hounsfield units, so it is 'ct';
- otherwise the voxels decide: Hounsfield units when at least 1% of the sampled voxels are below
  -100 (fat is about -100 HU, lung -500 to -900, air -1000: virtually every CT has them, around the
  body, in the lungs or in bowel gas), since MRI magnitudes are never negative and normalised MRI
  (z-scores, [0, 1]) stays within a few units of 0. HU-like -> 'ct'; else 'mri' for formats with
  physical units (NIfTI, DICOM, datalists) and 'minmax' for formats without (16-bit PNG, non-8-bit
  .npz arrays), whose values are whatever an export wrote.

The choice and its evidence are printed once per source (stderr). Whatever the policy, the sampled
scans' mapped slices are checked for contrast, with a warning naming the keys to change when they
have almost none. 8-bit data (PNG, uint8 .npz) are display values scaled by 1/255 and follow no
policy.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import sys
from typing import Callable, Hashable, Iterable

import numpy as np

from data_pipelines.errors import DataError

AUTO = 'auto'
POLICIES = (AUTO, 'ct', 'mri', 'minmax')

# auto's evidence rule (see the module docstring): HU-like when at least NEGATIVE_FRACTION of the
# sampled voxels are below NEGATIVE_HU. AIR_HU is only reported (the share of air and lung).
NEGATIVE_HU = -100.0
NEGATIVE_FRACTION = 0.01
AIR_HU = -900.0
# Usable scans sampled per source, and at most this many tried (bad scans are passed over; they
# fail by name when they are read). Sampling decodes each sampled scan once at start-up.
SAMPLE_SCANS = 3
_MAX_TRIED = 2 * SAMPLE_SCANS
# Voxels of each sampled scan the evidence is computed on (a seeded random subset of larger scans).
_VOXELS_PER_SCAN = 1 << 17
# Evenly spaced slices of each sampled scan checked for contrast.
_SLICES_PER_SCAN = 8
# Low contrast: the median over sampled slices of the 1st-99th percentile range of the mapped
# slice is below this fraction of [0, 1]. 0.05 is about 13 of the 256 grey levels the samplers emit.
LOW_CONTRAST = 0.05

# Modalities that say nothing about units ('' = absent, OT = other, SC = secondary capture): the
# voxels decide.
_UNKNOWN_MODALITIES = frozenset({'', 'OT', 'SC'})

_DESCRIPTION = {'ct': 'CT window data.ct_window={ct_window}',
                'mri': 'MRI percentile scaling data.mri_percentiles={mri_percentiles}',
                'minmax': 'min-max scaling of each scan'}


def check_voxels(volume: np.ndarray, name: str) -> np.ndarray:
  """`volume` as float32; DataError for non-finite voxels or a constant scan.

  Non-finite voxels are an error: silently clipping NaN would poison training without a trace.
  """
  volume = np.asarray(volume, dtype=np.float32)
  if not np.all(np.isfinite(volume)):
    bad = int(np.size(volume) - np.count_nonzero(np.isfinite(volume)))
    raise DataError(f'{name}: {bad} voxels are NaN or infinite')
  if volume.size and volume.min() == volume.max():
    # Checked before the policy: the CT window would map a constant scan to a flat grey.
    raise DataError(f'{name}: every voxel is {volume.flat[0]:g}; the scan is constant')
  return volume


def _window(volume: np.ndarray, data_config, policy: str) -> tuple[float, float]:
  """(low, high) of `policy` for one scan: the values mapped to 0 and 1."""
  if policy == 'ct':
    return tuple(float(v) for v in data_config.ct_window)
  if policy == 'mri':
    return tuple(float(v) for v in np.percentile(volume, tuple(data_config.mri_percentiles)))
  if policy == 'minmax':
    return float(volume.min()), float(volume.max())
  raise DataError(f'config key data.intensity={policy!r} is not one of {POLICIES}')


def normalise(volume: np.ndarray, data_config, name: str) -> np.ndarray:
  """Applies data_config.intensity to a volume; `name` (file or scan) is used in error messages.

  Sources resolve 'auto' once for all their scans (`resolve_policy`) and pass the chosen policy; a
  volume given here with 'auto' is its own sample (HU-like voxels -> 'ct', else 'mri').
  """
  volume = check_voxels(volume, name)
  policy = data_config.intensity
  if policy == AUTO:
    policy = 'ct' if _Evidence.of([_voxel_subset(volume)]).looks_like_hu else 'mri'
  low, high = _window(volume, data_config, policy)
  if not high > low:
    # A constant scan (or a window of zero width) carries no image; callers skip it by config.
    raise DataError(f'{name}: intensity range is empty (low={low:g}, high={high:g}); '
                    'the scan is constant or data.ct_window is degenerate')
  out = (volume - low) / (high - low)
  return np.clip(out, 0.0, 1.0, out=out)


def scale_8bit(values: np.ndarray, name: str) -> np.ndarray:
  """8-bit display values (PNG/JPEG slices, uint8 arrays) -> float32 in [0, 1], by 1/255.

  They are already windowed for display, so no policy applies; a constant scan is still an error.
  """
  if values.size and values.min() == values.max():
    raise DataError(f'{name}: every voxel is {values.flat[0]}; the scan is constant')
  return values.astype(np.float32) / np.float32(255.0)


@dataclasses.dataclass(frozen=True)
class IntensitySettings:
  """The data-config keys `normalise` reads, as plain values.

  Sources keep this instead of the ConfigDict so that they pickle cheaply into Grain workers, and
  use it in cache keys (a cached volume is only valid for the policy that produced it).
  """

  intensity: str
  ct_window: tuple[float, float]
  mri_percentiles: tuple[float, float]

  @classmethod
  def from_config(cls, data_config) -> 'IntensitySettings':
    return cls(intensity=str(data_config.intensity),
               ct_window=tuple(float(v) for v in data_config.ct_window),
               mri_percentiles=tuple(float(v) for v in data_config.mri_percentiles))


def with_policy(data_config, policy: str):
  """`data_config` with data.intensity set to `policy` (a copy; the same object when it already is).

  Sources hand the copy to their loaders, so that every scan (and every cache key) uses the policy
  chosen for the source rather than 'auto'.
  """
  if data_config.intensity == policy:
    return data_config
  if isinstance(data_config, IntensitySettings):
    return dataclasses.replace(data_config, intensity=policy)
  import ml_collections  # the config library; imported here to keep this module light
  if isinstance(data_config, ml_collections.FrozenConfigDict):
    data_config = data_config.as_configdict()
  config = copy.deepcopy(data_config)
  config.intensity = policy  # an existing key: allowed on a locked ConfigDict too
  return config


@dataclasses.dataclass(frozen=True)
class Candidate:
  """A scan a source may sample: `load()` returns its raw values [D, H, W] before any policy
  (oriented like the source's scans; uint8 for 8-bit display data) or raises DataError."""

  name: str
  load: Callable[[], np.ndarray]
  modality: str = ''  # 'CT', 'MR', ... when the source knows it (DICOM Modality)


def _voxel_subset(volume: np.ndarray) -> np.ndarray:
  """At most _VOXELS_PER_SCAN voxels of `volume`, a seeded random subset (deterministic)."""
  if volume.size <= _VOXELS_PER_SCAN:
    return np.asarray(volume, np.float32).ravel()
  flat = np.random.default_rng(0).integers(0, volume.size, _VOXELS_PER_SCAN)
  return np.asarray(volume[np.unravel_index(flat, volume.shape)], np.float32)


@dataclasses.dataclass(frozen=True)
class _Evidence:
  """Voxel statistics behind auto's choice, pooled over the sampled scans."""

  below_air: float  # fraction of voxels below AIR_HU
  below_negative: float  # fraction of voxels below NEGATIVE_HU
  low: float  # 1st percentile
  high: float  # 99th percentile

  @classmethod
  def of(cls, subsets: list[np.ndarray]) -> '_Evidence':
    voxels = np.concatenate(subsets)
    if not voxels.size:
      return cls(below_air=0.0, below_negative=0.0, low=0.0, high=0.0)
    low, high = np.percentile(voxels, (1.0, 99.0))
    return cls(below_air=float(np.mean(voxels < AIR_HU)),
               below_negative=float(np.mean(voxels < NEGATIVE_HU)), low=float(low),
               high=float(high))

  @property
  def looks_like_hu(self) -> bool:
    return self.below_negative >= NEGATIVE_FRACTION

  def describe(self) -> str:
    return (f'{_percent(self.below_air)} of voxels below {AIR_HU:g} HU, '
            f'{_percent(self.below_negative)} below {NEGATIVE_HU:g}, 1st-99th percentile '
            f'{self.low:.4g}..{self.high:.4g}')


def _percent(fraction: float) -> str:
  return f'{100 * fraction:.3g}%'


@dataclasses.dataclass(frozen=True)
class _Sample:
  """What the start-up check keeps of one sampled scan (a few slices, not the volume)."""

  name: str
  modality: str
  eight_bit: bool
  voxels: np.ndarray  # _voxel_subset of the raw values (empty for 8-bit scans)
  slices: np.ndarray  # raw values of evenly spaced slices [n, H, W]
  windows: dict[str, tuple[float, float]]  # (low, high) of every policy, from the whole scan

  @classmethod
  def of(cls, candidate: Candidate, data_config) -> '_Sample':
    values = np.asarray(candidate.load())
    if values.ndim != 3 or values.size == 0:
      raise DataError(f'{candidate.name}: not a 3D volume (shape {values.shape})')
    if values.dtype == np.uint8:
      return cls(candidate.name, candidate.modality, True, np.zeros(0, np.float32),
                 np.zeros((0, 0, 0), np.float32), {})
    depth = values.shape[0]
    picked = np.unique(((np.arange(_SLICES_PER_SCAN) + 0.5) * depth / _SLICES_PER_SCAN)
                       .astype(np.int64))
    volume = check_voxels(values, candidate.name)
    windows = {policy: _window(volume, data_config, policy) for policy in ('ct', 'mri', 'minmax')}
    return cls(candidate.name, candidate.modality.upper(), False, _voxel_subset(volume),
               np.array(volume[picked]), windows)

  def slice_contrast(self, policy: str) -> np.ndarray | None:
    """1st-99th percentile range of each sampled slice mapped by `policy` (None: no policy)."""
    if self.eight_bit:
      return None
    low, high = self.windows[policy]
    if not high > low:
      return None  # normalise refuses this scan by name when it is read
    with np.errstate(over='ignore', invalid='ignore'):  # extreme values clip to 0 or 1 anyway
      mapped = np.clip((self.slices - low) / (high - low), 0.0, 1.0)
    p1, p99 = np.percentile(mapped.reshape(len(mapped), -1), (1.0, 99.0), axis=1)
    return p99 - p1


# Per process: what each sample resolved to (a source built again is neither sampled nor printed
# again), and the messages already printed.
_RESOLVED: dict[Hashable, str] = {}
_TOLD: set[str] = set()


def tell(message: str) -> None:
  """Prints a line for the user on stderr, once per process."""
  if message in _TOLD:
    return
  _TOLD.add(message)
  print(message, file=sys.stderr, flush=True)


def _take_samples(candidates: Iterable[Candidate], data_config) -> list[_Sample]:
  samples = []
  for candidate in itertools.islice(candidates, _MAX_TRIED):
    try:
      samples.append(_Sample.of(candidate, data_config))
    except DataError:
      continue  # a bad scan is named when it is read (data.on_bad_scan), not here
    if len(samples) == SAMPLE_SCANS:
      break
  return samples


def _choose(samples: list[_Sample], fallback: str, known_from: str) -> tuple[str, str]:
  """(policy, evidence text) of auto for these samples."""
  scans = [s for s in samples if not s.eight_bit]
  count = f'{len(scans)} sampled scan{"s" if len(scans) != 1 else ""}'
  if not scans:
    if samples:
      return fallback, (f'the {len(samples)} sampled scans are 8-bit images, scaled by 1/255 '
                        f'whatever data.intensity says; other images would use {fallback!r}')
    return fallback, f'no scan of the first {_MAX_TRIED} could be read to sample'
  evidence = _Evidence.of([s.voxels for s in scans])
  modalities = {s.modality for s in scans}
  if len(modalities) == 1 and not modalities & _UNKNOWN_MODALITIES:
    # CT is in HU; every other named modality (MR, PT, CR, US, ...) is not, whatever the voxels say
    # (MONOCHROME1 radiographs are negated, so they would look HU-like).
    modality = modalities.pop()
    return ('ct' if modality == 'CT' else fallback,
            f'{known_from} {modality} in {count}; {evidence.describe()}')
  if evidence.looks_like_hu:
    return 'ct', (f'Hounsfield-like voxels: {evidence.describe()}, in {count}')
  units = 'not Hounsfield-like' if fallback == 'mri' else (
      'not Hounsfield-like, and the format has no physical units')
  return fallback, f'{units}: {evidence.describe()}, in {count}'


def _describe(policy: str, data_config) -> str:
  return _DESCRIPTION[policy].format(
      ct_window=tuple(float(v) for v in data_config.ct_window),
      mri_percentiles=tuple(float(v) for v in data_config.mri_percentiles))


def _check_contrast(samples: list[_Sample], policy: str, where: str, data_config) -> None:
  ranges = [r for s in samples if (r := s.slice_contrast(policy)) is not None]
  if not ranges:
    return
  contrast = float(np.median(np.concatenate(ranges)))
  if contrast >= LOW_CONTRAST:
    return
  hint = {'ct': "data.intensity='mri' for MRI or other scans not in Hounsfield units, or "
                'data.ct_window',
          'mri': 'data.mri_percentiles, or data.intensity',
          'minmax': "data.intensity ('ct' with data.ct_window, or 'mri' with "
                    'data.mri_percentiles)'}[policy]
  tell(f'warning: the {where} scans have almost no contrast after data.intensity={policy!r} '
       f'({_describe(policy, data_config)}): the 1st-99th percentile range of their slices is '
       f'{contrast:.3g} of [0, 1] (median of {sum(len(r) for r in ranges)} slices of '
       f'{len(ranges)} sampled scans); training on them learns little. Set {hint}.')


def resolve_policy(data_config, where: str, candidates: Iterable[Candidate], *,
                   physical_units: bool = True, known_from: str = 'DICOM Modality',
                   memo_key: Hashable = None) -> str:
  """The concrete policy ('ct' | 'mri' | 'minmax') of one source, decided once at start-up.

  data.intensity as configured, or for 'auto' the choice made from the first SAMPLE_SCANS usable
  `candidates` (the source's first scans, in its order), printed once with its evidence. Either way
  the sampled scans' mapped slices are checked for contrast (`LOW_CONTRAST`). `where` names the
  source in messages ('NIfTI train'); `physical_units` is False for formats whose values have no
  unit (auto then falls back to 'minmax' instead of 'mri'); `known_from` names where a candidate's
  modality comes from. `memo_key` identifies the sample (file identities, settings are added): a
  source built again with the same key reuses the choice without sampling or printing.
  """
  configured = str(data_config.intensity)
  if configured not in POLICIES:
    raise DataError(f'config key data.intensity={configured!r} is not one of {POLICIES}')
  settings = IntensitySettings.from_config(data_config)
  key = None if memo_key is None else (memo_key, where, settings, physical_units)
  if key is not None and key in _RESOLVED:
    return _RESOLVED[key]
  samples = _take_samples(candidates, data_config)
  policy = configured
  if configured == AUTO:
    policy, evidence = _choose(samples, 'mri' if physical_units else 'minmax', known_from)
    tell(f'data.intensity=auto: {_describe(policy, data_config)} for the {where} scans '
         f'({evidence}); set data.intensity to override')
  _check_contrast(samples, policy, where, data_config)
  if key is not None:
    _RESOLVED[key] = policy
  return policy
