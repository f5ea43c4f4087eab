"""Thread pools sized by `millvae.runtime.configure_threads`, each case in a fresh process (the
pools of a process are fixed once TensorFlow runs its first op)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import sys
from millvae.runtime import configure_threads, window_groups
import tensorflow as tf
ok = configure_threads(int(sys.argv[1]))
t = tf.config.threading
print(ok, t.get_intra_op_parallelism_threads(), t.get_inter_op_parallelism_threads(),
      window_groups())
"""


def _pools(threads: int, **env: str) -> str:
    child = {k: v for k, v in os.environ.items() if not k.startswith("TF_NUM_")}
    child.update(env, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(threads)],
        capture_output=True,
        text=True,
        env=child,
        timeout=300,
        check=True,
    )
    return out.stdout.split("\n")[-2]


@pytest.mark.parametrize(
    ("threads", "env", "expected"),
    [
        (1, {}, "True 1 1 1"),  # a search worker's single core: no second inter-op thread
        (2, {}, "True 1 2 2"),  # each op on one core, the TCN's windows in two groups
        (4, {}, "True 1 4 4"),
        (8, {}, "True 8 2 1"),  # many cores: ops spread over them, one group
        (2, {"TF_NUM_INTEROP_THREADS": "1"}, "True 1 1 1"),  # the user's setting wins
        (2, {"TF_NUM_INTRAOP_THREADS": "2"}, "True 2 2 1"),
    ],
)
def test_thread_pools_follow_the_cores_given(threads, env, expected):
    assert _pools(threads, **env) == expected
