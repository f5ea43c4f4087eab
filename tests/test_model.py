"""The TCN β-VAE: shapes, the loss formula, training, seeding and the .keras round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from millvae.model.vae import CUSTOM_OBJECTS, BetaVAE, build_vae

REPO_ROOT = Path(__file__).resolve().parents[1]

SMALL = dict(
    window_size=32,
    n_signals=3,
    codings_size=4,
    conv_layers=2,
    start_filter_no=8,
    kernel_size=3,
    dilations=[1, 2],
    final_activation="sigmoid",
    beta=2.0,
    seed=7,
)


def sinusoid_windows(n: int, window_size: int, n_signals: int, seed: int) -> np.ndarray:
    """Windows of sinusoids in [0, 1]: random frequency, phase and amplitude per signal."""
    rng = np.random.default_rng(seed)
    t = np.arange(window_size)[None, :, None]
    freq = rng.uniform(0.02, 0.15, size=(n, 1, n_signals))
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1, n_signals))
    amplitude = rng.uniform(0.1, 0.45, size=(n, 1, n_signals))
    return (0.5 + amplitude * np.sin(2 * np.pi * freq * t + phase)).astype("float32")


def compiled(**overrides) -> BetaVAE:
    model = build_vae(**{**SMALL, **overrides})
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    return model


@pytest.mark.parametrize(
    ("conv_layers", "dilations", "kernel_size", "final_activation", "window_size"),
    [
        (1, [1, 2], 2, "sigmoid", 64),
        (1, [1, 2, 4, 8], 5, "selu", 64),
        (2, [1, 2, 4], 3, "sigmoid", 64),
        (2, [1, 2], 8, "selu", 32),
        (3, [1, 2, 4, 8], 2, "selu", 64),
        (3, [1, 2, 4], 4, "sigmoid", 48),
    ],
)
def test_shapes_of_reconstruction_codings_and_decoder(
    conv_layers, dilations, kernel_size, final_activation, window_size
):
    n_signals, codings_size = 5, 6
    model = build_vae(
        window_size=window_size,
        n_signals=n_signals,
        codings_size=codings_size,
        conv_layers=conv_layers,
        start_filter_no=8,
        kernel_size=kernel_size,
        dilations=dilations,
        final_activation=final_activation,
        beta=1.0,
        seed=1,
    )
    x = sinusoid_windows(7, window_size, n_signals, seed=0)

    reconstruction = model.predict(x, verbose=0)
    mean, log_var = model.encode(x)
    decoded = model.decoder.predict(mean, verbose=0)

    assert reconstruction.shape == (7, window_size, n_signals)
    assert mean.shape == log_var.shape == (7, codings_size)
    assert decoded.shape == (7, window_size, n_signals)
    assert model.decoder.get_layer("decoder_dense").units == 8 * window_size // 2**conv_layers
    if final_activation == "sigmoid":
        assert reconstruction.min() >= 0.0 and reconstruction.max() <= 1.0
    else:
        assert reconstruction.min() >= -1.7581  # SELU's lower bound, −λα


def test_call_decodes_the_mean_coding_deterministically():
    model = build_vae(**SMALL)
    x = sinusoid_windows(20, 32, 3, seed=1)

    first = model.predict(x, verbose=0)
    mean, _ = model.encode(x)

    np.testing.assert_array_equal(first, model.predict(x, verbose=0))
    np.testing.assert_allclose(first, model.decoder.predict(mean, verbose=0), atol=1e-6)


def test_forward_in_batches_matches_call_and_traces_once():
    model = build_vae(**SMALL)
    x = sinusoid_windows(37, SMALL["window_size"], SMALL["n_signals"], seed=3)
    want = np.asarray(model(x, training=False))
    want_mean, want_log_var = (np.asarray(a) for a in model.encoder(x, training=False))
    # oneDNN picks its kernels (and so the order of float sums) by batch length and CPU: traced
    # and eager results of the same weights agree to ~1e-5 on AVX2, not bit for bit
    close = dict(rtol=1e-4, atol=1e-5)
    for batch_size in (1, 8, 37, 100):
        mean, log_var, recon = model.forward(x, batch_size=batch_size)
        np.testing.assert_allclose(recon, want, **close)
        np.testing.assert_allclose(mean, want_mean, **close)
        np.testing.assert_allclose(log_var, want_log_var, **close)
    # every batch length above reused one graph: a retrace per length would cost seconds
    assert model.__dict__["_forward_fn"].experimental_get_tracing_count() == 1
    mean, log_var = model.encode(x, batch_size=10)
    np.testing.assert_allclose(mean, want_mean, **close)
    np.testing.assert_allclose(model.decode(mean, batch_size=16), want, **close)
    mean, log_var, recon = model.forward(x[:0])
    assert mean.shape == (0, SMALL["codings_size"]) and recon.shape == (0, *x.shape[1:])


def test_loss_components_follow_the_formula():
    # Pin the log-variance at −30 (σ ≈ 3e-7): the sampled coding is then the mean to float
    # precision, so the reconstruction term can be checked against predict(). Shrink the output
    # kernel too: an untrained sigmoid saturates, and Keras then scores the logits, not p.
    model = compiled(beta=3.0)
    log_var_layer = model.encoder.get_layer("codings_log_var")
    kernel, bias = log_var_layer.get_weights()
    log_var_layer.set_weights([np.zeros_like(kernel), np.full_like(bias, -30.0)])
    output_layer = model.decoder.get_layer("reconstruction")
    kernel, bias = output_layer.get_weights()
    output_layer.set_weights([kernel * 0.05, bias])
    x = sinusoid_windows(50, 32, 3, seed=2)

    result = model.evaluate(x, batch_size=50, verbose=0, return_dict=True)
    mean, log_var = model.encode(x)
    p = model.predict(x, verbose=0).astype("float64")

    kl = -0.5 * np.sum(1 + log_var - np.exp(log_var) - mean**2, axis=-1)
    bce = -np.mean(x * np.log(p) + (1 - x) * np.log(1 - p))
    accuracy = np.mean(np.round(x) == (np.round(p) > 0.5))
    np.testing.assert_allclose(log_var, -30.0)
    assert 0.01 < p.min() and p.max() < 0.99
    assert result["kl_loss"] == pytest.approx(kl.mean(), rel=1e-4)
    assert result["reconstruction_loss"] == pytest.approx(bce, rel=1e-4)
    assert result["rounded_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    expected_loss = bce + 3.0 * kl.mean() / (32 * 3)
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-4)


def test_training_on_sinusoids_lowers_the_loss():
    model = compiled()
    x = sinusoid_windows(384, 32, 3, seed=3)
    error_before = np.mean((model.predict(x, verbose=0) - x) ** 2)

    history = model.fit(x, epochs=5, batch_size=32, verbose=0).history

    error_after = np.mean((model.predict(x, verbose=0) - x) ** 2)
    assert set(history) == {"loss", "reconstruction_loss", "kl_loss", "rounded_accuracy"}
    assert history["loss"][-1] < 0.8 * history["loss"][0]
    assert history["reconstruction_loss"][-1] < history["reconstruction_loss"][0]
    assert error_after < 0.5 * error_before


def test_fit_takes_datasets_validation_and_early_stopping():
    model = compiled()
    x = sinusoid_windows(96, 32, 3, seed=4)
    train = tf.data.Dataset.from_tensor_slices(x[:64]).batch(16)
    validation = tf.data.Dataset.from_tensor_slices(x[64:]).batch(16)
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=1, restore_best_weights=True)

    history = model.fit(train, epochs=2, validation_data=validation, callbacks=[stop], verbose=0)

    expected = {"loss", "reconstruction_loss", "kl_loss", "rounded_accuracy"}
    assert set(history.history) == expected | {f"val_{k}" for k in expected}
    assert all(np.isfinite(v).all() for v in history.history.values())


def test_validate_is_evaluate_through_the_scoring_graph():
    x = sinusoid_windows(40, 32, 3, seed=8)
    keras_model, ours = compiled(), compiled()

    want = keras_model.evaluate(x, batch_size=16, return_dict=True, verbose=0)
    got = ours.validate(x, batch_size=16)

    # the same sums on the same noise, batch by batch: equal, not merely close
    assert got == want
    assert np.array_equal(ours.noise.state.numpy(), keras_model.noise.state.numpy())
    assert not np.array_equal(ours.noise.state.numpy(), compiled().noise.state.numpy())
    recon = ours.forward(x, batch_size=16)[2]
    np.testing.assert_allclose(recon, keras_model.forward(x)[2], rtol=1e-5, atol=1e-6)
    # validation and scoring ran one graph, traced once
    assert ours.__dict__["_forward_fn"].experimental_get_tracing_count() == 1


def test_fit_validated_by_callback_equals_fit_with_validation_data():
    from millvae.pipeline import validation_callback

    x = sinusoid_windows(96, 32, 3, seed=4)
    common = dict(epochs=3, batch_size=16, shuffle=False, verbose=0)

    def stop() -> keras.callbacks.EarlyStopping:
        return keras.callbacks.EarlyStopping(patience=1, restore_best_weights=True)

    plain, ours = compiled(), compiled()
    want = plain.fit(x[:64], validation_data=(x[64:],), callbacks=[stop()], **common).history
    got = ours.fit(x[:64], callbacks=[validation_callback(x[64:], 16), stop()], **common).history

    assert got == want
    assert all(np.array_equal(a, b) for a, b in zip(ours.weights, plain.weights, strict=True))


def test_same_seed_same_weights_and_same_training_run():
    x = sinusoid_windows(64, 32, 3, seed=5)

    def run(seed: int) -> tuple[list[np.ndarray], dict]:
        model = compiled(seed=seed)
        weights = model.get_weights()
        history = model.fit(x, epochs=2, batch_size=16, validation_data=(x[:16],), verbose=0)
        return weights, history.history

    weights_a, history_a = run(11)
    weights_b, history_b = run(11)
    weights_c = build_vae(**{**SMALL, "seed": 12}).get_weights()

    assert all(np.array_equal(a, b) for a, b in zip(weights_a, weights_b, strict=True))
    assert history_a == history_b
    assert not all(np.array_equal(a, c) for a, c in zip(weights_a, weights_c, strict=True))


FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import keras
    import millvae.model.vae
    from millvae.model.vae import build_vae

    saved, windows, out = sys.argv[1:4]
    model = keras.models.load_model(saved)
    x = np.load(windows)
    np.save(out + "/loaded_predictions.npy", model.predict(x, verbose=0))
    mean, log_var = model.encode(x)
    np.save(out + "/loaded_mean.npy", mean)

    fresh = build_vae(**json.loads(sys.argv[4]))
    fresh.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = fresh.fit(x, epochs=2, batch_size=16, verbose=0).history
    with open(out + "/history.json", "w") as f:
        json.dump({"type": type(model).__name__, "beta": model.beta, "history": history}, f)
    """
)


