"""What every pretraining method shares: its batches come from the Grain pipeline over the train
split through the method's sampler, the online probe reads its encoder's features, and when its
steps are done it exports the encoder for downstream runs (backbone.msgpack + backbone.json,
dsset.checkpointing) and tells the user where things are."""

from __future__ import annotations

import importlib.util
from typing import Any, ClassVar

from data_pipelines import pipeline, samplers
from data_pipelines.sources import make_source
from dsset import checkpointing
from dsset.methods.base import Method


class PretrainingMethod(Method):
  """A method that trains an encoder for others to use (init_from of a downstream run)."""

  # Where a set encoder's own layers live (DS-SimCLR's rho), exported beside the encoder for
  # scan-level evaluation; None when the method has none.
  set_encoder_path: ClassVar[tuple[str, ...] | None] = None

  def __init__(self, config):
    super().__init__(config)
    self._num_classes = 0
    self._train_source = None
    self._sampler = None

  def make_sampler(self, source) -> samplers.ViewSampler:
    """The Grain map from a train-split record to one example of this method's batches."""
    raise NotImplementedError

  def make_train_iterator(self, process_index=0, process_count=1, batch_multiple=1):
    del batch_multiple  # train.batch_size was checked against the devices
    # Built once and handed to the pipeline: a NIfTI or DICOM folder's source reads every header.
    source = make_source(self.config.data, 'train')
    self._num_classes = source.num_classes if self.config.monitor.enabled else 0
    self._train_source, self._sampler = source, self.make_sampler(source)
    return pipeline.make_train_iterator(self.config, self._sampler, process_index=process_index,
                                        process_count=process_count)

  def epoch_records(self) -> tuple[int, str]:
    """The sampler's records: scans, unless a method counts otherwise."""
    return self._sampler.num_records, 'scans'

  @property
  def monitor_classes(self) -> int:
    return self._num_classes

  @property
  def monitor_dim(self) -> int:
    """The online probe reads the encoder's features (self.model.backbone)."""
    return self.model.backbone.num_features

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
