"""Fused TCN kernels (`millvae/csrc/tcn_ops.cc`): compiled once per machine, loaded into TensorFlow.

`millvae.model.FusedTCN` runs the elementwise work of keras-tcn's residual blocks (bias, SELU,
residual add, causal padding and their gradients) through these kernels: the seed default's
training step took 1.26x less time on two Intel cores (AVX-512), the paper's best 1.27x. The same
sums as TensorFlow's own ops; float32 results agree to rounding.

The shared library is built with the C++ compiler (``$CXX``, else ``g++``) against the installed
TensorFlow's headers on first use, about 8 s, and kept in ``<millvae cache>/ops/`` (see
`millvae.sources.default_cache_dir`) under a key of the source, TensorFlow, compiler and CPU, so
each machine builds once and concurrent processes (search workers) build it once between them.
Where it cannot be built or loaded, a one-line warning says why (once per process) and the
models run keras-tcn's own ops: slower, the same model. ``MILLVAE_NATIVE_OPS=0`` turns the kernels
off without a warning.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).resolve().parent / "csrc" / "tcn_ops.cc"
SWITCH = "MILLVAE_NATIVE_OPS"
BUILD_TIMEOUT_S = 600

_lock = threading.Lock()
_state: dict[str, Any] = {}


def enabled() -> bool:
    """Whether the kernels may be used (``MILLVAE_NATIVE_OPS`` is not 0 / false / off)."""
    return os.environ.get(SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def ops() -> Any:
    """The loaded op module (``millvae_bias_selu`` etc.), or None where the kernels are off or
    could not be built here; built and loaded on the first call of a process."""
    with _lock:
        if "ops" not in _state:
            _state["ops"], _state["why"] = _load() if enabled() else (None, "")
            if _state["ops"] is None and _state["why"]:
                print(
                    f"millvae: warning: fused TCN kernels unavailable ({_state['why']}); using "
                    f"keras-tcn's ops (slower, same model; {SWITCH}=0 silences this)",
                    file=sys.stderr,
                    flush=True,
                )
        return _state["ops"]


def unavailable_reason() -> str:
    """Why `ops()` gave None ('' where it gave the ops or was switched off)."""
    ops()
    return _state.get("why", "")


def bias_selu(x: Any, bias: Any, *, twice: bool = False, pad: int = 0) -> Any:
    """selu(x + bias) of x [n, t, c] (twice: selu(selu(x + bias))) after `pad` zero steps of each
    window: [n, t + pad, c]; `pad` is the causal padding of the convolution it feeds."""
    y, _ = ops().millvae_bias_selu(x, bias, twice=twice, pad=pad)
    return y


def add_selu(a: Any, res: Any, bias: Any = None, *, offset: int = 0, pad: int = 0) -> Any:
    """selu(res[:, offset:] (+ bias) + a) of a [n, t, c] after `pad` zero steps: [n, t + pad, c].
    `res` may be the causally padded input of a block (`offset` its padding)."""
    import tensorflow as tf

    empty = tf.zeros([0], tf.float32) if bias is None else bias
    return ops().millvae_add_selu(a, res, empty, offset=offset, pad=pad)


def _bias_selu_grad(op: Any, dy: Any, _dmid: Any) -> list:
    # mid (the inner SELU of `twice`) feeds nothing outside: its gradient is never needed
    dx, dbias = _state["ops"].millvae_bias_selu_grad(
        dy, op.outputs[0], op.outputs[1], twice=op.get_attr("twice"), pad=op.get_attr("pad")
    )
    return [dx, dbias]


def _add_selu_grad(op: Any, dy: Any) -> list:
    offset = op.get_attr("offset")
    with_bias = op.inputs[2].shape[0] != 0
    da, dres, dbias = _state["ops"].millvae_add_selu_grad(
        dy, op.outputs[0], offset=offset, pad=op.get_attr("pad"), with_bias=with_bias
    )
    # without an offset the residual's gradient is a's; with one it is a's after `offset` zeros
    return [da, dres if offset else da, dbias if with_bias else None]


def _load() -> tuple[Any, str]:
    """(op module, '') or (None, why not)."""
    try:
        import tensorflow as tf

        cxx = shutil.which(os.environ.get("CXX", "g++"))
        if cxx is None:
            return None, f"no C++ compiler: {os.environ.get('CXX', 'g++')} not found"
        flags = _machine_flags()
        cflags, lflags = tf.sysconfig.get_compile_flags(), tf.sysconfig.get_link_flags()
        key = _key(cxx, flags, cflags, lflags, tf.__version__)
        folder = _cache_dir()
        lib = folder / f"millvae_tcn_ops-{key}.so"
        failed = folder / f"millvae_tcn_ops-{key}.failed"
        with _file_lock(folder / f"millvae_tcn_ops-{key}.lock"):
            if failed.is_file():
                return None, failed.read_text().strip() or "an earlier build failed"
            if not lib.is_file():
                why, lasting = _build(cxx, flags, cflags, lflags, lib)
                if why:
                    if lasting:  # the same source will not compile next time either
                        failed.write_text(why + "\n")
                    return None, why
        module = tf.load_op_library(str(lib))
        for name, fn in (("MillvaeBiasSelu", _bias_selu_grad), ("MillvaeAddSelu", _add_selu_grad)):
            try:
                tf.RegisterGradient(name)(fn)
            except KeyError:  # registered already in this process
                pass
        return module, ""
    except Exception as exc:  # a broken toolchain or library must not stop training
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return None, f"{type(exc).__name__}: {first}"[:300]


def _build(
    cxx: str, flags: list[str], cflags: list[str], lflags: list[str], lib: Path
) -> tuple[str, bool]:
    """Compile the library into `lib` (atomically): ('', _) on success, else (a one-line reason,
    whether it is a compile error that the same inputs would repeat)."""
    tmp = lib.with_suffix(f".{os.getpid()}.tmp")
    cmd = [cxx, "-shared", "-fPIC", "-O3", "-w", *flags, *cflags, str(SOURCE), "-o", str(tmp)]
    cmd += lflags
    print("millvae: building the fused TCN kernels (once per machine) ...", file=sys.stderr)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{cxx} failed to run: {exc}", False
    if done.returncode != 0 or not tmp.is_file():
        lines = done.stderr.splitlines()
        errors = [ln for ln in lines if "error" in ln] or lines
        tmp.unlink(missing_ok=True)
        first = (errors or [""])[0].strip()[:200]
        return f"{Path(cxx).name} exited {done.returncode}: {first}", True
    os.replace(tmp, lib)
    return "", False


def _machine_flags() -> list[str]:
    """The vector instructions the kernels are built for: this CPU's AVX-512 or AVX2 + FMA (the
    SELU's exp is most of their work: AVX-512 trained the seed default 1.025x faster per step
    than AVX2 on the Intel machine), else the compiler's defaults. They are part of the build's
    key, so a cache shared by different CPUs holds one library per instruction set."""
    from millvae.runtime import cpu_flags

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    have = cpu_flags()
    flags = ["-mavx2", "-mfma"] if {"avx2", "fma"} <= have else []
    avx512 = ("avx512f", "avx512dq", "avx512bw", "avx512vl")
    if flags and set(avx512) <= have:
        flags += [f"-m{f}" for f in avx512]
    return flags


def _key(cxx: str, flags: list[str], cflags: list[str], lflags: list[str], tf_version: str) -> str:
    try:
        version = subprocess.run(
            [cxx, "--version"], capture_output=True, text=True, timeout=30
        ).stdout.splitlines()[:1]
    except (OSError, subprocess.TimeoutExpired):
        version = []
    blob = "\n".join(
        [SOURCE.read_text(), tf_version, cxx, *version, *flags, *cflags, *lflags, sys.platform]
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cache_dir() -> Path:
    from millvae.sources import default_cache_dir

    folder = default_cache_dir() / "ops"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class _file_lock:
    """An exclusive lock on a file (POSIX flock): one process builds, the others wait for it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> _file_lock:
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: builds may race, os.replace keeps the file whole
            pass
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock
