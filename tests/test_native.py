"""The fused TCN kernels (model/native.py): TensorFlow's sums, keras-tcn's TCN, a fallback."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from tcn import TCN

from millvae.model.fused import FusedTCN, _native_dilated_conv, native
from millvae.model.vae import build_vae

from .test_model import SMALL

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kernels():
    if not native.enabled():
        pytest.skip("MILLVAE_NATIVE_OPS=0 in this environment")
    ops = native.ops()
    # CI's machine has g++ and TensorFlow's headers: a build failure there is a defect to see
    assert ops is not None, native.unavailable_reason()
    return ops


def _rng_tensor(rng, shape, scale=2.0):
    return tf.constant((rng.standard_normal(shape) * scale).astype(np.float32))


def _reference_bias_selu(x, bias, twice, pad):
    y = tf.nn.selu(tf.nn.bias_add(x, bias))
    if twice:
        y = tf.nn.selu(y)
    return tf.pad(y, [[0, 0], [pad, 0], [0, 0]])


def _reference_add_selu(a, res, bias, offset, pad):
    r = res[:, offset:, :]
    if bias is not None:
        r = tf.nn.bias_add(r, bias)
    return tf.pad(tf.nn.selu(r + a), [[0, 0], [pad, 0], [0, 0]])


def _values_and_gradients(fn, inputs, dy):
    with tf.GradientTape() as tape:
        for t in inputs:
            tape.watch(t)
        y = fn(*inputs)
        loss = tf.reduce_sum(y * dy)
    return y, tape.gradient(loss, inputs)


@pytest.mark.parametrize(
    ("shape", "twice", "pad"),
    [((4, 16, 8), False, 0), ((4, 16, 8), False, 3), ((3, 64, 32), True, 0), ((1, 1, 1), True, 2)],
)
def test_bias_selu_and_its_gradient_equal_tensorflows_ops(kernels, shape, twice, pad):
    rng = np.random.default_rng(sum(shape) + pad)
    x, bias = _rng_tensor(rng, shape), _rng_tensor(rng, shape[-1:])
    dy = _rng_tensor(rng, (shape[0], shape[1] + pad, shape[2]))
    got, (gx, gb) = _values_and_gradients(
        lambda x, b: native.bias_selu(x, b, twice=twice, pad=pad), [x, bias], dy
    )
    want, (wx, wb) = _values_and_gradients(
        lambda x, b: _reference_bias_selu(x, b, twice, pad), [x, bias], dy
    )
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert not np.any(got[:, :pad, :])  # the causal padding is zeros
    np.testing.assert_allclose(gx, wx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gb, wb, rtol=1e-5, atol=1e-5 * float(np.abs(wb).max()))


@pytest.mark.parametrize(
    ("offset", "pad", "with_bias"), [(0, 0, False), (0, 2, True), (3, 0, False), (4, 8, False)]
)
def test_add_selu_and_its_gradient_equal_tensorflows_ops(kernels, offset, pad, with_bias):
    rng = np.random.default_rng(offset * 10 + pad)
    n, t, c = 5, 24, 16
    a, res = _rng_tensor(rng, (n, t, c)), _rng_tensor(rng, (n, t + offset, c))
    bias = _rng_tensor(rng, (c,)) if with_bias else None
    dy = _rng_tensor(rng, (n, t + pad, c))
    inputs = [a, res] + ([bias] if with_bias else [])
    got, got_grads = _values_and_gradients(
        lambda a, r, *b: native.add_selu(a, r, *b, offset=offset, pad=pad), inputs, dy
    )
    want, want_grads = _values_and_gradients(
        lambda a, r, *b: _reference_add_selu(a, r, b[0] if b else None, offset, pad), inputs, dy
    )
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):  # a, res (zeros where skipped), bias
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(np.abs(w).max()))


def test_kernels_refuse_mismatched_shapes(kernels):
    x = tf.zeros([2, 8, 4])
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="bias"):
        native.bias_selu(x, tf.zeros([3]))
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
        native.add_selu(x, tf.zeros([2, 8, 4]), offset=2)  # res must be [n, t + offset, c]


def _traced_layer(layer, x, dy):
    """(output, gradients of sum(output * dy) for x and every weight) from one tf.function, and
    the op types of its graph."""

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * dy)
        return y, tape.gradient(loss, [x, *layer.trainable_weights])

    graph = step.get_concrete_function(x).graph
    return step(x), {op.type for op in graph.get_operations()}


def _tcn_pair(cls_args: dict, n_in: int):
    """keras-tcn's TCN and a FusedTCN with the same weights."""
    plain, fused = TCN(**cls_args), FusedTCN(**cls_args)
    for layer in (plain, fused):
        layer.build((None, 32, n_in))
    rng = np.random.default_rng(0)
    plain.set_weights([w + 0.05 * rng.standard_normal(w.shape) for w in plain.get_weights()])
    fused.set_weights(plain.get_weights())
    return plain, fused