@pytest.fixture(scope="module")
def saved_and_reloaded(tmp_path_factory):
    """Fit and save here; then load it, and repeat the fit, in a fresh Python process."""
    folder = tmp_path_factory.mktemp("round_trip")
    config = {**SMALL, "final_activation": "selu", "seed": 21}
    x = sinusoid_windows(48, 32, 3, seed=6)
    model = build_vae(**config)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = model.fit(x, epochs=2, batch_size=16, verbose=0).history
    model.save(folder / "vae.keras")
    np.save(folder / "x.npy", x)

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    args = [str(folder / "vae.keras"), str(folder / "x.npy"), str(folder), json.dumps(config)]
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, *args],
        env=env,
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    other = json.loads((folder / "history.json").read_text())
    return model, x, history, folder, other


def test_saved_model_predicts_the_same_in_a_fresh_process(saved_and_reloaded):
    model, x, _, folder, other = saved_and_reloaded

    assert other["type"] == "BetaVAE" and other["beta"] == 2.0
    np.testing.assert_array_equal(
        np.load(folder / "loaded_predictions.npy"), model.predict(x, verbose=0)
    )
    np.testing.assert_array_equal(np.load(folder / "loaded_mean.npy"), model.encode(x)[0])


def test_seeded_training_is_identical_in_another_process(saved_and_reloaded):
    _, _, history, _, other = saved_and_reloaded

    assert other["history"] == history


