"""How much memory a training configuration needs, estimated before any data is loaded.

A size parameter can exhaust the machine (kernel_size=100000 grew to 23 GB before the kernel's
out-of-memory killer ended it, its run left RUNNING), so `config.validate` refuses a configuration
whose estimate exceeds `max_memory_gb` (default: the memory this process may use). The estimate is
arithmetic over the model's shapes, calibrated against measured peak resident memory
(docs/memory.md); it errs high rather than low.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class Shapes(Protocol):
    """What the estimate reads of a configuration (a `config.TrainConfig` has it all); duck-typed
    so that this module needs no import of `config`, which imports it."""

    window_size: int
    stride: int
    conv_layers: int
    start_filter_no: int
    kernel_size: int
    dilations: tuple[int, ...]
    codings_size: int
    batch_size: int


# The UC Berkeley mill.mat: 167 records of 9000 samples. A data file's real size is only known
# once it is read; the estimate assumes this one (the synthetic simulator writes the same shape).
RECORDS = 167
RECORD_SAMPLES = 9000
# TensorFlow, Keras and MLflow imported and warmed: measured ~1.1 GB resident before any model
BASE_GB = 1.2
# per convolution of a residual block in training: its padded input, conv output, activation and
# the gradients of each: measured peaks fit about 3 float32 tensors of batch x steps x filters
TENSORS_PER_CONV = 3
# weights, their gradient and Adam's two moments
BYTES_PER_PARAM = 16
GB = 1024**3


@dataclass(frozen=True)
class Estimate:
    weights_gb: float
    activations_gb: float
    data_gb: float

    @property
    def total_gb(self) -> float:
        return BASE_GB + self.weights_gb + self.activations_gb + self.data_gb


def _tcn_params(c_in: int, filters: int, kernel: int, n_dilations: int) -> int:
    conv = kernel * filters * filters + filters
    first = kernel * c_in * filters + filters + (c_in * filters + filters if c_in != filters else 0)
    return first + conv + (n_dilations - 1) * 2 * conv


def estimate(cfg: Shapes, n_signals: int = 6) -> Estimate:
    """Peak training memory of one run of `cfg`, in GB (see the module docstring)."""
    window_size, stride, conv_layers = cfg.window_size, cfg.stride, cfg.conv_layers
    filters, kernel_size, dilations = cfg.start_filter_no, cfg.kernel_size, cfg.dilations
    codings_size, batch_size = cfg.codings_size, cfg.batch_size
    nd = len(dilations)
    steps = window_size // 2**conv_layers
    params = 0
    for i in range(conv_layers):  # encoder, then decoder
        params += _tcn_params(n_signals if i == 0 else filters, filters, kernel_size, nd)
        params += _tcn_params(filters, filters, kernel_size, nd)
    params += 2 * (filters * steps * codings_size + codings_size)  # codings mean, log var
    params += codings_size * filters * steps + filters * steps  # decoder dense
    params += kernel_size * filters * n_signals + n_signals  # reconstruction
    # each TCN layer runs at its own length (halved by every pooling, doubled by every upsampling)
    lengths = [window_size // 2**i for i in range(conv_layers)]
    lengths += [steps * 2 ** (i + 1) for i in range(conv_layers)]
    pad = (kernel_size - 1) * max(dilations)
    conv_steps = sum((n + pad) * 2 * nd for n in lengths)
    act = batch_size * conv_steps * filters * TENSORS_PER_CONV * 4
    act += batch_size * (codings_size * 6 + window_size * n_signals * 6) * 4
    windows = RECORDS * max(1, (RECORD_SAMPLES - window_size) // stride + 1)
    # the windows of every split, scaled once, plus a reconstruction of the scored ones
    data = windows * window_size * n_signals * 4 * 3
    return Estimate(params * BYTES_PER_PARAM / GB, act / GB, data / GB)


def available_gb() -> float:
    """Memory this process may use: the machine's, capped by a cgroup v2 memory limit if any."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            total = min(total, int(limit))
    except (OSError, ValueError):
        pass
    return total / GB
