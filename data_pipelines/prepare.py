"""Converts any scan source into a TFDS dataset stored as ArrayRecord, once.

  python -m data_pipelines.prepare --config=configs/deepset.py \
      --config.data.source=dicom --config.data.path=IN --out=OUT

Orientation and the intensity policy (inside the source) and resampling to data.target_spacing are
applied here, so training reads finished volumes with
--config.data.source=tfds --config.data.path=OUT.

Resumable: every scan is first converted to OUT/.partial/<split>/<index>.npz (written to a temporary
name, then renamed, so a file that exists is complete); a rerun skips those and scans already found
bad (<index>.bad.json). Only then is the TFDS dataset built from them, and .partial is removed.
A bad scan is reported and skipped (data.on_bad_scan=skip) and listed in the summary at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import numpy as np
import tensorflow_datasets as tfds
import tqdm

from data_pipelines.errors import DataError
from data_pipelines.resample import resample
from data_pipelines.sources import SPLITS, make_source
from data_pipelines.tfds_builder import NAME, VERSION, DssetScans

# data keys that only change how training reads data, not the prepared volumes; any other change
# makes an unfinished .partial folder stale.
_READ_TIME_KEYS = ('image_size', 'channels', 'set_size', 'window', 'short_scans', 'min_slices',
                   'num_workers', 'prefetch_buffer', 'decoded_cache_scans', 'cache_dir',
                   'cache_max_gb', 'on_bad_scan')


@dataclasses.dataclass
class Summary:
  """What prepare did: scans written per split and (scan, message) for every bad one."""
  directory: str
  written: dict[str, int]
  bad: list[tuple[str, str]]
  missing_splits: dict[str, str]

  def lines(self) -> list[str]:
    out = [f'prepared dataset: {self.directory}']
    out += [f'  {split}: {count} scans' for split, count in self.written.items()]
    out += [f'  {split}: not prepared ({why})' for split, why in self.missing_splits.items()]
    if self.bad:
      out.append(f'{len(self.bad)} bad scans skipped:')
      out += [f'  {where}: {message}' for where, message in self.bad]
    return out


def _settings(data_config) -> dict:
  settings = data_config.to_dict()
  for key in _READ_TIME_KEYS:
    settings.pop(key, None)
  return json.loads(json.dumps(settings, default=list))


def _check_settings(partial_dir: str, data_config) -> None:
  """Refuses to resume a conversion that was started with different data settings."""
  path = os.path.join(partial_dir, 'settings.json')
  settings = _settings(data_config)
  if os.path.exists(path):
    with open(path) as f:
      if json.load(f) != settings:
        raise DataError(f'{partial_dir} holds an unfinished conversion made with other data '
                        'settings; delete it or choose another --out')
  else:
    os.makedirs(partial_dir, exist_ok=True)
    _write_atomically(path, json.dumps(settings, indent=1).encode())


def _write_atomically(path: str, content: bytes) -> None:
  temporary = f'{path}.tmp'
  with open(temporary, 'wb') as f:
    f.write(content)
  os.replace(temporary, path)


def _save_scan(path: str, scan, target_spacing) -> None:
  volume, spacing = resample(scan.volume, scan.spacing, target_spacing)
  arrays = {'volume': volume.astype(np.float32), 'spacing': np.asarray(spacing, np.float64),
            'scan_id': np.asarray(scan.scan_id), 'label': np.asarray(scan.label, np.int64)}
  if scan.mask is not None:
    mask, _ = resample(scan.mask, scan.spacing, target_spacing, interpolation='nearest')
    if mask.min() < 0 or mask.max() > 255:
      raise DataError(f'{scan.scan_id}: mask values must lie in 0..255 to be prepared')
    arrays['mask'] = mask.astype(np.uint8)
  temporary = f'{path}.tmp.npz'
  np.savez(temporary, **arrays)
  os.replace(temporary, path)


def _convert_split(source, split: str, partial_dir: str, data_config, bad: list) -> int:
  """Writes the split's scans that are not done yet; returns how many scans the split has."""
  folder = os.path.join(partial_dir, split)
  os.makedirs(folder, exist_ok=True)
  written = 0
  for index in tqdm.trange(len(source), desc=f'prepare {split}', unit='scan'):
    path = os.path.join(folder, f'{index:06d}.npz')
    bad_path = os.path.join(folder, f'{index:06d}.bad.json')
    if not os.path.exists(path) and not os.path.exists(bad_path):
      try:
        _save_scan(path, source[index], tuple(data_config.target_spacing))
      except DataError as e:
        if data_config.on_bad_scan == 'stop':
          raise
        logging.warning('skipping scan %d of split %s: %s', index, split, e)
        _write_atomically(bad_path, json.dumps({'scan': f'{split}[{index}]',
                                                'message': str(e)}).encode())
    if os.path.exists(bad_path):
      with open(bad_path) as f:
        record = json.load(f)
      bad.append((record['scan'], record['message']))
    else:
      written += 1
  return written


