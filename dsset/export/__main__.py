"""python -m dsset.export --workdir=PRETRAIN_DIR --format=torch --out=encoder.pt

Writes the pretrained 2D encoder of PRETRAIN_DIR as a PyTorch state_dict in torchvision's ResNet
layout (no fc) and encoder.json beside it (model, torchvision recipe, input normalisation and
intensity mapping). Needs torch (pip install torch). docs/pytorch.md.
"""

from __future__ import annotations

import argparse
import sys

FORMATS = ('torch',)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m dsset.export',
      description='Export a pretraining workdir\'s encoder to another framework (docs/pytorch.md).')
  parser.add_argument('--workdir', required=True, help='pretraining workdir with backbone.msgpack')
  parser.add_argument('--format', required=True, choices=FORMATS,
                      help='torch: torchvision-layout state_dict + JSON sidecar')
  parser.add_argument('--out', required=True, help='state_dict file to write (e.g. encoder.pt); '
                      'the sidecar goes beside it with the suffix .json')
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  # Imported after parsing, so --help and usage errors do not wait for JAX.
  from dsset.config_validation import ConfigError  # pylint: disable=import-outside-toplevel
  from dsset.export import to_torch  # pylint: disable=import-outside-toplevel
  try:
    out, meta = to_torch.export_torch(args.workdir, args.out)
  except ConfigError as e:
    print(f'dsset: error: {e}', file=sys.stderr)
    return 1
  print(f'{out} (state_dict) + {meta} (model and input normalisation)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
