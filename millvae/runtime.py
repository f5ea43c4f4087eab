"""TensorFlow's CPU threads sized to the cores this process may use.

TensorFlow's defaults give one pool of intra-op threads per core *and* one inter-op thread per core,
so on a many-core machine many busy threads share the cores. Here: one intra-op thread per usable
core and two inter-op threads (one where the process has one core). The β-VAE's graph is a chain
of small ops, but its backward pass has independent pairs (a convolution's input and filter
gradients, the residual and skip branches); a second inter-op thread runs them side by side.
Measured in turns on the 2-core AMD EPYC (`benchmarks/bench_train.py`-style arms, 25 epochs, real
data), two inter-op threads trained 1.07x faster per epoch than one, for both the seed default and
the paper's best configuration (10-90 % of paired epochs 0.95-1.21x and 1.00-1.24x); one intra-op
thread with two inter-op threads was 0.84x. Search workers with one core each keep one inter-op
thread, so workers do not oversubscribe the cores.
"""

from __future__ import annotations

import functools
import gc
import math
import os
from pathlib import Path


def usable_cores() -> int:
    """Cores this process may run on: CPU affinity, capped by a cgroup v2 CPU quota if any."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``avx2``, ``avx512f``, ...) from /proc/cpuinfo; empty where
    unknown (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def inter_op_threads(intra: int) -> int:
    """Inter-op threads for a process with `intra` intra-op threads (see the module docstring)."""
    return min(2, max(1, intra))


def configure_threads(threads: int = 0) -> bool:
    """Intra-op threads = `threads` (0: `usable_cores()`); inter-op ones by `inter_op_threads`.

    Environment variables TF_NUM_INTRAOP_THREADS / TF_NUM_INTEROP_THREADS, when set, win. Returns
    False when TensorFlow already started its thread pools (they cannot change then).
    """
    import tensorflow as tf

    intra = int(os.environ.get("TF_NUM_INTRAOP_THREADS") or threads or usable_cores())
    inter = int(os.environ.get("TF_NUM_INTEROP_THREADS") or inter_op_threads(intra))
    try:
        if tf.config.threading.get_intra_op_parallelism_threads() != intra:
            tf.config.threading.set_intra_op_parallelism_threads(intra)
        if tf.config.threading.get_inter_op_parallelism_threads() != inter:
            tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError:  # the runtime is initialised: keep what it has
        return False
    return True


def settle_gc(full_every: int = 100) -> None:
    """Keep Python's cyclic garbage collector off the objects imports created.

    TensorFlow, Keras, MLflow and matplotlib leave about 640,000 objects behind, and every full
    collection walked them all: about 0.5 s each, two or three per search trial (measured on the
    real data, one thread). `gc.freeze()` moves what is alive now out of the collector's reach;
    call it once the heavy modules are imported. Full collections then come after `full_every`
    middle-generation ones instead of 10 (a search worker also runs one after each trial, in
    `keras.backend.clear_session`); the young generations are collected as before.
    """
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, full_every)
