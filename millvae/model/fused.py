"""The β-VAE's speed kernels, behind the layer names of Keras and keras-tcn.

`millvae.model.vae` builds the model from the names here; each is the readable layer's faster
twin, with the same weights, config and numerics to float rounding, and falls back to it where
its kernel is unavailable:

- `CausalConv1D`: a dilated causal Conv1D as one dilated Conv2D, its filter gradient as matrix
  products (`GEMM_FILTER_GRAD_CHANNELS`);
- `FusedTCN`: keras-tcn's TCN with its residual blocks' elementwise work in `millvae.model.native`
  kernels, its windows in `window_groups()` groups;
- `FusedBatchNormalization`: Keras' BatchNormalization as TensorFlow's fused kernel;
- `FusedAdam`: Keras' Adam as TensorFlow's fused `ResourceApplyAdam`;
- `GraphInference`: the model's batched encode/forward/validate/decode, one traced graph each;
- `warm_keras_saving`: a Keras 3.15 cache fix for saving and loading.

`TCN_LAYER`, `BATCH_NORM` and `tcn_conv_layers` are what the builders use; the training benchmark's
plain arm swaps in keras-tcn's and Keras' own layers.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
import tcn.tcn
import tensorflow as tf
from tcn import TCN

from millvae.model import native
from millvae.runtime import cpu_flags, window_groups

# The package of the Keras names registered here and in `millvae.model.vae` ("millvae>FusedTCN").
KERAS_PACKAGE = "millvae"


@functools.cache
def _native_dilated_conv() -> bool:
    """Whether this TensorFlow runs a dilated Conv2D and its gradients as single kernels.

    oneDNN and cuDNN do. TensorFlow's own CPU kernels (oneDNN off: ``TF_ENABLE_ONEDNN_OPTS=0``, or
    TensorFlow's default on x86 CPUs without AVX-512, such as AMD Zen 3) run the forward pass and
    the input gradient but refuse the filter gradient ("do not yet support dilation rates larger
    than 1"), so the probe asks for both gradients. Probed once per process.
    """
    with tf.init_scope():  # run eagerly, even when first asked while a graph is being traced
        try:
            _dilated_conv_probe(tf.ones([1, 1, 5, 1]), tf.ones([1, 2, 1, 1]))
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError):
            return False
        return True


def _conv_attrs(rate: int) -> dict[str, Any]:
    """The attributes of every Conv2D op here: stride 1, VALID, dilated along the time axis."""
    return dict(strides=[1, 1, 1, 1], padding="VALID", dilations=[1, 1, rate, 1])


def _conv2d(x: tf.Tensor, kernel: tf.Tensor, rate: int) -> tf.Tensor:
    """VALID dilated convolution of x[n, time, in] with kernel[k, in, out] as one Conv2D."""
    y = tf.raw_ops.Conv2D(
        input=tf.expand_dims(x, 1), filter=tf.expand_dims(kernel, 0), **_conv_attrs(rate)
    )
    return tf.squeeze(y, 1)


# The three kernels a training step runs, called directly: `init_scope` pauses gradient tapes, so
# a tape-based probe traced here would record nothing and "succeed" without running a gradient.
@tf.function(autograph=False)
def _dilated_conv_probe(x: tf.Tensor, w: tf.Tensor) -> tuple:
    conv = _conv_attrs(2)
    y = tf.raw_ops.Conv2D(input=x, filter=w, **conv)
    dx = tf.raw_ops.Conv2DBackpropInput(input_sizes=tf.shape(x), filter=w, out_backprop=y, **conv)
    dw = tf.raw_ops.Conv2DBackpropFilter(input=x, filter_sizes=tf.shape(w), out_backprop=y, **conv)
    return y, dx, dw


# Input channels for which the filter gradient is computed as matrix products (`_causal_conv`),
# both ends included; None: never. Measured per convolution (batch 1024, kernel 2-8, AMD Zen 3,
# AVX2) against oneDNN's Conv2DBackpropFilter: 8-16 channels 0.99-2.7x on two threads (the
# paper's 16: median 1.3x) and 1.04-2.7x on one (a search worker's); from 17 channels on
# 0.55-0.95x on two threads (17: 0.63x, 32: 0.78-1.20x, 48-127: 0.58-0.91x); the raw signals' 5
# channels 0.89x. Where the CPU has AVX-512, oneDNN's own kernels are the faster ones: the
# paper's best trained 1.07-1.12x slower per step with the matrix products on two Intel
# (Sapphire Rapids) cores and 1.14x slower on one, the seed default 1.08x with them up to 32.
GEMM_FILTER_GRAD_CHANNELS: tuple[int, int] | None = None if "avx512f" in cpu_flags() else (8, 16)

# The gradient of `_causal_conv`: registered once per process under this fixed name, and found
# there by name by the gradient tapes it is recorded on. Not `tf.custom_gradient`: in a traced
# function that registers a new gradient function under a new name on every trace, which the
# registry keeps, with the graph it closes over, for the rest of the process (about 23 MiB per fit
# of tests/test_train.py's model).
_GEMM_GRAD = "MillvaeCausalConvGemmFilterGrad"


def _rows(m: tf.Tensor, drop_first: int, drop_last: int) -> tf.Tensor:
    """m[drop_first : len(m) - drop_last] of a matrix, as one op with constant bounds (the end
    counted from the back): the `m[a:b]` helper, with b from the batch's row count, made tracing
    the paper's model ~1 s slower."""
    end = [-drop_last, 0] if drop_last else [0, 0]
    mask = 2 if drop_last else 3  # bits of the dimensions that run to their end
    return tf.raw_ops.StridedSlice(
        input=m, begin=[drop_first, 0], end=end, strides=[1, 1], begin_mask=2, end_mask=mask
    )


def _gemm_conv_grad(op: Any, dy: tf.Tensor) -> list[tf.Tensor | None]:
    """Gradients for the inputs (x, kernel, rate) of `_causal_conv`'s recorded op, given dy.

    oneDNN computes the filter gradient of these convolutions at a quarter to a half of the
    forward pass's rate, the largest single cost of a training step (27-29 % of its op time). The
    same sums as products over all rows of the batch: with `dy` padded by `pad` zero rows at the
    end of each window, tap j's gradient is ``x_rows[j * rate:]^T @ dy_rows[:-j * rate]`` (the
    zero rows stop sums from crossing windows), and both operands are row ranges of the flattened
    tensors, which TensorFlow slices without copying. Everything comes from `op.inputs` (the
    tape's stand-in for an op) and static shapes, so the registered function holds no graph.
    """
    x, kernel, rate = op.inputs
    rate = int(tf.get_static_value(rate))
    k = int(kernel.shape[0])
    pad = (k - 1) * rate
    x4, w4 = tf.expand_dims(x, 1), tf.expand_dims(kernel, 0)
    dx = tf.raw_ops.Conv2DBackpropInput(
        input_sizes=tf.shape(x4), filter=w4, out_backprop=tf.expand_dims(dy, 1), **_conv_attrs(rate)
    )
    x_rows = tf.reshape(x, [-1, x.shape[-1]])
    dy_rows = tf.reshape(tf.pad(dy, [[0, 0], [0, pad], [0, 0]]), [-1, dy.shape[-1]])
    taps = [
        tf.matmul(_rows(x_rows, j * rate, 0), _rows(dy_rows, 0, j * rate), transpose_a=True)
        for j in range(k)
    ]
    return [tf.squeeze(dx, 1), tf.stack(taps), None]


try:
    tf.RegisterGradient(_GEMM_GRAD)(_gemm_conv_grad)
except KeyError:  # registered already: this module was reloaded
    pass


def _causal_conv(x: tf.Tensor, kernel: tf.Tensor, rate: int) -> tf.Tensor:
    """VALID dilated convolution of causally padded x[n, time + pad, in] with kernel[k, in, out],
    pad = (k - 1) * rate, as one Conv2D whose filter gradient is k matrix products.

    y is recorded on the active gradient tapes, eager or tracing, as the output of one op named
    `_GEMM_GRAD` with inputs (x, kernel, rate); a tape differentiates it with the function
    registered under that name (`_gemm_conv_grad`). A tape keeps a tensor's latest record, so
    this one replaces the Squeeze's, as `tf.custom_gradient`'s replaces its IdentityN's. Nothing
    is registered per call, and what a tape records goes with the tape.

    Symbolic gradients (`tf.gradients`; the backward function of a traced function called under
    a tape outside it) read the graph and take oneDNN's filter gradient: correct, slower. Routing
    them here with `gradient_override_map` breaks `tf.saved_model.save`, which traces the gradient
    of every overridden op without the op (``op=None``), and this gradient needs the op's inputs.
    """
    y = _conv2d(x, kernel, rate)
    tf.__internal__.record_gradient(_GEMM_GRAD, [x, kernel, tf.constant(rate)], (), [y])
    return y


def _gemm_channels(channels: int | None) -> bool:
    """Whether a convolution over this many input channels takes the matrix-product gradient."""
    if GEMM_FILTER_GRAD_CHANNELS is None or channels is None:
        return False
    low, high = GEMM_FILTER_GRAD_CHANNELS
    return low <= channels <= high


def _padded_conv(x: tf.Tensor, kernel: Any, rate: int) -> tf.Tensor:
    """The causal convolution of x[n, time + pad, in], already padded, with kernel[k, in, out]:
    one Conv2D, whose filter gradient is matrix products for `GEMM_FILTER_GRAD_CHANNELS`."""
    kernel = tf.cast(kernel, x.dtype)
    return (_causal_conv if _gemm_channels(x.shape[-1]) else _conv2d)(x, kernel, rate)


class CausalConv1D(keras.layers.Conv1D):
    """`keras.layers.Conv1D` whose causal, dilated convolution runs as one dilated Conv2D.

    Keras hands a dilated convolution to `tf.nn.convolution`, which wraps it in SpaceToBatch /
    BatchToSpace and convolves a reshuffled batch: about 20 % of the paper's model's training step
    on two CPU cores. A Conv2D with a dilation rate computes the same sums in one kernel, 1.4-3x
    faster forward and backward (`benchmarks/bench_train.py`). With input channels in
    `GEMM_FILTER_GRAD_CHANNELS`, the filter gradient is matrix products (`_causal_conv`), dilated
    or not. Same weights and names as Conv1D, so saved models load either way; falls back to
    Conv1D where the kernel is not available.
    """

    def call(self, inputs: Any) -> Any:
        rate = self.dilation_rate[0]
        gemm = _gemm_channels(inputs.shape[-1])
        if (
            self.padding != "causal"
            or (rate == 1 and not gemm)
            or tuple(self.strides) != (1,)
            or self.data_format != "channels_last"
            or not _native_dilated_conv()
        ):
            return super().call(inputs)
        x = tf.pad(inputs, self._compute_causal_padding())
        y = _padded_conv(x, self.kernel, rate)
        if self.use_bias:
            y = tf.nn.bias_add(y, tf.cast(self.bias, y.dtype))
        return y if self.activation is None else self.activation(y)


@keras.saving.register_keras_serializable(package=KERAS_PACKAGE)
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` whose training step runs TensorFlow's fused kernel.

    Keras normalises with separate ops (moments, then scale and shift), and their gradients are
    as many again: each a pass over the activations, which on two CPU cores are bound by memory
    bandwidth. `FusedBatchNormV3` computes the batch statistics and the normalised output in one
    op and its gradient in another: forward and backward of one of the seed default's layers
    (1024 windows x 64 steps x 32 channels) 9-10 ms against 20-22 ms (AMD Zen 3, two threads).
    The same normalisation (biased batch variance, the layer's epsilon) and the same update of
    the moving statistics; the kernel reports the batch variance with Bessel's correction, which
    is undone for that update. Inference (validation, scoring) runs the fused kernel on the moving
    statistics: one pass instead of Keras' four. Same weights and config as the Keras layer.
    Masks, renorm, synchronised statistics and non-float32 inputs take Keras' path.
    """

    def call(self, inputs: Any, training: bool | None = None, mask: Any = None) -> Any:
        if (
            mask is not None
            or self.renorm
            or self.synchronized
            or inputs.dtype != tf.float32
            or len(inputs.shape) != 3
            or self.axis not in (-1, 2)
            or self.epsilon < 1.001e-5  # the kernel's floor
        ):
            return super().call(inputs, training=training, mask=mask)
        channels = int(inputs.shape[-1])
        train = bool(training and self.trainable)
        empty = tf.constant([], tf.float32)
        y, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
            x=tf.expand_dims(inputs, 1),
            scale=self.gamma if self.scale else tf.ones([channels]),
            offset=self.beta if self.center else tf.zeros([channels]),
            mean=empty if train else self.moving_mean,
            variance=empty if train else self.moving_variance,
            epsilon=self.epsilon,
            exponential_avg_factor=1.0,
            data_format="NHWC",
            is_training=train,
        )
        if not train:  # normalised with the moving statistics, which stay as they are
            return tf.squeeze(y, 1)
        n = tf.cast(tf.shape(inputs)[0] * tf.shape(inputs)[1], tf.float32)
        variance = variance * tf.maximum(n - 1.0, 0.0) / n  # the biased variance, as Keras uses
        m = self._momentum_now()
        self.moving_mean.assign(self.moving_mean * m + mean * (1.0 - m))
        self.moving_variance.assign(self.moving_variance * m + variance * (1.0 - m))
        return tf.squeeze(y, 1)

    def _momentum_now(self) -> tf.Tensor:
        """The momentum of this update: min(momentum, (1 + t) / (10 + t)) after t updates.

        With a fixed 0.99 the moving statistics average the last ~100 steps and start from mean 0,
        variance 1; a short fit on the milling data (6 steps an epoch) validated and scored with
        statistics of weights long gone and of the initial values: after 3 epochs, validation
        losses of 1e8, inf and NaN where the training loss was 1.5 (issue 22). The warm-up is
        TensorFlow's `ExponentialMovingAverage(num_updates=t)` rule: the first update takes nine
        tenths of the batch statistics, and the configured momentum holds once (1 + t) / (10 + t)
        reaches it (t = 890 for 0.99). The counter is not a weight: saved models keep the Keras
        layer's weights, and a loaded model is only used for inference.
        """
        t = self.__dict__.get("_updates")
        if t is None:
            with tf.init_scope():
                t = tf.Variable(0.0, trainable=False, name="bn_updates")
            self.__dict__["_updates"] = t  # kept out of Keras' tracking: not a saved weight
        m = tf.minimum(tf.cast(self.momentum, tf.float32), (1.0 + t) / (10.0 + t))
        t.assign_add(1.0)
        return m


# The BatchNormalization the builders use (the training benchmark's plain arm swaps in Keras').
BATCH_NORM: type = FusedBatchNormalization


@contextlib.contextmanager
def tcn_conv_layers() -> Iterator[None]:
    """keras-tcn builds its convolutions from the name `tcn.tcn.Conv1D` when a TCN is first
    called; within this block that name is `CausalConv1D`.

    Two threads building models at once may see the plain Conv1D for some layers: slower layers,
    the same model.
    """
    original = tcn.tcn.Conv1D
    tcn.tcn.Conv1D = CausalConv1D
    try:
        yield
    finally:
        tcn.tcn.Conv1D = original


@keras.saving.register_keras_serializable(package=KERAS_PACKAGE, name="FusedTCN")
class FusedTCN(TCN):
    """keras-tcn's `TCN` whose residual blocks run their elementwise work as fused kernels.

    keras-tcn computes a block as conv → bias → SELU → conv → bias → SELU → SELU (the skip
    output) → + residual → SELU, each arrow a TensorFlow op and its gradient another, each a
    pass over a [windows, steps, filters] tensor; with the causal Pad before each convolution
    (and a Slice in its gradient) those passes took half of the seed default's training step.
    Here a block is two convolutions and three kernels of `model.native` (bias + SELU written
    already padded for the next convolution; bias + SELU + SELU; residual + SELU), and their
    gradients three more: 1.26x less time per training step on two Intel cores (seed default,
    1.27x the paper's best). The same layers, weights and config as `TCN`; the same sums to
    float rounding. Where the kernels are unavailable, or the TCN is not the seed's kind (SELU,
    causal, skip connections, sequences out, no dropout or normalisation), it is `TCN` itself.
    """

    def call(self, inputs: Any, training: bool | None = None, **kwargs: Any) -> Any:
        if not self._fusable(inputs):
            return super().call(inputs, training=training, **kwargs)
        groups = window_groups()
        if groups == 1:
            return self._blocks(inputs)
        # The windows in `groups` independent groups, one per inter-op thread, each op on one
        # core (see `millvae.runtime.thread_pools`). A batch of fewer windows is padded with
        # zero windows, dropped again: TensorFlow's Conv2D answers an empty group with its input.
        n = tf.shape(inputs)[0]
        m = tf.maximum(n, groups)
        size = m // groups
        parts = tf.split(
            tf.pad(inputs, [[0, m - n], [0, 0], [0, 0]]), [size] * (groups - 1) + [-1], axis=0
        )
        out = tf.concat([self._blocks(part) for part in parts], axis=0)
        return tf.split(out, [n, m - n], axis=0)[0]

    def _blocks(self, inputs: Any) -> Any:
        """The residual blocks and their skip sum on windows [n, steps, channels]."""
        blocks = self.residual_blocks
        pads = [(self.kernel_size - 1) * block.dilation_rate for block in blocks]
        x = tf.pad(inputs, [[0, 0], [pads[0], 0], [0, 0]])  # each block's input comes padded
        skips = []
        for i, block in enumerate(blocks):
            rate, pad = block.dilation_rate, pads[i]
            conv0, conv1 = [c for c in block.layers if isinstance(c, keras.layers.Conv1D)]
            h = native.bias_selu(_padded_conv(x, conv0.kernel, rate), conv0.bias, pad=pad)
            skip = native.bias_selu(_padded_conv(h, conv1.kernel, rate), conv1.bias, twice=True)
            skips.append(skip)
            if i + 1 == len(blocks):
                break  # the last block's residual output feeds nothing
            match = block.shape_match_conv
            if isinstance(match, keras.layers.Conv1D):  # the first block, 1x1 to `nb_filters`
                res = _conv2d(inputs, tf.cast(match.kernel, inputs.dtype), 1)
                x = native.add_selu(skip, res, match.bias, pad=pads[i + 1])
            else:
                x = native.add_selu(skip, x, offset=pad, pad=pads[i + 1])
        return tf.add_n(skips) if len(skips) > 1 else skips[0]

    def _fusable(self, inputs: Any) -> bool:
        shape = inputs.shape
        identity = keras.layers.Lambda  # keras-tcn's residual without a 1x1 convolution
        if not (
            len(shape) == 3
            and shape[1] is not None
            and shape[2] is not None
            and inputs.dtype == tf.float32
            and self.activation_name == "selu"
            and self.padding == "causal"
            and self.use_skip_connections
            and self.return_sequences
            and not (self.go_backwards or self.return_state)
            and not (self.use_batch_norm or self.use_layer_norm)
            and self.dropout_rate == 0.0
            and isinstance(self.nb_filters, int)
            # only the first block may need a 1x1 convolution to `nb_filters` channels
            and all(isinstance(b.shape_match_conv, identity) for b in self.residual_blocks[1:])
        ):
            return False
        return _native_dilated_conv() and native.ops() is not None


# A .keras file addresses the weights of a model's layers by their class names ("tcn"), not by
# layer names: under keras-tcn's name, models saved with either class load into the other.
FusedTCN.__name__ = "TCN"


# The TCN the builders use (the training benchmark's plain arm swaps in keras-tcn's).
TCN_LAYER: type = FusedTCN


@keras.saving.register_keras_serializable(package=KERAS_PACKAGE)
class FusedAdam(keras.optimizers.Adam):
    """Keras' Adam, each variable updated by TensorFlow's fused `ResourceApplyAdam` kernel.

    The same update as `keras.optimizers.Adam` (``m += (g - m)(1 - β1)``,
    ``v += (g² - v)(1 - β2)``, ``w -= α m / (√v + ε)`` with ``α = lr √(1 - β2^t) / (1 - β1^t)``),
    equal to float rounding. Keras writes it as about 20 graph ops per variable: tracing those for
    the paper's model's 82 variables was a third of the first epoch, and every `fit` with it left
    ~80 MiB in the process that `clear_session` and `gc` did not free (0.2 MiB with this one).
    AMSGrad, sparse gradients and non-float32 variables take Keras' path.
    """

    def _backend_update_step(self, grads: list, trainable_variables: list, learning_rate) -> None:
        if (
            self.amsgrad
            or any(isinstance(g, tf.IndexedSlices) for g in grads)
            or any(v.dtype != "float32" for v in trainable_variables)
        ):
            super()._backend_update_step(grads, trainable_variables, learning_rate)
            return
        dtype = tf.float32
        step = tf.cast(self.iterations + 1, dtype)
        beta_1 = tf.constant(self.beta_1, dtype)
        beta_2 = tf.constant(self.beta_2, dtype)
        common = dict(
            beta1_power=tf.pow(beta_1, step),
            beta2_power=tf.pow(beta_2, step),
            lr=tf.cast(learning_rate, dtype),
            beta1=beta_1,
            beta2=beta_2,
            epsilon=tf.constant(self.epsilon, dtype),
        )
        for grad, variable in zip(grads, trainable_variables, strict=True):
            if grad is None:
                continue
            index = self._get_variable_index(variable)
            tf.raw_ops.ResourceApplyAdam(
                var=variable.value.handle,
                m=self._momentums[index].value.handle,
                v=self._velocities[index].value.handle,
                grad=tf.cast(grad, dtype),
                use_locking=False,
                **common,
            )


class GraphInference:
    """Batched inference for `millvae.model.vae.BetaVAE`, one traced graph per kind and model.

    Expects of the model: `encoder`, `decoder`, `metrics`, `window_size`, `n_signals`,
    `codings_size`, `conditions`, `decoder_input`, and `_sample`, `_loss_values` and
    `_update_metrics` as `BetaVAE` has them.
    """

    def encode(self, x: Any, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """Mean and log-variance codings of windows x[n, window, signals], in batches."""
        mean, log_var = self._batched("encode", x, batch_size)
        return mean, log_var

    def forward(self, x: Any, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean, log_var, reconstruction of the mean coding) of windows x, in batches.

        One graph traced per model for any batch length, and encoder and decoder in one call:
        `predict` traced a function per sub-model and retraced for the last, shorter batch, which
        cost more than the forward pass itself on the 11k windows of the milling data. It is the
        graph `validate` runs too, so a model validated during `millvae.train.fit` is scored
        without tracing again.
        """
        mean, log_var, recon = self._batched("forward", x, batch_size)
        return mean, log_var, recon

    def validate(self, x: Any, batch_size: int = 1024) -> dict[str, float]:
        """What `evaluate` reports for windows x (sampled codings, `test_step`'s metrics), in
        batches, through the graph `forward` uses: one trace per model serves validation in every
        epoch and the scoring of all windows after training.

        Draws from the model's noise generator as `test_step` does, batch by batch, so a fit
        validated here trains and validates on the same noise as one given `validation_data`.
        """
        for m in self.metrics:
            m.reset_state()
        data = np.asarray(x, dtype=np.float32)
        fn, step, validate = self._graph("forward"), max(1, int(batch_size)), tf.constant(True)
        for i in range(0, len(data), step):
            fn(data[i : i + step], validate)  # only the metric updates are wanted
        return {m.name: float(m.result()) for m in self.metrics}

    def decode(self, codings: Any, batch_size: int = 1024) -> np.ndarray:
        """Reconstructions of codings [n, codings_size (+ conditions)], in batches."""
        (recon,) = self._batched("decode", codings, batch_size)
        return recon

    def _batched(self, kind: str, data: Any, batch_size: int) -> tuple[np.ndarray, ...]:
        data = np.asarray(data, dtype=np.float32)
        if len(data) == 0:  # convolutions refuse an empty batch
            coding = np.empty((0, self.codings_size), np.float32)
            recon = np.empty((0, self.window_size, self.n_signals), np.float32)
            return {"encode": (coding, coding), "forward": (coding, coding, recon)}.get(
                kind, (recon,)
            )
        fn, step = self._graph(kind), max(1, int(batch_size))
        flag = (tf.constant(False),) if kind == "forward" else ()  # mean coding, no validation
        parts = [fn(data[i : i + step], *flag) for i in range(0, len(data), step)]
        return tuple(
            np.concatenate([np.asarray(p[k]) for p in parts]) for k in range(len(parts[0]))
        )

    def _graph(self, kind: str):
        name = f"_{kind}_fn"
        fn = self.__dict__.get(name)
        if fn is None:
            channels = self.n_signals + self.conditions
            windows = tf.TensorSpec([None, self.window_size, channels], tf.float32)
            codings = tf.TensorSpec([None, self.codings_size + self.conditions], tf.float32)

            def encode(x):
                return tuple(self.encoder(x, training=False))

            def forward(x, validate):
                # Encoder and decoder sit outside the conds, so each is traced once for both uses;
                # so do the loss terms, for Keras' BCE to see the decoder's Sigmoid op (it scores
                # a sigmoid on its logits) as it does in `test_step`.
                mean, log_var = self.encoder(x, training=False)
                codings = tf.cond(validate, lambda: self._sample(mean, log_var), lambda: mean)
                recon = self.decoder(self.decoder_input(codings, x), training=False)
                losses = self._loss_values(x, mean, log_var, recon)

                def update() -> tf.Tensor:
                    self._update_metrics(x, losses)
                    return tf.constant(True)

                tf.cond(validate, update, lambda: tf.constant(False))
                return mean, log_var, recon

            def decode(z):
                return (self.decoder(z, training=False),)

            flag = tf.TensorSpec([], tf.bool)
            body, spec = {
                "encode": (encode, [windows]),
                "forward": (forward, [windows, flag]),
                "decode": (decode, [codings]),
            }[kind]
            fn = tf.function(body, input_signature=spec, autograph=False)
            # kept out of Keras' attribute tracking: a cache, not part of the model's state
            self.__dict__[name] = fn
        return fn


_SAVEABLE_TYPES = ("Operation", "Layer", "Functional", "Sequential", "Metric", "Optimizer", "Loss")


def warm_keras_saving() -> None:
    """Let Keras' `.keras` save and load reuse its per-type attribute skip sets.

    Keras 3.15's `saving_lib.get_attr_skipset` stores each set under `saving_attr_skipset_<type>`
    but looks it up under `saving_attr_skiplist_<type>`, so every layer, metric and optimizer
    walked builds a throw-away reference object and lists its attributes again: half the time of
    saving the β-VAE, paid twice per run (model and detector). Seeding the key it reads fixes that;
    `keras.backend.clear_session()` forgets it, so callers run this right before saving/loading.
    """
    try:
        from keras.src.backend.common import global_state
        from keras.src.saving import saving_lib

        for kind in _SAVEABLE_TYPES:
            key = f"saving_attr_skiplist_{kind}"
            if global_state.get_global_attribute(key) is None:
                global_state.set_global_attribute(key, saving_lib.get_attr_skipset(kind))
    except (ImportError, AttributeError, ValueError):  # another Keras: nothing to warm
        pass