@pytest.mark.parametrize(
    ("n_in", "filters", "kernel_size", "dilations", "gemm"),
    [
        (5, 32, 2, [1, 2, 4], False),  # the seed default's encoder
        (16, 16, 3, [1, 2, 4, 8], False),  # the paper's best
        (16, 16, 3, [1, 2, 4, 8], True),  # the same with matrix-product filter gradients
        (8, 8, 5, [1], True),
        (3, 12, 2, [1, 2], False),
    ],
)
def test_fused_tcn_equals_keras_tcn_values_and_gradients(
    kernels, n_in, filters, kernel_size, dilations, gemm, monkeypatch
):
    import millvae.model.fused

    if not _native_dilated_conv():
        pytest.skip("no dilated Conv2D kernel here: FusedTCN is keras-tcn's TCN")
    monkeypatch.setattr(millvae.model.fused, "GEMM_FILTER_GRAD_CHANNELS", (8, 16) if gemm else None)
    args = dict(
        nb_filters=filters,
        kernel_size=kernel_size,
        dilations=dilations,
        padding="causal",
        use_skip_connections=True,
        return_sequences=True,
        activation="selu",
        kernel_initializer="he_normal",
    )
    plain, fused = _tcn_pair(args, n_in)
    rng = np.random.default_rng(1)
    x = _rng_tensor(rng, (6, 32, n_in), scale=1.0)
    dy = _rng_tensor(rng, (6, 32, filters))

    (y, grads), fused_ops = _traced_layer(fused, x, dy)
    (want_y, want_grads), plain_ops = _traced_layer(plain, x, dy)
    assert "MillvaeBiasSelu" in fused_ops and "Selu" not in fused_ops
    assert ("MatMul" in fused_ops) == gemm
    assert "Selu" in plain_ops
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads, want_grads, strict=True):  # input, then every kernel and bias
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(np.abs(w).max()))


@pytest.mark.parametrize("groups", [2, 3])
def test_windows_in_groups_give_the_same_values_and_gradients(kernels, monkeypatch, groups):
    # on 2-4 cores each TCN computes its windows in groups side by side; batches smaller than
    # the number of groups (a single window scored) must work too
    import millvae.model.fused

    layer = FusedTCN(
        nb_filters=8, kernel_size=3, dilations=[1, 2], return_sequences=True, activation="selu"
    )
    layer.build((None, 16, 3))
    rng = np.random.default_rng(groups)

    for n in (1, 2, 5, 64):
        x, dy = _rng_tensor(rng, (n, 16, 3)), _rng_tensor(rng, (n, 16, 8))
        monkeypatch.setattr(millvae.model.fused, "window_groups", lambda: 1)
        (want_y, want_grads), _ = _traced_layer(layer, x, dy)
        monkeypatch.setattr(millvae.model.fused, "window_groups", lambda: groups)
        (y, grads), graph_ops = _traced_layer(layer, x, dy)
        assert "SplitV" in graph_ops  # the windows went in groups
        assert y.shape == want_y.shape == (n, 16, 8)
        np.testing.assert_allclose(y, want_y, rtol=1e-6, atol=1e-6)
        for g, w in zip(grads, want_grads, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(np.abs(w).max()))