def test_custom_objects_load_and_training_resumes(saved_and_reloaded):
    model, x, _, folder, _ = saved_and_reloaded

    loaded = keras.models.load_model(folder / "vae.keras", custom_objects=CUSTOM_OBJECTS)
    resumed = loaded.fit(x, epochs=1, batch_size=16, verbose=0).history

    assert loaded.get_config() == model.get_config()
    assert np.isfinite(resumed["loss"][0])


def test_onecycle_warms_up_anneals_and_survives_saving(tmp_path):
    from millvae.model.vae import OneCycle

    sched = OneCycle(start=1e-3, peak=1e-2, end=1e-4, warmup_steps=30, total_steps=100)
    lr = np.array([float(sched(step)) for step in range(0, 131)])
    np.testing.assert_allclose(lr[[0, 30, 100, 130]], [1e-3, 1e-2, 1e-4, 1e-4], rtol=1e-5)
    assert (np.diff(lr[:31]) > 0).all() and (np.diff(lr[30:101]) < 0).all()
    np.testing.assert_allclose(lr[65], (1e-2 + 1e-4) / 2, rtol=1e-5)  # cosine midpoint

    # the schedule is part of the compiled model: a saved model reloads with it
    model = build_vae(**SMALL)
    model.compile(optimizer=keras.optimizers.Adam(sched))
    x = sinusoid_windows(16, SMALL["window_size"], SMALL["n_signals"], seed=0)
    model.fit(x, epochs=1, batch_size=8, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    got = loaded.optimizer.learning_rate
    assert float(got) == pytest.approx(float(sched(2)))


def _plain_keras_tcn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Build TCNs as keras-tcn does: its own TCN layer, with Keras' own Conv1D."""
    import contextlib

    import millvae.model.fused

    monkeypatch.setattr(millvae.model.fused, "TCN_LAYER", millvae.model.fused.TCN)
    monkeypatch.setattr(millvae.model.fused, "tcn_conv_layers", contextlib.nullcontext)


def test_dilated_convolutions_match_keras_conv1d_without_space_to_batch(monkeypatch, tmp_path):
    import millvae.model.fused
    from millvae.model.vae import CausalConv1D

    x = tf.constant(sinusoid_windows(64, 32, 3, seed=3))
    fast = build_vae(**SMALL)
    convs = [
        layer
        for layer in fast.encoder._flatten_layers(recursive=True)
        if isinstance(layer, keras.layers.Conv1D)
    ]
    assert convs and all(isinstance(c, CausalConv1D) for c in convs)
    assert any(c.dilation_rate[0] > 1 for c in convs)

    def loss_and_gradients(model):
        @tf.function
        def step(x):
            with tf.GradientTape() as tape:
                loss = model._loss_terms(x, training=True)[0]
            return loss, tape.gradient(loss, model.trainable_weights)

        graph = step.get_concrete_function(x).graph
        loss, grads = step(x)
        ops_ = {op.type for op in graph.get_operations()}
        return float(loss), [g.numpy() for g in grads], ops_

    loss, grads, ops_ = loss_and_gradients(fast)
    assert "SpaceToBatchND" not in ops_

    _plain_keras_tcn(monkeypatch)
    plain = build_vae(**SMALL)  # same seed: same weights and noise
    assert not any(
        isinstance(layer, CausalConv1D) for layer in plain.encoder._flatten_layers(recursive=True)
    )
    ref_loss, ref_grads, ref_ops = loss_and_gradients(plain)
    assert "SpaceToBatchND" in ref_ops  # the path the fast one replaces
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        # the fused TCN kernels round their sums in another order than keras-tcn's ops, and the
        # batch statistics of BatchNormalization amplify that: near-zero entries move by ~5e-7
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=5e-6 * np.abs(r).max())

    # weights saved from a plain keras-tcn model load into the fast one, and back
    path = tmp_path / "plain.keras"
    plain.save(path)
    monkeypatch.undo()
    loaded = keras.models.load_model(path)
    assert type(loaded.encoder.get_layer("encoder_tcn_0")) is millvae.model.fused.FusedTCN
    # the same weights; the fused kernels' rounding moves a few outputs by ~3e-6
    np.testing.assert_allclose(loaded.forward(x)[2], plain.forward(x)[2], rtol=1e-5, atol=1e-5)

    # where the runtime has no dilated Conv2D kernel, the layer is Keras' Conv1D again
    monkeypatch.setattr(millvae.model.fused, "_native_dilated_conv", lambda: False)
    fallback = build_vae(**SMALL)
    assert "SpaceToBatchND" in loss_and_gradients(fallback)[2]


