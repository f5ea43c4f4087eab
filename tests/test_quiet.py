"""What a CPU user sees on stderr: no CUDA or oneDNN start-up noise, everything else kept."""

from __future__ import annotations

import subprocess
import sys

import pytest

from millvae.quiet import noise_pattern

NOISE = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796605538.628297   15813 port.cc:153] oneDNN custom operations are on. "
    "You may see slightly different numerical results",
    "I0000 00:00:1796605538.629307   15813 cudart_stub.cc:31] Could not find cuda drivers on "
    "your machine, GPU will not be used.",
    "E0000 00:00:1796605545.381476   15813 cuda_platform.cc:52] failed call to cuInit: INTERNAL: "
    "CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
    "E0000 00:00:1796605554.678242   15813 util.cc:131] oneDNN supports DT_INT32 only on platforms "
    "with AVX-512. Falling back to the default Eigen-based implementation if present.",
]


def test_the_noise_lines_are_dropped_and_other_lines_kept():
    noise = noise_pattern(driver_installed=False)
    assert all(noise.match(line) for line in NOISE)
    kept = [
        "E0000 00:00:1796605545.381476   15813 op_kernel.cc:1] OOM when allocating tensor",
        "millvae: error: beta: expected a number >= 0; got -1",
        "Traceback (most recent call last):",
    ]
    assert not any(noise.match(line) for line in kept)
    # with an NVIDIA driver installed a failed cuInit is information
    assert not noise_pattern(driver_installed=True).match(NOISE[3])


def test_the_filter_replays_what_is_not_noise():
    code = (
        "import os, sys\n"
        "from millvae.quiet import StderrFilter\n"
        "f = StderrFilter(); f.start()\n"
        f"os.write(2, {(NOISE[0] + chr(10)).encode()!r})\n"
        "os.write(2, b'a real error\\n')\n"
        "print('a python warning', file=sys.stderr)\n"
        "f.stop()\n"
        "print('after', file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == ["a real error", "a python warning", "after"]


@pytest.mark.slow
def test_a_training_prints_no_start_up_noise(tracking, synthetic_mat):
    cmd = [sys.executable, "-m", "millvae", "train", "--data", str(synthetic_mat)]
    cmd += ["--epochs", "1", "--codings_size", "4", "--start_filter_no", "8", "--bootstrap", "10"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for marker in ("cuInit", "cudart_stub", "absl::InitializeLog", "DT_INT32", "shuffle=True"):
        assert marker not in out.stderr, out.stderr[-3000:]
