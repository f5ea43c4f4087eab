"""Fused TCN kernels (`millvae/model/csrc/tcn_ops.cc`), compiled once per machine, loaded into TF.

`millvae.model.fused.FusedTCN` runs the elementwise work of keras-tcn's residual blocks (bias, SELU,
residual add, causal padding and their gradients) through these kernels: the seed default's
training step took 1.26x less time on two Intel cores (AVX-512), the paper's best 1.27x. The same
sums as TensorFlow's own ops; float32 results agree to rounding.

The shared library is built with the C++ compiler (``$CXX``, else ``g++``) against the installed
TensorFlow's headers on first use, about 8 s, and kept in ``<millvae cache>/ops/`` (see
`default_cache_dir`) under a key of the sha256 of ``csrc/``, TensorFlow, compiler
and CPU, so each machine builds once and concurrent processes (search workers) build it once
between them. Loading a library runs its code, so a cached one is loaded only after checks: the
folder is the user's own and writable by nobody else (else the kernels are refused), and the
library is a file of the user's, writable by nobody else, whose sha256 equals the one recorded
beside it (``<name>.so.sha256``) when it was built; one that fails (tampered, truncated, foreign,
no record) is rebuilt, never loaded. Where the kernels cannot be built or loaded, a one-line
warning says why (once per process) and the models run keras-tcn's own ops: slower, the same
model. ``MILLVAE_NATIVE_OPS=0`` turns the kernels off without a warning.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from millvae.cache import default_cache_dir, file_lock

CSRC = Path(__file__).resolve().parent / "csrc"
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
        key = _key(cxx, flags, cflags, lflags, tf.__version__, _source_digest(CSRC))
        folder = _cache_dir()
        unsafe = _unsafe_folder(folder)
        if unsafe:
            return None, unsafe
        lib = folder / f"millvae_tcn_ops-{key}.so"
        failed = folder / f"millvae_tcn_ops-{key}.failed"
        with file_lock(folder / f"millvae_tcn_ops-{key}.lock"):
            if failed.is_file():
                return None, failed.read_text().strip() or "an earlier build failed"
            fd, why = _open_verified(lib)
            if fd is None:
                if why:
                    print(
                        f"millvae: warning: the cached kernel library {lib} {why}; not loading "
                        "it, rebuilding it",
                        file=sys.stderr,
                        flush=True,
                    )
                    lib.unlink()  # a failed rebuild must not leave it to be checked again
                why, lasting = _build(cxx, flags, cflags, lflags, lib)
                if why:
                    if lasting:  # the same source will not compile next time either
                        failed.write_text(why + "\n")
                    return None, why
                fd, why = _open_verified(lib)
                if fd is None:
                    return None, f"the kernel library just built in {folder} {why}"
            try:
                # load the very file that was checked (an open descriptor), not whatever the
                # path names a moment later; still under the lock, so no millvae process
                # replaces it meanwhile
                module = tf.load_op_library(_loadable_path(fd, lib))
            finally:
                os.close(fd)
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
    sources = [str(p) for p in sorted(CSRC.glob("*.cc"))]
    cmd = [cxx, "-shared", "-fPIC", "-O3", "-w", *flags, *cflags, *sources, "-o", str(tmp)]
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
    os.chmod(tmp, 0o755)  # a umask of 002 would leave it group-writable: refused when loading
    with open(tmp, "rb") as f:
        digest = _sha256_fd(f.fileno())
    record = _sidecar(lib).with_suffix(f".{os.getpid()}.tmp")
    record.write_text(f"{digest}  {lib.name}\n")
    # the record first: a crash between the two leaves a library that fails its check (rebuilt)
    os.replace(record, _sidecar(lib))
    os.replace(tmp, lib)
    return "", False


def _sidecar(lib: Path) -> Path:
    return lib.with_name(lib.name + ".sha256")


def _sha256_fd(fd: int) -> str:
    h = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, 1 << 20):
        h.update(chunk)
    return h.hexdigest()


def _open_verified(lib: Path) -> tuple[int | None, str]:
    """(an open descriptor of `lib`, '') where it is a regular file of this user's, writable by
    nobody else, whose sha256 is the one recorded beside it; else (None, what is wrong, '' where
    there is no library at all)."""
    nofollow = getattr(os, "O_NOFOLLOW", 0)  # a symlink could point anywhere
    try:
        fd = os.open(lib, os.O_RDONLY | nofollow | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None, ""
    except OSError as exc:
        return None, f"cannot be opened ({exc.strerror or exc})"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return _closed(fd, "is not a regular file")
        if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
            return _closed(fd, f"belongs to uid {st.st_uid}, not to this user")
        if st.st_mode & 0o022:
            return _closed(fd, f"is writable by other users (mode {st.st_mode & 0o777:o})")
        try:
            with open(_sidecar(lib), encoding="ascii", errors="replace") as f:
                recorded = (f.read(200).split() or [""])[0].lower()
        except FileNotFoundError:
            return _closed(fd, f"has no recorded sha256 ({_sidecar(lib).name} is missing)")
        got = _sha256_fd(fd)
        if got != recorded:
            return _closed(
                fd, f"does not match its recorded sha256 (expected {recorded[:16]}, got {got[:16]})"
            )
        return fd, ""
    except BaseException:
        os.close(fd)
        raise


def _closed(fd: int, why: str) -> tuple[None, str]:
    os.close(fd)
    return None, why


def _loadable_path(fd: int, lib: Path) -> str:
    """A path that names the open file `fd` itself where the system has one (Linux)."""
    proc = f"/proc/self/fd/{fd}"
    return proc if os.path.exists(proc) else str(lib)


def _unsafe_folder(folder: Path) -> str:
    """Why libraries in `folder` could have been written by someone else ('' where they could
    not): it must be this user's and writable by nobody else."""
    if not hasattr(os, "geteuid"):  # not POSIX: no owner and mode bits to check
        return ""
    st = folder.stat()
    if st.st_uid != os.geteuid():
        return (
            f"the kernel cache {folder} belongs to uid {st.st_uid}: expected this user's "
            f"(uid {os.geteuid()}); set MILLVAE_CACHE to a folder of yours"
        )
    if st.st_mode & 0o022:
        return (
            f"the kernel cache {folder} is writable by other users (mode {st.st_mode & 0o777:o}): "
            f"expected writable by its owner only; chmod go-w {folder}"
        )
    return ""


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


def _source_digest(folder: Path) -> str:
    """sha256 of every file of `folder` (the kernels' sources and any headers): names and bytes."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        data = path.read_bytes()
        h.update(f"{path.name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def _key(
    cxx: str,
    flags: list[str],
    cflags: list[str],
    lflags: list[str],
    tf_version: str,
    source_digest: str,
) -> str:
    try:
        version = subprocess.run(
            [cxx, "--version"], capture_output=True, text=True, timeout=30
        ).stdout.splitlines()[:1]
    except (OSError, subprocess.TimeoutExpired):
        version = []
    blob = "\n".join(
        [source_digest, tf_version, cxx, *version, *flags, *cflags, *lflags, sys.platform]
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cache_dir() -> Path:
    folder = default_cache_dir() / "ops"
    folder.parent.mkdir(parents=True, exist_ok=True)
    # the owner only: whoever can write here can choose the code this process loads
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder
