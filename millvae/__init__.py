"""millvae: tool-wear detection on the UC Berkeley milling data with a TCN β-VAE in MLflow."""

__version__ = "0.1.0"

# Where the shared real-data folder lies relative to a checkout (tests and benchmarks only).
SIGNAL_NAMES = ("smcAC", "smcDC", "vib_table", "vib_spindle", "AE_table", "AE_spindle")
META_FIELDS = ("case", "run", "VB", "time", "DOC", "feed", "material")
SAMPLES_PER_CUT = 9000
SAMPLE_RATE_HZ = 250