def _matrix_product_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """The matrix-product filter gradient for 8-16 channels, as on CPUs without AVX-512, so that
    it is tested on every machine."""
    from millvae.model import fused as mm

    monkeypatch.setattr(mm, "GEMM_FILTER_GRAD_CHANNELS", (8, 16))


def test_matrix_product_gradients_only_where_the_cpu_lacks_avx512():
    from millvae.model import fused as mm
    from millvae.runtime import cpu_flags

    if "avx512f" in cpu_flags():  # oneDNN's AVX-512 kernels measured faster
        assert mm.GEMM_FILTER_GRAD_CHANNELS is None and not mm._gemm_channels(16)
    else:
        assert mm.GEMM_FILTER_GRAD_CHANNELS == (8, 16) and mm._gemm_channels(16)
    assert not mm._gemm_channels(32) and not mm._gemm_channels(None)


@pytest.mark.parametrize(
    ("channels", "kernel_size", "rate", "batch", "gemm"),
    [
        (16, 3, 1, 5, True),
        (16, 3, 4, 7, True),
        (8, 2, 2, 1, True),
        (12, 1, 1, 3, True),
        (16, 4, 8, 2, True),
        (17, 3, 2, 2, False),  # wider: oneDNN's filter gradient measured faster
        (32, 2, 4, 3, False),
        (5, 2, 2, 2, False),
    ],
)
def test_filter_gradient_as_matrix_products_equals_keras_conv1d(
    channels, kernel_size, rate, batch, gemm, monkeypatch
):
    from millvae.model import fused as mm

    _matrix_product_gradients(monkeypatch)
    assert mm._gemm_channels(channels) == gemm
    rng = np.random.default_rng(channels + kernel_size + rate)
    x = tf.constant(rng.normal(size=(batch, 24, channels)).astype(np.float32))
    dy = tf.constant(rng.normal(size=(batch, 24, 12)).astype(np.float32))
    args = dict(filters=12, kernel_size=kernel_size, padding="causal", dilation_rate=rate)
    fast, plain = mm.CausalConv1D(**args), keras.layers.Conv1D(**args)
    fast.build(x.shape)
    plain.build(x.shape)
    plain.set_weights([w + 0.1 * rng.normal(size=w.shape) for w in fast.get_weights()])
    fast.set_weights(plain.get_weights())

    def value_and_gradients(layer, traced=True):
        def run(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x)
                loss = tf.reduce_sum(y * dy)
            return y, tape.gradient(loss, [x, *layer.trainable_weights])

        ops_ = set()
        if traced:
            run = tf.function(run)
            ops_ = {op.type for op in run.get_concrete_function(x).graph.get_operations()}
        y, grads = run(x)
        return y.numpy(), [g.numpy() for g in grads], ops_

    y, grads, ops_ = value_and_gradients(fast)
    ref_y, ref_grads, _ = value_and_gradients(plain)
    if mm._native_dilated_conv():  # else the layer is Keras' Conv1D itself
        assert ("Conv2DBackpropFilter" not in ops_) == gemm
        assert ("MatMul" in ops_) == gemm
    eager_y, eager_grads, _ = value_and_gradients(fast, traced=False)  # e.g. run_eagerly=True
    for got_y, got_grads in [(y, grads), (eager_y, eager_grads)]:
        np.testing.assert_allclose(got_y, ref_y, rtol=1e-5, atol=1e-5)
        for g, r in zip(got_grads, ref_grads, strict=True):  # input, kernel, bias
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * np.abs(r).max())


