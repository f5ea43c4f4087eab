"""The seed's β-VAE (Hahn & Mechefske 2021) as a Keras 3 model with keras-tcn TCN blocks.

Architecture, per the seed notebook's `model_fit` (`milling-tool-wear-beta-vae.ipynb`, cell 3.1):

    encoder  x[window, signals]
             → conv_layers × [TCN(filters, kernel, dilations, causal, skip, selu, he_normal)
                               → BatchNormalization → MaxPool1D(2)]
             → Flatten → Dense(codings) mean, Dense(codings) log-variance
    decoder  z[codings] → Dense(filters · window / 2**conv_layers, selu)
             → Reshape(window / 2**conv_layers, filters)
             → conv_layers × [UpSampling1D(2) → BatchNormalization → TCN(same settings)]
             → Conv1D(signals, kernel, padding='same', activation=final_activation)

A conditional β-VAE (`conditions` = 3: depth of cut, feed, material) reads its condition as
extra channels after the signals of x, constant over the window, and its decoder gets the same
values beside z; it reconstructs, and its loss counts, the signals only.

Every TCN uses the same filter count (`start_filter_no`); one stack, no dropout, no norm inside.
BatchNormalization keeps Keras' momentum 0.99 unless `bn_momentum` says otherwise: training
normalises with batch statistics either way, so the momentum changes only the moving statistics
that validation and scoring use (with ~8 steps per epoch, 0.99 lags the weights by ~12 epochs).
The window must be divisible by ``2**conv_layers`` (checked by the caller, not here).

Loss per batch, as in the seed (Keras `binary_crossentropy` plus an `add_loss` term):

    loss = mean BCE(x, x̂) over batch, time and signals
           + β · mean_batch(KL) / (window_size · n_signals)
    KL   = −½ Σ_codings (1 + log σ² − σ² − μ²)

`kl_loss` reports mean_batch(KL) itself (nats per window, unweighted), so
``loss == reconstruction_loss + beta * kl_loss / (window_size * n_signals)``.
Training and evaluation (hence `val_loss`) decode a sampled coding, as the seed did;
`call`/`predict` decode the mean, so scores and served predictions are deterministic.

The layers are the fast ones of `millvae.model.fused` (same weights, config and names as Keras'
and keras-tcn's); this module is the model itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops
from tcn import TCN

from millvae.model import fused
from millvae.model.fused import (
    KERAS_PACKAGE,
    CausalConv1D,
    FusedAdam,
    FusedBatchNormalization,
    FusedTCN,
    GraphInference,
    warm_keras_saving,
)

__all__ = [
    "ARCHITECTURE",
    "CUSTOM_OBJECTS",
    "Architecture",
    "BetaVAE",
    "CausalConv1D",
    "FusedAdam",
    "FusedBatchNormalization",
    "FusedTCN",
    "OneCycle",
    "build_vae",
    "warm_keras_saving",
]


_CASTS = {"int": int, "float": float, "str": str, "list[int]": lambda v: [int(d) for d in v]}


@dataclasses.dataclass
class Architecture:
    """The β-VAE's arguments: `build_vae`'s and `BetaVAE`'s keywords, its saved config (the
    names, in order: `ARCHITECTURE`)."""

    window_size: int
    n_signals: int
    codings_size: int
    conv_layers: int
    start_filter_no: int
    kernel_size: int
    dilations: list[int]
    final_activation: str
    beta: float
    seed: int
    bn_momentum: float = 0.99
    # a conditional β-VAE: this many condition values (`millvae.data.conditions`) follow the
    # signals as channels of each window, and the decoder reads them beside the coding
    conditions: int = 0

    def __post_init__(self) -> None:  # each value as its field's type ("8" -> 8, (1, 2) -> [1, 2])
        for field in dataclasses.fields(self):
            cast = _CASTS[str(field.type)]
            setattr(self, field.name, cast(getattr(self, field.name)))


ARCHITECTURE: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Architecture))


def sample(mean: Any, log_var: Any, seed: keras.random.SeedGenerator) -> Any:
    """A coding drawn from N(mean, exp(log_var)) by the reparameterisation trick."""
    noise = keras.random.normal(ops.shape(mean), dtype=mean.dtype, seed=seed)
    return mean + ops.exp(0.5 * log_var) * noise


def vae_losses(
    x: Any, mean: Any, log_var: Any, reconstruction: Any, beta: float, values_per_window: int
) -> tuple[Any, Any, Any, Any]:
    """(total loss, reconstruction BCE, mean KL per window, reconstruction) of one batch."""
    # As in the seed's Keras 2: a traced sigmoid output is scored on its logits; any other
    # output (SELU) is clipped to [ε, 1−ε] first. Targets outside [0, 1] are allowed.
    reconstruction_loss = ops.mean(keras.losses.binary_crossentropy(x, reconstruction))
    kl = -0.5 * ops.sum(1.0 + log_var - ops.exp(log_var) - ops.square(mean), axis=-1)
    kl_loss = ops.mean(kl)
    loss = reconstruction_loss + beta * kl_loss / values_per_window
    return loss, reconstruction_loss, kl_loss, reconstruction


def _tcn(
    filters: int, kernel_size: int, dilations: Sequence[int], name: str
) -> TCN:  # one TCN block with the seed's fixed settings
    return fused.TCN_LAYER(
        nb_filters=filters,
        kernel_size=kernel_size,
        nb_stacks=1,
        dilations=list(dilations),
        padding="causal",
        use_skip_connections=True,
        dropout_rate=0.0,
        return_sequences=True,
        activation="selu",
        kernel_initializer="he_normal",
        use_batch_norm=False,
        use_layer_norm=False,
        name=name,
    )


# Every layer gets an explicit name: weights in a .keras file are matched by name, and
# auto-generated names depend on what else the loading process has built before.
def _build_encoder(arch: Architecture) -> keras.Model:
    filters = arch.start_filter_no
    channels = arch.n_signals + arch.conditions
    inputs = keras.Input(shape=(arch.window_size, channels), name="window")
    z = inputs
    for i in range(arch.conv_layers):
        with fused.tcn_conv_layers():
            z = _tcn(filters, arch.kernel_size, arch.dilations, name=f"encoder_tcn_{i}")(z)
        z = fused.BATCH_NORM(momentum=arch.bn_momentum, name=f"encoder_batch_norm_{i}")(z)
        z = keras.layers.MaxPool1D(pool_size=2, name=f"encoder_max_pool_{i}")(z)
    z = keras.layers.Flatten(name="encoder_flatten")(z)
    mean = keras.layers.Dense(arch.codings_size, name="codings_mean")(z)
    log_var = keras.layers.Dense(arch.codings_size, name="codings_log_var")(z)
    return keras.Model(inputs, [mean, log_var], name="encoder")


def _build_decoder(arch: Architecture) -> keras.Model:
    filters = arch.start_filter_no
    steps = arch.window_size // 2**arch.conv_layers
    codings = keras.Input(shape=(arch.codings_size + arch.conditions,), name="codings")
    x = keras.layers.Dense(filters * steps, activation="selu", name="decoder_dense")(codings)
    x = keras.layers.Reshape((steps, filters), name="decoder_reshape")(x)
    for i in range(arch.conv_layers):
        x = keras.layers.UpSampling1D(size=2, name=f"decoder_up_sampling_{i}")(x)
        x = fused.BATCH_NORM(momentum=arch.bn_momentum, name=f"decoder_batch_norm_{i}")(x)
        with fused.tcn_conv_layers():
            x = _tcn(filters, arch.kernel_size, arch.dilations, name=f"decoder_tcn_{i}")(x)
    outputs = keras.layers.Conv1D(
        arch.n_signals,
        kernel_size=arch.kernel_size,
        padding="same",
        activation=arch.final_activation,
        name="reconstruction",
    )(x)
    return keras.Model(codings, outputs, name="decoder")


def _x_only(data: Any) -> Any:
    """The windows of a batch: fit/evaluate may hand x alone, (x,), or (x, y[, w])."""
    x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
    return x


@keras.saving.register_keras_serializable(package=KERAS_PACKAGE)
class BetaVAE(GraphInference, keras.Model):
    """TCN β-VAE: `encoder` maps windows to (mean, log_var), `decoder` maps codings back.

    Keywords: the fields of `Architecture`, then Keras' own (name, trainable, ...). Compile with
    an optimizer only (``model.compile(optimizer=keras.optimizers.Adam(1e-3))``) and fit on x
    alone; `fit` reports loss, reconstruction_loss, kl_loss and rounded_accuracy. `encode`,
    `forward`, `validate` and `decode` run in batches (`GraphInference`). Use `build_vae` to
    create one: it seeds the initial weights.
    """

    def __init__(self, **kwargs: Any) -> None:
        arch = Architecture(**{k: kwargs.pop(k) for k in ARCHITECTURE if k in kwargs})
        super().__init__(**kwargs)
        for name in ARCHITECTURE:  # window_size, n_signals, ... as attributes
            setattr(self, name, getattr(arch, name))
        self.encoder = _build_encoder(arch)
        self.decoder = _build_decoder(arch)
        # A tracked generator: sampling noise is reproducible, and its state is saved.
        self.noise = keras.random.SeedGenerator(self.seed)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.reconstruction_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.kl_tracker = keras.metrics.Mean(name="kl_loss")
        self.accuracy_tracker = keras.metrics.Mean(name="rounded_accuracy")
        self.build((None, self.window_size, self.n_signals + self.conditions))

    def build(self, input_shape: Any) -> None:
        # The sub-models are functional and built at construction; nothing left to create.
        self.built = True

    @property
    def metrics(self) -> list[keras.metrics.Metric]:
        # Listed here so Keras resets them at the start of every epoch.
        return [
            self.loss_tracker,
            self.reconstruction_tracker,
            self.kl_tracker,
            self.accuracy_tracker,
        ]

    def call(self, x: Any, training: bool | None = False) -> Any:
        """Reconstruction; decodes the mean coding unless training (then a sampled one)."""
        mean, log_var = self.encoder(x, training=training)
        codings = self._sample(mean, log_var) if training else mean
        return self.decoder(self.decoder_input(codings, x), training=training)

    def _sample(self, mean: Any, log_var: Any) -> Any:
        return sample(mean, log_var, self.noise)

    def decoder_input(self, codings: Any, x: Any) -> Any:
        """The codings, and for a conditional model each window's condition beside them."""
        if not self.conditions:
            return codings
        return ops.concatenate([codings, x[:, 0, self.n_signals :]], axis=-1)

    def signals(self, x: Any) -> Any:
        """The signal channels of windows x: what the model reconstructs."""
        return x[:, :, : self.n_signals] if self.conditions else x

    def _loss_terms(self, x: Any, training: bool) -> tuple[Any, Any, Any, Any]:
        """Total loss, reconstruction BCE, mean KL per window, reconstruction (sampled coding)."""
        mean, log_var = self.encoder(x, training=training)
        codings = self.decoder_input(self._sample(mean, log_var), x)
        reconstruction = self.decoder(codings, training=training)
        return self._loss_values(x, mean, log_var, reconstruction)

    def _loss_values(
        self, x: Any, mean: Any, log_var: Any, reconstruction: Any
    ) -> tuple[Any, Any, Any, Any]:
        values = self.window_size * self.n_signals
        return vae_losses(self.signals(x), mean, log_var, reconstruction, self.beta, values)

    def _update_metrics(self, x: Any, losses: tuple[Any, Any, Any, Any]) -> dict[str, Any]:
        loss, reconstruction_loss, kl_loss, reconstruction = losses
        # Weighted by batch size so an epoch's value is the per-window mean.
        batch = ops.cast(ops.shape(x)[0], "float32")
        self.loss_tracker.update_state(loss, sample_weight=batch)
        self.reconstruction_tracker.update_state(reconstruction_loss, sample_weight=batch)
        self.kl_tracker.update_state(kl_loss, sample_weight=batch)
        accuracy = keras.metrics.binary_accuracy(
            ops.round(self.signals(x)), ops.round(reconstruction)
        )
        self.accuracy_tracker.update_state(accuracy)
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, data: Any) -> dict[str, Any]:
        x = ops.convert_to_tensor(_x_only(data), dtype=self.compute_dtype)
        with tf.GradientTape() as tape:
            losses = self._loss_terms(x, training=True)
        gradients = tape.gradient(losses[0], self.trainable_weights)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_weights, strict=True))
        return self._update_metrics(x, losses)

    def test_step(self, data: Any) -> dict[str, Any]:
        x = ops.convert_to_tensor(_x_only(data), dtype=self.compute_dtype)
        return self._update_metrics(x, self._loss_terms(x, training=False))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        arch = Architecture(**{name: getattr(self, name) for name in ARCHITECTURE})
        config.update(dataclasses.asdict(arch))
        return config


