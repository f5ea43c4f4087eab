"""The β-VAE (`vae`), its fused speed kernels (`fused`, `native`).

The names below are where Keras models saved before the split into this package find their
classes (their pickled custom objects say `millvae.model.<name>`).
"""

from millvae.model.vae import (
    CUSTOM_OBJECTS,
    BetaVAE,
    FusedAdam,
    FusedBatchNormalization,
    FusedTCN,
    OneCycle,
    build_vae,
    warm_keras_saving,
)

__all__ = [
    "CUSTOM_OBJECTS",
    "BetaVAE",
    "FusedAdam",
    "FusedBatchNormalization",
    "FusedTCN",
    "OneCycle",
    "build_vae",
    "warm_keras_saving",
]