def test_matrix_product_gradient_is_registered_once_not_per_trace(monkeypatch):
    # tf.custom_gradient registered a gradient function, holding the traced graph, per trace:
    # ~23 MiB per fit that never came back (tests/test_train.py, repeated fits)
    from tensorflow.python.framework import ops as tf_ops

    from millvae.model import fused as mm

    _matrix_product_gradients(monkeypatch)

    if not mm._native_dilated_conv():
        pytest.skip("no dilated Conv2D kernel here: the layer is Keras' Conv1D")
    layer = mm.CausalConv1D(filters=4, kernel_size=3, padding="causal", dilation_rate=2)
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 16, 8)).astype(np.float32))
    layer.build(x.shape)
    before = len(tf_ops._gradient_registry.list())
    registered = []
    for _ in range(3):  # a new function each time: each traces anew

        @tf.function
        def gradients(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(layer(x) ** 2)
            return tape.gradient(loss, [x, layer.kernel])

        ops_ = {op.type for op in gradients.get_concrete_function(x).graph.get_operations()}
        assert "Conv2DBackpropFilter" not in ops_ and "MatMul" in ops_
        registered.append(len(tf_ops._gradient_registry.list()))
    assert registered == [before] * 3


def test_matrix_product_path_keeps_symbolic_gradients_and_saved_models_working(
    tmp_path, monkeypatch
):
    # symbolic gradients (tf.gradients) read the graph, so they take the Conv2D's own gradient;
    # tf.saved_model.save failed when an override map routed them to the tape's gradient function
    from millvae.model.vae import CausalConv1D

    _matrix_product_gradients(monkeypatch)

    layer = CausalConv1D(filters=4, kernel_size=3, padding="causal", dilation_rate=2)
    x = tf.constant(np.random.default_rng(1).normal(size=(2, 16, 8)).astype(np.float32))
    layer.build(x.shape)

    @tf.function
    def taped_and_symbolic(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x) ** 2)
        symbolic = tf.gradients(tf.reduce_sum(layer(x) ** 2), [x, layer.kernel.value])
        return tape.gradient(loss, [x, layer.kernel]), symbolic

    for t, s in zip(*taped_and_symbolic(x), strict=True):
        np.testing.assert_allclose(t.numpy(), s.numpy(), rtol=1e-4, atol=1e-5 * np.abs(s).max())

    module = tf.Module()
    module.layer = layer
    module.call = tf.function(layer, input_signature=[tf.TensorSpec([None, 16, 8])])
    tf.saved_model.save(module, str(tmp_path))
    loaded = tf.saved_model.load(str(tmp_path))  # kept: its variables die with it
    np.testing.assert_allclose(loaded.call(x), layer(x), rtol=1e-6)


