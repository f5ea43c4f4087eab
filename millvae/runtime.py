"""TensorFlow's CPU threads sized to the cores this process may use.

TensorFlow's defaults give one pool of intra-op threads per core *and* one inter-op thread per core,
so on a many-core machine many busy threads share the cores. Here, on 2-4 cores: one intra-op
thread (each op runs on one core) and one inter-op thread per core, and each TCN of the β-VAE
(`millvae.model.fused.FusedTCN`) computes its windows in that many independent groups, side by side.
The TCN's convolutions and elementwise kernels are small; spread over two threads each, they
synchronised more than they gained. Measured on two Intel (Sapphire Rapids) cores against one
intra-op thread per core with two inter-op threads: 1.045x per epoch for the seed default and
1.19x for the paper's best (16 filters: the smaller the ops, the more the split pays). One core
(a search worker with `workers=2` on two): one thread of each. More than 4 cores (unmeasured):
one intra-op thread per core and two inter-op threads, as measured earlier on the 2-core AMD EPYC
(1.07x per epoch against one inter-op thread); the ops outside the TCN (BatchNormalization, the
dense layers, the optimizer) would wait on a single core there.
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


def thread_pools(cores: int) -> tuple[int, int]:
    """(intra-op, inter-op) threads for a process with `cores` cores (see the module docstring)."""
    if cores <= 1:
        return 1, 1
    if cores <= 4:
        return 1, cores
    return cores, 2


def window_groups() -> int:
    """Groups of windows a TCN computes side by side: one per inter-op thread where every op runs
    on one thread (as `thread_pools` has it on 2-4 cores), else 1."""
    import tensorflow as tf

    intra = tf.config.threading.get_intra_op_parallelism_threads()
    inter = tf.config.threading.get_inter_op_parallelism_threads()
    return inter if intra == 1 and inter > 1 else 1


def configure_threads(threads: int = 0) -> bool:
    """Thread pools by `thread_pools(threads)` (0: `usable_cores()`).

    Environment variables TF_NUM_INTRAOP_THREADS / TF_NUM_INTEROP_THREADS, when set, win. Returns
    False when TensorFlow already started its thread pools (they cannot change then).
    """
    import tensorflow as tf

    default_intra, default_inter = thread_pools(threads or usable_cores())
    intra = int(os.environ.get("TF_NUM_INTRAOP_THREADS") or default_intra)
    inter = int(os.environ.get("TF_NUM_INTEROP_THREADS") or default_inter)
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
