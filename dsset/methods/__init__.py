"""Registry of pretraining methods: config.method -> Method class.

SimCLR, PS-SimCLR and DS-SimCLR share one model and one loss and differ only in how the host sampler
draws the two views (METHODS.md section 1), so all three map to the same contrastive method.
"""

from dsset.methods.contrastive import ContrastiveMethod

METHODS = {
    'simclr': ContrastiveMethod,
    'perscan': ContrastiveMethod,
    'deepset': ContrastiveMethod,
}

__all__ = ['METHODS', 'ContrastiveMethod']