def _inventory(partial_dir: str, splits: list[str]) -> tuple[dict[str, list[int]], bool]:
  """(slice counts per split in example order, whether every scan has a mask) of converted scans."""
  counts, with_mask, without_mask = {}, 0, 0
  for split in splits:
    folder = os.path.join(partial_dir, split)
    counts[split] = []
    for name in sorted(os.listdir(folder)):
      if name.endswith('.npz'):
        with np.load(os.path.join(folder, name)) as archive:
          counts[split].append(int(archive['volume'].shape[0]))
          if 'mask' in archive.files:
            with_mask += 1
          else:
            without_mask += 1
  if with_mask and without_mask:
    logging.warning('only %d of %d scans have masks; masks are left out of the prepared dataset',
                    with_mask, with_mask + without_mask)
  return counts, bool(with_mask) and not without_mask


def prepare(config, out: str) -> Summary:
  """Converts config.data's source into a TFDS ArrayRecord dataset under `out`; returns a summary.

  The config is not modified.
  """
  data_config = config.data.copy_and_resolve_references()
  with data_config.unlocked():
    # Keep every scan: the tfds source applies data.min_slices when training reads the dataset.
    data_config.min_slices = 1
  if data_config.source == 'tfds':
    raise DataError('config key data.source=tfds is already a prepared dataset; prepare reads '
                    'another source (nifti, dicom, png, npz, datalist, phantom)')
  finished = os.path.join(out, NAME, VERSION)
  if os.path.isfile(os.path.join(finished, 'dataset_info.json')):
    info = tfds.builder_from_directory(finished).info
    logging.info('%s is already prepared; delete it to prepare again', finished)
    return Summary(directory=finished,
                   written={name: split.num_examples for name, split in info.splits.items()},
                   bad=[], missing_splits={})
  partial_dir = os.path.join(out, '.partial')
  _check_settings(partial_dir, data_config)
  written, bad, missing, num_classes = {}, [], {}, 0
  for split in SPLITS:
    try:
      source = make_source(data_config, split)
    except DataError as e:
      if split == 'train':
        raise
      missing[split] = str(e)
      continue
    num_classes = max(num_classes, int(source.num_classes))
    # Sources of one folder tree list it once per split: report each listing problem once.
    bad += [('(listing)', message) for message in getattr(source, 'skipped', ())
            if ('(listing)', message) not in bad]
    written[split] = _convert_split(source, split, partial_dir, data_config, bad)
  splits = [split for split, count in written.items() if count]
  if 'train' not in splits:
    raise DataError(f'data.path: no usable training scans in {data_config.path}')
  slice_counts, has_mask = _inventory(partial_dir, splits)
  builder = DssetScans(partial_dir=partial_dir, splits=splits, has_mask=has_mask,
                       num_classes=num_classes, slice_counts=slice_counts, data_dir=out,
                       file_format='array_record')
  builder.download_and_prepare(
      download_dir=os.path.join(partial_dir, 'downloads'),
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  shutil.rmtree(partial_dir)
  return Summary(directory=builder.data_dir, written={s: written[s] for s in splits}, bad=bad,
                 missing_splits=missing)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    summary = prepare(flags.FLAGS.config, flags.FLAGS.out)
  except DataError as e:
    raise SystemExit(f'error: {e}') from None
  print('\n'.join(summary.lines()))


def define_flags() -> None:
  """Flags exist only when this module runs as the program, so importing it never clashes."""
  config_flags.DEFINE_config_file('config', None, 'Config file (configs/<x>.py).')
  flags.DEFINE_string('out', None, 'Folder to write the prepared TFDS dataset to.')
  flags.mark_flags_as_required(['config', 'out'])


if __name__ == '__main__':
  define_flags()
  app.run(main)