def build_vae(**architecture: Any) -> BetaVAE:
    """A freshly initialised β-VAE of the given `Architecture` fields (keywords);
    ``window_size`` must be divisible by ``2**conv_layers``.

    Reseeds Python, NumPy and TensorFlow (`keras.utils.set_random_seed(seed)`), as the seed's
    `model_fit` did, so the same arguments give the same initial weights and, on CPU, the same
    training run.
    """
    arch = Architecture(**architecture)
    keras.utils.set_random_seed(arch.seed)
    return BetaVAE(**dataclasses.asdict(arch))


@keras.saving.register_keras_serializable(package=KERAS_PACKAGE)
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """Learning rate per optimizer step: linear warm-up from `start` to `peak` over
    `warmup_steps`, cosine annealing down to `end` at `total_steps`, then `end`.

    A short, high-rate cycle that reaches the loss the seed's constant rate needs hundreds of
    epochs for; `lr_schedule=onecycle` in the run's parameters.
    """

    def __init__(
        self, start: float, peak: float, end: float, warmup_steps: int, total_steps: int
    ) -> None:
        self.start, self.peak, self.end = float(start), float(peak), float(end)
        self.warmup_steps = max(1, int(warmup_steps))
        self.total_steps = max(self.warmup_steps + 1, int(total_steps))

    def __call__(self, step: Any) -> Any:
        step = ops.cast(step, "float32")
        warm = self.start + (self.peak - self.start) * step / self.warmup_steps
        span = float(self.total_steps - self.warmup_steps)
        progress = ops.clip((step - self.warmup_steps) / span, 0.0, 1.0)
        cosine = self.end + 0.5 * (self.peak - self.end) * (1.0 + ops.cos(np.pi * progress))
        return ops.where(step < self.warmup_steps, warm, cosine)

    def get_config(self) -> dict[str, Any]:
        return {
            k: getattr(self, k) for k in ("start", "peak", "end", "warmup_steps", "total_steps")
        }


# For `keras.models.load_model(path, custom_objects=CUSTOM_OBJECTS)`. Importing this module
# registers these classes already (keras-tcn registers TCN as "Custom>TCN"), so plain
# `load_model` works too; the dict is for callers that prefer to be explicit.
CUSTOM_OBJECTS: dict[str, type] = {
    "BetaVAE": BetaVAE,
    "TCN": TCN,
    "OneCycle": OneCycle,
    "FusedAdam": FusedAdam,
    "FusedBatchNormalization": FusedBatchNormalization,
    "FusedTCN": FusedTCN,
}
