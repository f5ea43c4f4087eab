"""millvae: tool-wear detection on the UC Berkeley milling data with a TCN β-VAE in MLflow."""

import os
import sys

__version__ = "0.1.0"

# TensorFlow turns oneDNN on by itself only on x86 CPUs with AVX-512 VNNI / BF16 or AMX. Without it
# (AMD Zen 3, older Intel), its own kernels cannot run the filter gradient of a dilated Conv2D
# (`millvae.model.fused.CausalConv1D` then falls back to Keras' slower Conv1D path), and plain
# `model.fit` of the paper's β-VAE ran 1.5x slower on AMD Zen 3 (`benchmarks/bench_train.py`). The
# switch is read once, when TensorFlow loads: set it before that, never over the user's choice.
if "tensorflow" not in sys.modules:
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

# Where the shared real-data folder lies relative to a checkout (tests and benchmarks only).
SIGNAL_NAMES = ("smcAC", "smcDC", "vib_table", "vib_spindle", "AE_table", "AE_spindle")
META_FIELDS = ("case", "run", "VB", "time", "DOC", "feed", "material")
SAMPLES_PER_CUT = 9000
SAMPLE_RATE_HZ = 250
