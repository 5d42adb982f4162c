"""The method registry: config.method -> Method class (dsset.methods.base describes the interface).

Pretraining methods and downstream heads are registered alike; the training loop trains, checkpoints
and resumes whichever the config names. To add a method, write a Method subclass in a module of this
package and add it here (tests may add their own entries to METHODS).
"""

from dsset.config_validation import ConfigError
from dsset.methods.base import Method, StepOutput
from dsset.methods.contrastive import DeepSetMethod, PerScanMethod, SimclrMethod
from dsset.methods.cpc3d import CPC3DMethod
from dsset.methods.deepcluster import DeepClusterMethod
from dsset.methods.exemplar3d import Exemplar3DMethod
from dsset.methods.finetune import FinetuneMethod
from dsset.methods.intra_inter import IntraInterMethod
from dsset.methods.jigsaw3d import Jigsaw3DMethod
from dsset.methods.knn import KnnMethod
from dsset.methods.linear_probe import LinearProbeMethod
from dsset.methods.rotation3d import Rotation3DMethod
from dsset.methods.rpl3d import Rpl3DMethod
from dsset.methods.segment import SegmentMethod
from dsset.methods.segment3d import Segment3DMethod
from dsset.methods.swav import SwavMethod

METHODS: dict[str, type[Method]] = {
    # Pretraining (Torpey & Klein): which views are contrasted.
    'simclr': SimclrMethod,
    'perscan': PerScanMethod,
    'deepset': DeepSetMethod,
    # Clustering on slices (the 2D part of Nguyen et al.'s intra-inter clustering).
    'swav': SwavMethod,
    'deepcluster_v2': DeepClusterMethod,
    # Intra-inter clustering's masked-embedding and 3D stages (stage 1 is swav), or all at once.
    'intra_inter': IntraInterMethod,
    # 3D proxy tasks (Taleb et al.) on cubes of the scans, with the 3D U-Net encoder.
    'rotation3d': Rotation3DMethod,
    'exemplar3d': Exemplar3DMethod,
    'rpl3d': Rpl3DMethod,
    'jigsaw3d': Jigsaw3DMethod,
    'cpc3d': CPC3DMethod,
    # Downstream evaluation of an encoder (config key init_from, or random init).
    'linear': LinearProbeMethod,
    'knn': KnnMethod,
    'finetune': FinetuneMethod,
    'segment': SegmentMethod,
    'segment3d': Segment3DMethod,
}


def method_class(config) -> type[Method]:
  try:
    return METHODS[config.method]
  except KeyError:
    raise ConfigError(f'config key method={config.method!r} is invalid: expected one of '
                      f'{sorted(METHODS)}') from None


def make_method(config) -> Method:
  """The method the config names, built for it (cheap: no data is read)."""
  return method_class(config)(config)


__all__ = ['METHODS', 'Method', 'StepOutput', 'make_method', 'method_class']
