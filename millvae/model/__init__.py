"""The β-VAE (`vae`), its fused speed kernels (`fused`, `native`).

The names below are where Keras models saved before the split into this package find their
classes (their pickled custom objects say `millvae.model.<name>`).
"""

from millvae.model.vae import (
    BetaVAE,
    FusedAdam,
    FusedBatchNormalization,
    FusedTCN,
    OneCycle,
    warm_keras_saving,
)

__all__ = [
    "BetaVAE",
    "FusedAdam",
    "FusedBatchNormalization",
    "FusedTCN",
    "OneCycle",
    "warm_keras_saving",
]
