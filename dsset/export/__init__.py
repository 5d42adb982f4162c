"""Encoders to and from other frameworks (docs/pytorch.md).

    python -m dsset.export --workdir=W --format=torch --out=encoder.pt

  torch_resnet: dsset's 2D ResNets as a plain PyTorch module in torchvision's layout (torch only,
                no JAX: copy it into a PyTorch project or import it alone).
  convert:      Flax variables <-> torchvision-layout state_dicts, as numpy arrays.
  to_torch:     the export itself (state_dict + JSON sidecar).

Importing this package imports nothing, so `from dsset.export import torch_resnet` needs only torch.
The reverse direction, a torchvision state_dict as the start of a run, is config key
init_from=path/to/resnet.pth (dsset.checkpointing.load_backbone).
"""
