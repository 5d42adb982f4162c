"""Intra-inter clustering (Nguyen et al., AAAI 2023): 2D clustering of slices, masked
slice-embedding prediction and 3D cluster agreement of volume features (python -m dsset.main
--config=configs/intra_inter.py[:STAGE][,SIZE] --workdir=DIR; dsset.methods.intra_inter).

The text after the colon names a stage and/or a size, comma-separated (e.g. `:stage2,tiny`):
  stage1   2D SwAV on single slices: the swav method (configs/swav.py) with this file's encoder and
           data, so that its export initialises stage 2.
  stage2   objective 'mask': masked slice-embedding prediction; encoder frozen (eval-mode
           BatchNorm), as released. Set init_from to the stage-1 workdir.
  stage3   objective 'inter': SwAV between the volume features of two 3D views; everything
           trains. Set init_from to the stage-2 workdir (encoder, slice embedding, transformer).
  joint    (the default when no stage is named) one run of the weighted sum of the intra, mask and
           inter losses, from scratch or from init_from.
  sizes    '' (this CPU: the quick start's ResNet-10 at half width on 32 px slices, stacks of 16,
           a 2-layer transformer of width 128), 'paper' (the released code: ResNet-50, 128 px, 64
           slices, width 640, 4 layers, LARS at 0.01, 100 epochs with 10 of warm-up), 'compare'
           (configs/base.py's comparison settings), 'tiny' (tests and smoke runs).
scripts/intra_inter_stages.sh runs the three stages in a row.

Keys this method reads beyond the shared ones (stage 1 reads configs/swav.py's):
  data.num_slices               T, slices per stack: a random run of T consecutive slices, scans
                                with fewer zero-padded (data_pipelines.volumes.SliceStackSampler).
  model.slice_transformer.*     d_model (token width), num_layers, num_heads, downsample,
                                offset_kernel, offset_scale, position_bias, ffn_hidden, dropout,
                                pre_ln (dsset.models.SliceTransformer).
  swav.*                        as configs/swav.py, for every prototype layer of this method (the
                                inter prototypes, and in 'joint' the intra prototypes); each layer
                                has its own queue when swav.queue_length > 0.
  intra_inter.objective         'mask' | 'inter' | 'joint'.
  intra_inter.weights           (intra, mask, inter): the weights of the 'joint' sum.
  intra_inter.mask_ratio        share of a stack's tokens masked: ceil(ratio * T) per volume.
  intra_inter.mask_loss         'masked' (squared error over the masked tokens) | 'released' (the
                                released code: mean over all tokens, both views summed, divided
                                by int(ratio * T)).
  intra_inter.freeze_encoder    keep the ResNet and the slice embedding as they are (eval-mode
                                BatchNorm): the released mask stage.
  intra_inter.projection_head   score the prototypes on a projection head's output
                                (model.head_hidden, model.head_out; on by default) instead of
                                on the unit volume feature itself (the released code, :paper).
  intra_inter.intra_slices      'joint': slices per volume for the intra (2D SwAV) term, each
                                given two views by the 2D augmentations (augment.*).
  intra_inter.augment.*         the 3D view augmentations (dsset.augment3d.
                                default_intra_inter_augment3d: one of seven TorchIO-style
                                transforms per view, different for the two views).
"""

import ml_collections

from configs import base
from configs import swav
from dsset import augment3d

STAGES = ('stage1', 'stage2', 'stage3', 'joint')
_OBJECTIVES = {'stage2': 'mask', 'stage3': 'inter', 'joint': 'joint'}


def parse(arg):
  """'[stage][,size]' in either order -> (stage, size or None)."""
  parts = [part for part in (arg or '').split(',') if part]
  stages = [part for part in parts if part in STAGES]
  sizes = [part for part in parts if part not in STAGES]
  if len(stages) > 1 or len(sizes) > 1 or any(size not in base.VARIANTS for size in sizes):
    raise ValueError(f'unknown config variant {arg!r} of intra_inter.py: at most one stage '
                     f'({", ".join(STAGES)}) and one size ({", ".join(base.VARIANTS)}), '
                     'comma-separated (e.g. --config=configs/intra_inter.py:stage2,tiny)')
  return (stages[0] if stages else 'joint'), (sizes[0] if sizes else None)


def get_config(arg=None):
  stage, size = parse(arg)
  config = swav.get_config(size) if stage == 'stage1' else intra_inter_config(size, stage)
  shared_settings(config, size)
  return config


def shared_settings(config, size) -> None:
  """The encoder and data every stage shares, so that each one's export fits the next. Other
  sizes keep configs/base.py's (the quick start's and the comparison's), so that the 2D methods'
  evaluations read intra_inter's encoders at the same image size."""
  if size == 'paper':
    config.model.backbone = 'resnet50'
    config.model.width_multiplier = 1.0
    config.data.image_size = 128


def intra_inter_config(size, stage):
  config = base.get_config(size)
  config.method = 'intra_inter'
  # One encoder call takes both views' slices (the released code concatenates the views).
  config.model.batch_norm_views = 'joint'
  config.data.num_slices = {'paper': 64, 'tiny': 8}.get(size, 16)
  t = config.model.slice_transformer = ml_collections.ConfigDict()
  t.d_model = 128
  t.num_layers = 2
  t.num_heads = 4
  t.downsample = 4
  t.offset_kernel = 6
  t.offset_scale = 2.0
  t.position_bias = True
  t.ffn_hidden = 256
  t.dropout = 0.1
  t.pre_ln = False

  # SwAV's settings of configs/swav.py, with fewer prototypes for batches of a few volumes.
  s = config.swav = swav.get_config(size).swav
  # The intra term's slices get two views each; SwAV's multi-crop is the stage-1 (swav) run's.
  s.num_small_crops = 0
  s.num_prototypes = 32
  # A few steps of 8 volumes: Sinkhorn over one batch alone gives nearly flat codes.
  s.queue_length = 64

  m = config.intra_inter = ml_collections.ConfigDict()
  m.objective = _OBJECTIVES[stage]
  m.weights = (1.0, 1.0, 1.0)
  m.mask_ratio = 0.1
  m.mask_loss = 'masked'
  m.freeze_encoder = stage == 'stage2'
  # The released code scores the prototypes on the unit volume feature itself (:paper). Here, 8
  # volumes a batch, that collapsed every volume onto one feature within 80 steps of stage 3
  # (measured on the phantom: cosine 1.000 between all volumes); the projection head's BatchNorm,
  # which takes out what the volumes share, kept them apart (mean cosine 0.45).
  m.projection_head = size != 'paper'
  m.intra_slices = 2
  m.augment = augment3d.default_intra_inter_augment3d()

  config.train.batch_size = 8
  if size == 'paper':
    t.update(d_model=640, num_layers=4, num_heads=8, ffn_hidden=720)
    s.update(num_prototypes=3000, queue_length=0)
    m.mask_loss = 'released'
    # The released scripts: LARC-wrapped SGD at 0.01, weight decay 1e-6, 100 epochs (over the
    # volumes) with 10 of warm-up, 4 volumes a batch in the mask stage and 6 in the 3D stage
    # (per GPU; their GPU count is not given).
    config.train.update(optimizer='lars', learning_rate=1e-2, weight_decay=1e-6, num_epochs=100,
                        warmup_epochs=10, batch_size=4 if stage == 'stage2' else 6)
  elif size == 'tiny':
    t.update(d_model=16, num_layers=1, num_heads=2, ffn_hidden=32)
    s.update(num_prototypes=8, queue_length=8)
    config.train.batch_size = 4
  return config
