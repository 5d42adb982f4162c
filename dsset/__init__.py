"""dsset: self-supervised pretraining of 2D encoders on 3D medical scans."""

# First, before anything here can start a JAX backend: XLA reads XLA_FLAGS only then.
from dsset import _xla_setup

_xla_setup.configure()