def _applier(optimizer, variables):
    @tf.function
    def apply(grads):
        optimizer.apply_gradients(zip(grads, variables, strict=True))

    return apply


def _fit_save_load(tmp_path):
    """A small β-VAE fitted one epoch with FusedAdam, saved, and loaded back."""
    from millvae.model.vae import FusedAdam

    model = build_vae(**SMALL)
    model.compile(optimizer=FusedAdam(1e-3))
    x = sinusoid_windows(64, 32, 3, seed=1)
    model.fit(x, epochs=1, batch_size=32, verbose=0)
    model.save(tmp_path / "m.keras")
    return model, keras.models.load_model(tmp_path / "m.keras"), x


@pytest.mark.parametrize("schedule", [False, True])
def test_fused_adam_matches_keras_adam_and_saves(tmp_path, schedule):
    from millvae.model.vae import FusedAdam, OneCycle

    shapes = [(3, 8, 8), (8,), (40, 5)]
    rng = np.random.default_rng(0)
    start = [rng.standard_normal(s).astype("float32") for s in shapes]
    steps = [[rng.standard_normal(s).astype("float32") for s in shapes] for _ in range(25)]
    finals = {}
    for cls in (keras.optimizers.Adam, FusedAdam):
        rate = OneCycle(1e-3, 5e-3, 1e-4, 5, 20) if schedule else 1e-3
        variables = [keras.Variable(v) for v in start]
        optimizer = cls(rate)

        apply = _applier(optimizer, variables)
        for grads in steps:
            apply([tf.constant(g) for g in grads])
        finals[cls] = [v.numpy() for v in variables]
        assert int(optimizer.iterations.numpy()) == len(steps)
        traced = apply.get_concrete_function([tf.constant(g) for g in steps[0]])
        graph_ops = [op.type for op in traced.graph.get_operations()]
        fused = graph_ops.count("ResourceApplyAdam")
        assert fused == (len(shapes) if cls is FusedAdam else 0)
    for got, want in zip(finals[FusedAdam], finals[keras.optimizers.Adam], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    # a model compiled with it saves and loads with its optimizer state
    _, loaded, x = _fit_save_load(tmp_path)
    assert type(loaded.optimizer) is FusedAdam
    assert int(loaded.optimizer.iterations.numpy()) == 2
    loaded.fit(x, epochs=1, batch_size=32, verbose=0)
    assert int(loaded.optimizer.iterations.numpy()) == 4


def test_warmed_keras_saving_reuses_skip_sets_and_round_trips(tmp_path):
    from keras.src.backend.common import global_state
    from keras.src.saving import saving_lib

    from millvae.model.vae import warm_keras_saving

    keras.backend.clear_session()
    assert global_state.get_global_attribute("saving_attr_skiplist_Layer") is None
    warm_keras_saving()
    cached = global_state.get_global_attribute("saving_attr_skiplist_Layer")
    assert cached is not None and "build" in cached
    # what Keras reads while saving is now the cached set, not a freshly built one
    assert saving_lib.get_attr_skipset("Layer") is cached

    model, loaded, x = _fit_save_load(tmp_path)
    for got, want in zip(loaded.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(loaded.forward(x)[2], model.forward(x)[2])


ONEDNN_CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import millvae.model.vae as mm
    from tensorflow.python.util import _pywrap_util_port

    model = mm.build_vae(**json.loads(sys.argv[1]))
    model.compile(optimizer=mm.FusedAdam(1e-3))
    x = np.random.default_rng(0).random((32, 32, 3), dtype=np.float32)
    loss = model.fit(x, epochs=1, batch_size=16, verbose=0).history["loss"][0]
    print(json.dumps({"onednn": _pywrap_util_port.IsMklEnabled(),
                      "native": mm.fused._native_dilated_conv(), "loss": loss}))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("onednn", ["0", "1", None])
def test_dilated_models_train_with_onednn_on_off_or_left_to_millvae(onednn):
    # TensorFlow's own CPU kernels refuse the filter gradient of a dilated Conv2D: without oneDNN
    # the probe must say so and the layers fall back to Keras' Conv1D. Unset, millvae turns it on.
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    env.update(PYTHONPATH=str(REPO_ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    if onednn is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = onednn
    done = subprocess.run(
        [sys.executable, "-c", ONEDNN_CHILD, json.dumps(SMALL)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["onednn"] is (onednn != "0")
    assert got["native"] is got["onednn"]
    assert np.isfinite(got["loss"])


@pytest.mark.parametrize("shape", [(512, 64, 32), (7, 3, 4)])  # 7 x 3 rows: Bessel's n/(n-1) 5 %
def test_fused_batch_norm_matches_keras_batch_norm(shape):
    from millvae.model.vae import FusedBatchNormalization

    rng = np.random.default_rng(3)
    channels = shape[-1]
    weights = [
        rng.random(channels).astype("float32") + 0.5,  # gamma
        rng.standard_normal(channels).astype("float32"),  # beta
        rng.standard_normal(channels).astype("float32"),  # moving mean
        rng.random(channels).astype("float32") * 4 + 0.1,  # moving variance
    ]
    batches = [tf.constant(rng.standard_normal(shape).astype("float32") * 3 + 1) for _ in range(3)]
    results, graphs = {}, {}
    for cls in (keras.layers.BatchNormalization, FusedBatchNormalization):
        layer = cls(momentum=0.9, name="bn")
        layer.build((None, *shape[1:]))
        layer.set_weights(weights)
        if cls is FusedBatchNormalization:  # past the warm-up: the configured momentum holds
            layer.__dict__["_updates"] = tf.Variable(1e6, trainable=False)

        @tf.function(autograph=False)
        def step(x, layer=layer):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
                loss = tf.reduce_sum(tf.sin(y))
            return [y, *tape.gradient(loss, [x, layer.gamma, layer.beta])]

        outs = [[t.numpy() for t in step(x)] for x in batches]  # moving statistics move 3 times
        inference = layer(batches[0], training=False).numpy()
        results[cls] = (outs, [w.numpy() for w in layer.weights], inference)
        graphs[cls] = [
            op.type for op in step.get_concrete_function(batches[0]).graph.get_operations()
        ]
    (keras_outs, keras_w, keras_inf), (fused_outs, fused_w, fused_inf) = results.values()
    for want, got in zip(keras_outs, fused_outs, strict=True):
        for a, b in zip(want, got, strict=True):  # y, dx, dgamma, dbeta
            np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-4 * float(np.abs(a).max()))
    for a, b in zip(keras_w, fused_w, strict=True):  # gamma, beta and the moving statistics
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fused_inf, keras_inf, rtol=1e-5, atol=1e-5)
    assert "FusedBatchNormV3" in graphs[FusedBatchNormalization]
    assert "FusedBatchNormV3" not in graphs[keras.layers.BatchNormalization]


def test_models_use_the_fused_batch_norm_and_save_it(tmp_path):
    from millvae.model.vae import FusedBatchNormalization

    model = compiled()
    norms = [
        layer
        for part in (model.encoder, model.decoder)
        for layer in part.layers
        if "batch_norm" in layer.name
    ]
    assert len(norms) == 2 * SMALL["conv_layers"]
    assert all(type(layer) is FusedBatchNormalization for layer in norms)
    x = sinusoid_windows(64, SMALL["window_size"], SMALL["n_signals"], seed=1)
    model.fit(x, epochs=1, batch_size=32, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.encoder.get_layer("encoder_batch_norm_0")) is FusedBatchNormalization
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_fused_batch_norm_warms_up_its_moving_statistics():
    """The first updates follow the batch statistics (TensorFlow's EMA num_updates rule), so a
    model validated after a few steps is not normalised by the initial mean 0 / variance 1."""
    from millvae.model.vae import FusedBatchNormalization

    layer = FusedBatchNormalization(momentum=0.99, name="bn")
    layer.build((None, 16, 4))
    x = tf.constant(np.random.default_rng(0).normal(50.0, 10.0, (64, 16, 4)).astype("float32"))
    means = []
    for _ in range(3):
        layer(x, training=True)
        means.append(layer.moving_mean.numpy().mean())
    # momentum 1/10, 2/11, 3/12 in the first three updates; a fixed 0.99 would give 1 %, 2 %, 3 %
    mu = float(x.numpy().mean())
    kept = np.cumprod([1 / 10, 2 / 11, 3 / 12])
    np.testing.assert_allclose(means, mu * (1 - kept), rtol=1e-4)
