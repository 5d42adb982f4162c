"""What every pretraining method does when its steps are done: export the encoder for downstream
runs (backbone.msgpack + backbone.json, dsset.checkpointing) and tell the user where things are."""

from __future__ import annotations

import importlib.util
from typing import Any, ClassVar

from dsset import checkpointing
from dsset.methods.base import Method


class PretrainingMethod(Method):
  """A method that trains an encoder for others to use (init_from of a downstream run)."""

  # Where a set encoder's own layers live (DS-SimCLR's rho), exported beside the encoder for
  # scan-level evaluation; None when the method has none.
  set_encoder_path: ClassVar[tuple[str, ...] | None] = None

  def finish(self, variables, workdir) -> dict[str, Any]:
    path = checkpointing.export_backbone(workdir, variables, self.encoder_path, self.model_config,
                                         self.set_encoder_path)
    return {'backbone': path}

  def summary(self, result, workdir) -> str:
    if importlib.util.find_spec('tensorboard') is not None:
      board = f'TensorBoard: tensorboard --logdir {workdir}'
    else:
      board = ('TensorBoard event files (events.out.tfevents.*; to view them: pip install '
               f'tensorboard, then tensorboard --logdir {workdir})')
    return (f'Done: {self.config.train.num_steps} steps. Results in {workdir}:\n'
            '  metrics.jsonl (per-step metrics), checkpoints/ (resume), '
            f'{checkpointing.BACKBONE_FILE} (encoder for downstream), {board}')