def test_tcns_outside_the_seeds_kind_run_keras_tcn():
    # dropout, another activation or no skip connections: the plain layer's own path
    for args in (dict(activation="relu"), dict(dropout_rate=0.1), dict(use_skip_connections=False)):
        layer = FusedTCN(
            nb_filters=8, kernel_size=2, dilations=[1, 2], return_sequences=True, **args
        )
        x = tf.zeros([2, 16, 3])
        graph = tf.function(layer).get_concrete_function(x).graph
        assert "MillvaeBiasSelu" not in {op.type for op in graph.get_operations()}


def test_models_are_built_with_fused_tcns_and_save_them(tmp_path):
    model = build_vae(**{**SMALL, "final_activation": "selu"})
    tcns = [layer for part in (model.encoder, model.decoder) for layer in part.layers]
    tcns = [layer for layer in tcns if "tcn" in layer.name]
    assert len(tcns) == 4 and all(type(layer) is FusedTCN for layer in tcns)
    x = np.random.default_rng(2).random((8, 32, 3)).astype("float32")
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert type(loaded.encoder.get_layer("encoder_tcn_0")) is FusedTCN
    np.testing.assert_allclose(loaded.forward(x)[2], model.forward(x)[2], rtol=1e-6, atol=1e-6)


CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np
    import tensorflow as tf
    from millvae.model import native
    from millvae.model.vae import build_vae
    if len(sys.argv) > 1:  # another copy of the kernels' sources
        native.CSRC = Path(sys.argv[1])
    model = build_vae(window_size=16, n_signals=2, codings_size=3, conv_layers=1,
                      start_filter_no=8, kernel_size=2, dilations=[1, 2],
                      final_activation="sigmoid", beta=1.0, seed=1)
    x = np.random.default_rng(0).random((4, 16, 2)).astype("float32")
    out = model.forward(x)[2]
    agree = None
    if native.ops() is not None:  # a kernel's values against TensorFlow's own ops
        v = tf.constant(np.linspace(-3, 3, 24, dtype="float32").reshape(1, 8, 3))
        b = tf.constant([0.5, -0.25, 0.125])
        agree = bool(np.allclose(native.bias_selu(v, b), tf.nn.selu(v + b), atol=1e-6))
    print(json.dumps({"ops": native.ops() is not None, "why": native.unavailable_reason(),
                      "finite": bool(np.isfinite(out).all()), "sum": float(out.sum()),
                      "agree": agree}))
    """
)


def _child(env_update: dict, *, cache: Path, args: tuple[str, ...] = ()) -> tuple[dict, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.update(MILLVAE_CACHE=str(cache), **env_update)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.slow
def test_without_a_compiler_models_run_keras_tcn_and_say_why_once(tmp_path, kernels):
    got, err = _child({"CXX": str(tmp_path / "no-such-compiler")}, cache=tmp_path / "cache")
    assert got["ops"] is False and "no C++ compiler" in got["why"]
    assert got["finite"]
    assert err.count("fused TCN kernels unavailable") == 1
    off, err_off = _child({native.SWITCH: "0"}, cache=tmp_path / "cache")
    assert off["ops"] is False and off["why"] == "" and "unavailable" not in err_off
    assert off["sum"] == pytest.approx(got["sum"], rel=1e-6)  # the same model either way


@pytest.mark.slow
def test_concurrent_processes_build_the_kernels_once(tmp_path, kernels):
    # two search workers starting on a fresh machine: one builds, the other waits and loads it
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    env["MILLVAE_CACHE"] = str(cache)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    results = [json.loads(o.decode().strip().splitlines()[-1]) for o, _ in outs]
    assert all(r["ops"] for r in results)
    assert results[0]["sum"] == results[1]["sum"]
    assert sum(e.decode().count("building the fused TCN kernels") for _, e in outs) == 1
    (lib,) = (cache / "ops").glob("*.so")
    assert _recorded(lib) == _sha256(lib)
    assert not list((cache / "ops").glob("*.tmp"))
    assert (cache / "ops").stat().st_mode & 0o777 == 0o700


BUILDING = "building the fused TCN kernels"
CSRC = Path(native.__file__).resolve().parent / "csrc"
# A library that is no kernel library: loading it runs its constructor, which leaves a file
# behind. A cache holding it in place of the kernels shows whether it was loaded.
FOREIGN = textwrap.dedent(
    """
    #include <cstdio>
    #include <cstdlib>
    __attribute__((constructor)) static void planted() {
        if (const char* path = std::getenv("MILLVAE_TEST_MARKER")) {
            if (FILE* f = std::fopen(path, "w")) { std::fputs("loaded", f); std::fclose(f); }
        }
    }
    """
)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _recorded(lib: Path) -> str:
    return lib.with_name(lib.name + ".sha256").read_text().split()[0]


def _cached_copy(tmp_path: Path) -> tuple[Path, Path]:
    """(a cache folder, its library): a copy of this process's cache (the `kernels` fixture's
    build), as a child process with MILLVAE_CACHE set to it finds it, under the same key."""
    cache = tmp_path / "cache"
    (cache / "ops").mkdir(parents=True, mode=0o700)
    for f in native._cache_dir().glob("millvae_tcn_ops-*.so*"):
        shutil.copy2(f, cache / "ops" / f.name)
    (lib,) = (cache / "ops").glob("*.so")
    return cache, lib


def _foreign_library(tmp_path: Path) -> Path:
    src, lib = tmp_path / "foreign.cc", tmp_path / "foreign.so"
    src.write_text(FOREIGN)
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    subprocess.run([cxx, "-shared", "-fPIC", str(src), "-o", str(lib)], check=True, timeout=120)
    # the planted code does run when the library is loaded: the test below is not vacuous
    marker = tmp_path / "marker-check"
    env = {**os.environ, "MILLVAE_TEST_MARKER": str(marker)}
    code = "import ctypes, sys; ctypes.CDLL(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(lib)], env=env, check=True, timeout=60)
    assert marker.read_text() == "loaded"
    return lib


def _assert_rebuilt_and_working(got: dict, err: str, cache: Path, lib: Path) -> None:
    assert err.count(BUILDING) == 1, err[-2000:]
    assert got["ops"] and got["agree"] and got["finite"], got
    assert list((cache / "ops").glob("*.so")) == [lib]  # the same key: rebuilt in its place
    assert _recorded(lib) == _sha256(lib)


@pytest.mark.slow
def test_a_tampered_library_is_rebuilt_not_loaded(tmp_path, kernels):
    cache, lib = _cached_copy(tmp_path)
    size = lib.stat().st_size
    with open(lib, "r+b") as f:  # 64 bytes overwritten in place, mid-file
        f.seek(size // 2)
        f.write(b"\xcc" * 64)
    tampered = _sha256(lib)
    got, err = _child({}, cache=cache)
    assert "does not match its recorded sha256" in err and "not loading it" in err
    _assert_rebuilt_and_working(got, err, cache, lib)
    assert _sha256(lib) != tampered


@pytest.mark.slow
def test_a_foreign_library_in_the_cache_is_never_loaded(tmp_path, kernels):
    cache, lib = _cached_copy(tmp_path)
    shutil.copy(_foreign_library(tmp_path), lib)
    marker = tmp_path / "marker"
    got, err = _child({"MILLVAE_TEST_MARKER": str(marker)}, cache=cache)
    assert not marker.exists(), "the foreign library was loaded"
    assert "does not match its recorded sha256" in err
    _assert_rebuilt_and_working(got, err, cache, lib)


@pytest.mark.slow
def test_a_library_without_its_recorded_sha256_is_rebuilt(tmp_path, kernels):
    # e.g. one built by an older millvae, or a copy of the library alone
    cache, lib = _cached_copy(tmp_path)
    lib.with_name(lib.name + ".sha256").unlink(missing_ok=True)
    got, err = _child({}, cache=cache)
    assert "has no recorded sha256" in err
    _assert_rebuilt_and_working(got, err, cache, lib)


@pytest.mark.slow
def test_a_changed_source_gets_a_new_key_and_its_own_build(tmp_path, kernels):
    cache, old = _cached_copy(tmp_path)
    csrc = tmp_path / "csrc"
    shutil.copytree(CSRC, csrc)
    source = csrc / "tcn_ops.cc"
    source.write_text(source.read_text() + "\n// a changed source\n")
    got, err = _child({}, cache=cache, args=(str(csrc),))
    assert err.count(BUILDING) == 1, err[-2000:]
    assert got["ops"] and got["agree"], got
    libs = sorted((cache / "ops").glob("*.so"))
    assert len(libs) == 2 and old in libs
    (new,) = set(libs) - {old}
    assert _recorded(new) == _sha256(new) and _recorded(old) == _sha256(old)


@pytest.mark.slow
@pytest.mark.bad_input
def test_a_kernel_cache_writable_by_other_users_is_refused(tmp_path, kernels):
    # there a stranger can plant a library and its matching record: neither can be trusted
    cache, lib = _cached_copy(tmp_path)
    shutil.copy(_foreign_library(tmp_path), lib)
    lib.with_name(lib.name + ".sha256").write_text(f"{_sha256(lib)}  {lib.name}\n")
    os.chmod(cache / "ops", 0o777)
    marker = tmp_path / "marker"
    got, err = _child({"MILLVAE_TEST_MARKER": str(marker)}, cache=cache)
    assert not marker.exists(), "a library from a cache writable by others was loaded"
    assert got["ops"] is False and got["finite"]  # keras-tcn's ops instead
    assert "writable by other users" in got["why"] and f"chmod go-w {cache / 'ops'}" in got["why"]
    assert err.count("fused TCN kernels unavailable") == 1
    assert BUILDING not in err


def test_the_source_digest_covers_every_file_of_the_sources(tmp_path):
    csrc = tmp_path / "csrc"
    shutil.copytree(CSRC, csrc)
    digests = [native._source_digest(csrc)]
    assert digests[0] == native._source_digest(CSRC)
    source = csrc / "tcn_ops.cc"
    text = source.read_text()
    source.write_text(text.replace(";", " ;", 1))  # one byte more
    digests.append(native._source_digest(csrc))
    source.write_text(text)
    (csrc / "tcn_ops.h").write_text("#pragma once\n")  # a header joins them
    digests.append(native._source_digest(csrc))
    (csrc / "tcn_ops.h").rename(csrc / "other.h")  # the same bytes under another name
    digests.append(native._source_digest(csrc))
    assert len(set(digests)) == 4


def test_only_an_unaltered_private_library_passes_its_check(tmp_path):
    lib = tmp_path / "millvae_tcn_ops-k.so"
    record = tmp_path / "millvae_tcn_ops-k.so.sha256"
    lib.write_bytes(b"\x7fELF" + bytes(range(256)) * 8)
    os.chmod(lib, 0o755)
    assert native._open_verified(tmp_path / "absent.so") == (None, "")
    assert native._open_verified(lib)[1].startswith("has no recorded sha256")
    record.write_text(f"{_sha256(lib)}  {lib.name}\n")
    fd, why = native._open_verified(lib)
    assert fd is not None and why == ""
    os.close(fd)
    os.chmod(lib, 0o775)
    assert native._open_verified(lib)[1] == "is writable by other users (mode 775)"
    os.chmod(lib, 0o755)
    with open(lib, "ab") as f:
        f.write(b"\0")
    assert "does not match its recorded sha256" in native._open_verified(lib)[1]
    link = tmp_path / "millvae_tcn_ops-l.so"
    link.symlink_to(lib)
    tmp_path.joinpath(link.name + ".sha256").write_text(_sha256(lib))
    assert native._open_verified(link)[1].startswith("cannot be opened")
