"""Import TensorFlow without the native start-up lines that mean nothing to a CPU user.

TensorFlow's wheel carries CUDA support: on a machine without a GPU driver every process printed
that it found no CUDA driver, that `cuInit` failed, that oneDNN is on, and absl's "log messages
before InitializeLog" banner, several of them twice. Those written before absl's initialisation
ignore TF_CPP_MIN_LOG_LEVEL, so they can only be caught where they are written: file descriptor
2, for as long as TensorFlow loads and finds its devices. What was written then is replayed
afterwards without the known noise lines; the cuInit error is dropped only where no NVIDIA driver
is installed (with one, a failed cuInit is information).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

_NOISE = [
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"I\d{4} [\d:. ]+\d+ port\.cc:\d+\] oneDNN custom operations are on.*",
    r"I\d{4} [\d:. ]+\d+ cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine.*",
    r"E\d{4} [\d:. ]+\d+ util\.cc:\d+\] oneDNN supports DT_INT32 only on platforms with AVX-512.*",
]
_NO_DRIVER_NOISE = [
    r"E\d{4} [\d:. ]+\d+ cuda_platform\.cc:\d+\] failed call to cuInit: .*",
    r"E\d{4} [\d:. ]+\d+ cuda_(dnn|fft|blas)\.cc:\d+\] Unable to register cu\w+ factory.*",
]


def noise_pattern(driver_installed: bool | None = None) -> re.Pattern[str]:
    """The lines dropped: always `_NOISE`, and the CUDA ones where no driver is installed."""
    if driver_installed is None:
        driver_installed = os.path.exists("/proc/driver/nvidia/version")
    noise = _NOISE + ([] if driver_installed else _NO_DRIVER_NOISE)
    return re.compile("^(?:" + "|".join(noise) + ")$")


class StderrFilter:
    """Capture fd 2 between `start` and `stop`, then write what came minus the noise lines."""

    def __init__(self) -> None:
        self._file = None
        self._saved = -1

    def start(self) -> None:
        if self._file is not None or os.environ.get("MILLVAE_RAW_STDERR"):
            return
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)

    def stop(self) -> None:
        if self._file is None:
            return
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        text = self._file.read().decode(errors="replace")
        self._file.close()
        self._file = None
        noise = noise_pattern()
        kept = [line for line in text.splitlines() if line and not noise.match(line)]
        if kept:
            print("\n".join(kept), file=sys.stderr, flush=True)


def import_tensorflow() -> None:
    """Import TensorFlow and let it probe its devices with fd 2 filtered. A no-op once
    TensorFlow is loaded, or with MILLVAE_RAW_STDERR=1 (everything shown)."""
    if "tensorflow" in sys.modules or os.environ.get("MILLVAE_RAW_STDERR"):
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    captured = StderrFilter()
    captured.start()
    try:
        import tensorflow as tf

        tf.config.list_physical_devices()  # the CUDA probe (cuInit)
    finally:
        captured.stop()
