"""Measured peak memory of one training against `millvae.memory.estimate`, side by side.

    python benchmarks/bench_memory.py            # synthetic data, 1 epoch per configuration

Each configuration trains one epoch as its own `millvae train` process (one at a time) under
/usr/bin/time; the ratio estimate / measured should stay >= 1 (the estimate refuses, it must not
under-count) and not far above it (it must not refuse what fits).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

from millvae.config import make_config
from millvae.memory import estimate

CONFIGS = [
    [],
    ["--start_filter_no", "256"],
    ["--batch_size", "8192"],
    ["--stride", "4"],
    ["--kernel_size", "16", "--dilations", "1,2,4,8"],
]


def _estimate(argv: list[str]) -> float:
    kw = {a[2:]: b for a, b in zip(argv[::2], argv[1::2], strict=True)}
    cfg = make_config(data="synthetic", **kw)
    return estimate(cfg, n_signals=6).total_gb


def main() -> None:
    tmp = tempfile.mkdtemp(prefix="millvae-bench-memory-")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
    env.update(MILLVAE_OFFLINE="1", MILLVAE_CACHE=f"{tmp}/cache")
    print(f"{'configuration':40s} {'measured GB':>11s} {'estimate GB':>11s} {'ratio':>6s}")
    for argv in CONFIGS:
        cmd = ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "millvae", "train"]
        cmd += ["--data", "synthetic", "--epochs", "1", "--bootstrap", "10", "--quiet", *argv]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=env)
        if out.returncode != 0:
            sys.exit(out.stderr[-2000:])
        kb = int(re.findall(r"^(\d+)$", out.stderr, re.M)[-1])
        measured = kb / 1024**2
        est = _estimate(argv)
        label = " ".join(argv) or "(defaults)"
        print(f"{label:40s} {measured:11.2f} {est:11.2f} {est / measured:6.2f}", flush=True)


if __name__ == "__main__":
    main()
