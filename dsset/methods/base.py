"""What a method is to the training loop: the one interface every pretraining and downstream method
implements (dsset.train asks it; nothing outside dsset/methods branches on a method's name).

A method owns everything that differs between methods: the config keys it reads and their checks,
the host batches it needs (its iterator), its model and variables, its loss and metrics, where its
transferable encoder lives (export and init_from), how many encoder images one example costs, and
what happens when training ends (an encoder export, or an evaluation written to eval.json). The loop
owns the rest: sharded state, the jitted update with its non-finite gate, checkpoints with the data
position, signals, logging and progress.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from typing import Any, ClassVar, NamedTuple

import jax
import ml_collections
from jax.sharding import PartitionSpec

from dsset import checkpointing
from dsset.config_validation import ConfigError

# key -> (check, what a valid value is), as in dsset.config_validation.
Rule = tuple[Callable[[Any], bool], str]


class StepOutput(NamedTuple):
  """What a method's loss returns beside the loss (a pytree, so it can leave the jitted step)."""

  batch_stats: Any  # the updated BatchNorm statistics
  metrics: dict[str, jax.Array]  # scalars logged to metrics.jsonl
  # Representations [N, D] and labels [N] (-1 = unlabelled) for the loop's online linear probe
  # (config monitor.*); None when the method has nothing to monitor.
  monitor_features: jax.Array | None = None
  monitor_labels: jax.Array | None = None
  # The method's new non-trained state (Method.init_method_state); None leaves it as it was.
  method_state: Any = None
  # A traced bool: False makes the loop keep params and optimiser state as they were this step
  # (batch_stats and method_state still move), e.g. while a memory bank is first filled. None: the
  # update is applied. A runtime gate rather than a phase, so it costs no second compilation.
  apply_update: jax.Array | None = None


class Method:
  """Base class: the defaults suit a method that trains an encoder from config.model."""

  # Where the transferable 2D encoder lives inside the variables (for export and init_from); None
  # when the method has no encoder of its own to carry over.
  encoder_path: ClassVar[tuple[str, ...] | None] = ('backbone',)
  # False for methods that only evaluate (kNN): the loop skips training and calls finish.
  trains: ClassVar[bool] = True
  # Config keys this method reads beyond the shared ones, checked at start-up with the others.
  config_rules: ClassVar[dict[str, Rule]] = {}

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  @classmethod
  def check_config(cls, config: ml_collections.ConfigDict) -> None:
    """Checks that involve several keys; raises ConfigError naming them. Must be cheap."""

  @property
  def model_config(self) -> ml_collections.ConfigDict:
    """The model section the encoder is built from."""
    return self.config.model

  def make_train_iterator(self, process_index: int = 0, process_count: int = 1,
                          batch_multiple: int = 1) -> Iterator[dict]:
    """Endless host-local batches (this process's block of each global batch), checkpointable
    (get_state/set_state). batch_multiple: the global batch must be a multiple of it (devices).

    Heavy work (reading sources, extracting features) happens here, after the config is checked.
    """
    raise NotImplementedError

  def epoch_records(self) -> tuple[int, str]:
    """One epoch of train.num_epochs and train.warmup_epochs: (how many records one pass over the
    train data is, what they are, e.g. (1024, 'slices')). Called after make_train_iterator, only
    when an epochs key is set."""
    raise ConfigError(f'config keys train.num_epochs and train.warmup_epochs: method='
                      f'{self.config.method!r} does not count epochs; set train.num_steps and '
                      'train.warmup_steps instead')

  @property
  def monitor_classes(self) -> int:
    """Classes of the labels the online probe learns (0: no probe). Valid after the iterator."""
    return 0

  @property
  def monitor_dim(self) -> int:
    """Length of the representations the online probe reads (0: none)."""
    return 0

  def images_per_example(self) -> int:
    """Encoder images one example of the batch costs (for images/s; 0: no images/s)."""
    return 1

  def init(self, rng: jax.Array) -> dict:
    """Fresh variables {'params', 'batch_stats'} (shapes only are needed for a resume)."""
    raise NotImplementedError

  def loss(self, params, batch_stats, batch: dict, rng: jax.Array,
           phase: Hashable) -> tuple[jax.Array, StepOutput]:
    """The scalar loss of one global batch in train mode, and the StepOutput."""
    raise NotImplementedError

  def init_method_state(self, variables: dict) -> dict:
    """Non-trained state the method carries across steps (a queue, a memory bank, cluster
    assignments), as a dict of arrays; {} for none. Called after make_train_iterator (so sizes
    that depend on the data are known). It lives in the loop state under 'method_state',
    placed on the mesh as method_state_specs says, is saved and restored with the checkpoint,
    and reaches the method through before_step and loss_with_state; the new value comes back in
    StepOutput.method_state.
    Methods without state add nothing to the loop state, so their checkpoints do not change.
    """
    del variables
    return {}

  def method_state_specs(self, method_state: dict) -> dict:
    """How each array of init_method_state's dict lies on the device mesh: a PartitionSpec per
    leaf over parallel.DATA_AXIS (e.g. a memory bank split by rows, so each device holds a share
    of it). Leaves are ShapeDtypeStructs. Default: every array replicated."""
    return jax.tree.map(lambda _: PartitionSpec(), method_state)

  def before_step(self, params, method_state: dict, step: jax.Array, rng: jax.Array,
                  phase: Hashable) -> tuple[Any, dict]:
    """Runs inside the jitted step before the loss: returns the (params, method_state) the loss
    and the update start from. step: steps done so far (traced int). rng: a key of its own (not
    the loss's). For changes the gradient must not see, e.g. re-normalising SwAV's prototypes, or
    setting DeepCluster-v2's prototypes from k-means at an epoch start (under lax.cond). Default:
    unchanged."""
    del step, rng, phase
    return params, method_state

  def loss_with_state(self, params, batch_stats, method_state: dict, batch: dict, rng: jax.Array,
                      phase: Hashable) -> tuple[jax.Array, StepOutput]:
    """The loss for a method with state (what the loop calls). Default: the stateless loss."""
    del method_state
    return self.loss(params, batch_stats, batch, rng, phase)

  def phase(self, step: int) -> Hashable:
    """A static value the step is compiled for (one compile per distinct value), e.g. whether
    the encoder is still frozen at this 1-based step."""
    return None

  def frozen_paths(self, phase: Hashable) -> tuple[tuple[str, ...], ...]:
    """Parameter subtrees the update leaves unchanged in this phase."""
    return ()

  def load_init_from(self, variables: dict) -> dict:
    """Host variables with the encoder of config.init_from put in at encoder_path."""
    if self.encoder_path is None:
      raise ConfigError(f'config key init_from: method={self.config.method!r} has no encoder to '
                        'initialise')
    encoder, source_model = checkpointing.load_backbone(self.config.init_from)
    if source_model.get('backbone') != self.model_config.backbone:
      raise ConfigError(
          f'config key init_from={self.config.init_from!r} holds a '
          f'{source_model.get("backbone")} encoder but model.backbone='
          f'{self.model_config.backbone!r}')
    return checkpointing.insert_backbone(variables, encoder, self.encoder_path,
                                         self.config.init_from)

  def finish(self, variables: dict | None, workdir: str) -> dict[str, Any]:
    """Runs once, on process 0, after the last step: exports or evaluates; returns the result
    (None variables for methods that do not train)."""
    raise NotImplementedError

  def summary(self, result: dict[str, Any], workdir: str) -> str:
    """The closing line(s) for the user."""
    return f'Done. Results in {workdir}'
