"""The parts `train.fit` puts around `model.fit`, each measured to pay: the input pipeline (one
seeded, repeated tf.data iterator without autotuning) and the callbacks that validate through the
model's own graph and hide TensorFlow's first-step notice; each says what was measured.
"""

from __future__ import annotations

import numpy as np

from millvae.quiet import StderrFilter


def training_batches(x_train: np.ndarray, batch_size: int, seed: int):
    """Training batches reshuffled every epoch (seeded), repeated: fit with `steps_per_epoch`.

    The same epochs as `model.fit(x, batch_size, shuffle=True)`, a different (seeded) order.
    Keras' own pipeline for arrays gathers each batch through an autotuned parallel map and
    prefetch; it measured slower and more variable: 0.50 s against 0.43 s per epoch (median of 12,
    paper's best configuration, real data, two cores).

    Repeated, because Keras makes a new iterator of a finite dataset at each epoch's start and
    another at its end (thrown away unused), each with its prefetch thread and a refilled shuffle
    buffer; in about a third of the epochs the next epoch then waited 0.2-0.5 s before its first
    step. One iterator for the whole fit: seed default on the real data, epochs 2-11 took 0.83 s
    against 1.00 s (two cores). Shuffling before `repeat` keeps each epoch one permutation.

    Without tf.data's autotuning: nothing here is autotuned, and its model thread sleeps in
    periods that grow as the fit goes on; the iterator's teardown at the end of `fit` waited for
    it. Measured with one thread per process, two fits side by side (real data, 5 epochs): 6 of
    12 fits ended 1.5-1.7 s late with the process idle, 0 of 12 without it; stalls of 4-7 s at
    the end of search trials.
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return (
        tf.data.Dataset.from_tensor_slices(x_train)
        .shuffle(len(x_train), seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size)
        .repeat()
        .prefetch(2)
        .with_options(options)
    )


def validation_callback(x_val: np.ndarray, batch_size: int):
    """A callback that puts `val_*` metrics into each epoch's logs, ahead of the callbacks that
    read them (EarlyStopping, progress, history, MLflow): `validation_data` done by
    `BetaVAE.validate`, whose graph scoring reuses after training (Keras' evaluate traces a
    function of its own, thrown away with the fit: scoring all 11,570 real windows after a fit
    took 1.3-2.0 s this way against 2.1-3.1 s, one AMD core)."""
    import keras

    class Validation(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            metrics = self.model.validate(x_val, batch_size=batch_size)
            if logs is not None:
                logs.update({f"val_{k}": v for k, v in sorted(metrics.items())})

    return Validation()


def quiet_first_step():
    """A callback that filters fd 2 during the first training step only, when TensorFlow's
    graph passes print oneDNN's DT_INT32 notice (see `millvae.quiet`)."""
    import keras

    class QuietFirstStep(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.filter = StderrFilter()

        def on_train_begin(self, logs=None):
            self.filter.start()

        def on_train_batch_end(self, batch, logs=None):
            self.filter.stop()

    return QuietFirstStep()
