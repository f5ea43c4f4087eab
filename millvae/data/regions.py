"""Find the stable cutting region of each cut from its signals (used when no labels CSV is given).

A cut goes idle → tool entry → steady cut → exit → idle. Each signal is reduced to a smoothed
activity envelope (per-block standard deviation, or the mean level for the DC motor current),
normalised per cut to [0, 1] between its idle and cutting levels. The longest run above half level
is the cutting phase [entry, exit). The motor current ramps up while the cutter engages its full
width, so for current signals the steady region starts a multiple of that ramp's duration after
entry; for vibration/AE signals (which step up at once) it starts a fixed fraction of the cutting
phase after entry. It ends a fixed fraction of the phase before the exit, or at the end of the
record when the cut outlasts it. Constants were fitted to the seed's hand-picked regions of the real
data (median IoU 0.91 over the 165 good cuts from smcAC; see tests/test_regions.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import binary_closing, uniform_filter1d

from millvae.errors import MillvaeError

# Most informative first. The seed's regions follow the motor current; smcAC before smcDC because
# smcDC clips at the ADC limit (10 V) in 45 of the 165 real cuts, which flattens its ramp.
# vib_spindle comes last: on the real data it is mostly flat with spikes.
PRIORITY = ("smcAC", "smcDC", "vib_table", "AE_table", "AE_spindle", "vib_spindle")
CURRENT = frozenset({"smcAC", "smcDC"})

BLOCK_SAMPLES = 32  # envelope resolution (0.128 s at 250 Hz), finer than any window
SMOOTH_SAMPLES = 256  # ~1 s moving average: spans the motor-current ripple
GAP_SAMPLES = 512  # dips shorter than this (~2 s) do not split a cutting phase
MIN_BLOCKS = 8  # fewer envelope blocks than this cannot show entry and exit

ON_LEVEL = 0.5  # half way between idle and cutting level
RAMP_FROM, RAMP_TO = 0.2, 0.8  # levels that bound the motor-current ramp at entry
RAMP_FACTOR = 2.25  # steady cutting starts this many ramp durations after the ramp begins
STEP_LEAD = 0.22  # for step-like signals: start this fraction of the cutting phase after entry
START_CAP = 0.3  # never start later than this fraction of the phase (exit seen) ...
START_CAP_NO_EXIT = 0.5  # ... or of the visible part of the phase (cut outlasts the record)
END_LEAD = 0.12  # the exit disturbs the signals this fraction of the phase before it shows

# A cut shows a clear cutting phase in a signal when its envelope is well separated inside vs
# outside the phase (Cohen's d; white noise gives < 1.5, real current and table vibration > 3)
# and both the phase and the idle part are long enough.
MIN_SEPARATION = 3.0
MIN_PHASE_FRACTION = 0.1
MIN_IDLE_FRACTION = 0.02


def region_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of paired [start, end) regions: a, b are [n, 2] → [n] floats.

    Two empty regions count as identical (1.0); an empty region against a non-empty one as 0.0.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 2)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 2)
    if a.shape != b.shape:
        raise MillvaeError(
            f"region_iou: expected two [n, 2] arrays of equal n; got {a.shape}, {b.shape}"
        )
    len_a = np.clip(a[:, 1] - a[:, 0], 0, None)
    len_b = np.clip(b[:, 1] - b[:, 0], 0, None)
    inter = np.clip(np.minimum(a[:, 1], b[:, 1]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    inter = np.minimum(inter, np.minimum(len_a, len_b))
    union = len_a + len_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 1.0)


def central_region(n_samples: int, window_size: int) -> tuple[int, int]:
    """The fallback region: the middle half of the cut, at least one window, on the window grid."""
    start = -(-(n_samples // 4) // window_size) * window_size
    end = (3 * n_samples // 4) // window_size * window_size
    if end - start < window_size:
        # The grid window nearest the middle.
        start = round((n_samples - window_size) / 2 / window_size) * window_size
        start = min(start, (n_samples - window_size) // window_size * window_size)
        end = start + window_size
    return start, end


def _envelope(x: np.ndarray, name: str, block: int, smooth: int) -> np.ndarray:
    """Smoothed per-block activity of one signal, [n_cuts, n_blocks], unnormalised."""
    n_cuts, n_samples = x.shape
    blocks = x[:, : n_samples // block * block].reshape(n_cuts, -1, block)
    if name == "smcDC":
        env = blocks.mean(axis=2)
    else:
        env = blocks.std(axis=2)
        if name not in CURRENT:
            # Vibration and AE levels differ by orders of magnitude between idle, entry and steady
            # cutting; on a log scale the steady level sits well above half way.
            env = np.log(env + 1e-12 * (np.abs(env).max(axis=1, keepdims=True) + 1e-300))
    return uniform_filter1d(env, smooth, axis=1, mode="nearest")


def _longest_run(on: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and one-past-last index of the longest run of True per row (0, 0 where none)."""
    pos = np.arange(on.shape[1])
    last_off = np.maximum.accumulate(np.where(on, -1, pos), axis=1)
    run_len = np.where(on, pos - last_off, 0)
    stop = run_len.argmax(axis=1) + 1
    length = run_len.max(axis=1)
    return np.where(length > 0, stop - length, 0), np.where(length > 0, stop, 0)


def _phase(
    x: np.ndarray, name: str, block: int, smooth: int, gap: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steady-region bounds (in blocks) of every cut from one signal, and whether it is clear."""
    env = _envelope(x, name, block, smooth)
    n_blocks = env.shape[1]
    lo = np.percentile(env, 2, axis=1, keepdims=True)
    hi = np.percentile(env, 98, axis=1, keepdims=True)
    span = hi - lo
    varies = (span > 1e-9 * (np.abs(lo) + np.abs(hi)) + 1e-300)[:, 0]
    e = (env - lo) / np.where(span > 0, span, 1.0)

    on = e >= ON_LEVEL
    if gap > 1:
        on |= binary_closing(on, structure=np.ones((1, gap), dtype=bool))
    entry, exit_ = _longest_run(on)
    length = exit_ - entry
    pos = np.arange(n_blocks)[None, :]
    inside = (pos >= entry[:, None]) & (pos < exit_[:, None])
    n_in = inside.sum(axis=1)
    n_out = n_blocks - n_in
    mean_in = (e * inside).sum(axis=1) / np.maximum(n_in, 1)
    mean_out = (e * ~inside).sum(axis=1) / np.maximum(n_out, 1)
    var_in = ((e - mean_in[:, None]) ** 2 * inside).sum(axis=1) / np.maximum(n_in, 1)
    var_out = ((e - mean_out[:, None]) ** 2 * ~inside).sum(axis=1) / np.maximum(n_out, 1)
    separation = (mean_in - mean_out) / np.sqrt((var_in + var_out) / 2 + 1e-12)
    clear = (
        varies
        & (separation >= MIN_SEPARATION)
        & (length >= MIN_PHASE_FRACTION * n_blocks)
        & (n_out >= MIN_IDLE_FRACTION * n_blocks)
    )

    exit_seen = exit_ < n_blocks
    if name in CURRENT:
        # Ramp = from the last block below RAMP_FROM before entry to the first at RAMP_TO after it.
        below = np.where((e < RAMP_FROM) & (pos < entry[:, None]), pos, -1).max(axis=1)
        ramp_from = below + 1
        reached = np.where((e >= RAMP_TO) & inside, pos, n_blocks).min(axis=1)
        ramp_to = np.minimum(reached, exit_)
        start = ramp_from + RAMP_FACTOR * np.maximum(ramp_to - ramp_from, 0)
    else:
        start = entry + STEP_LEAD * length
    cap = np.where(exit_seen, START_CAP, START_CAP_NO_EXIT)
    start = np.minimum(start, entry + cap * length)
    end = np.where(exit_seen, exit_ - END_LEAD * length, n_blocks)
    return start.astype(np.float64), end.astype(np.float64), clear


def _resolution(n_samples: int) -> tuple[int, int, int]:
    """Envelope block, smoothing and gap-bridging lengths (in blocks) for cuts of n_samples."""
    block = int(np.clip(n_samples // 128, 2, BLOCK_SAMPLES))
    n_blocks = n_samples // block
    smooth = max(1, min(round(SMOOTH_SAMPLES / block), n_blocks // 32))
    gap = max(1, min(round(GAP_SAMPLES / block), n_blocks // 16))
    return block, smooth, gap


def _validate(signals: np.ndarray, signal_names: Sequence[str], window_size: int) -> np.ndarray:
    if isinstance(window_size, bool) or not isinstance(window_size, (int, np.integer)):
        raise MillvaeError(f"window_size: expected a positive integer; got {window_size!r}")
    if window_size < 1:
        raise MillvaeError(f"window_size: expected a positive integer; got {window_size}")
    arr = np.asarray(signals)
    if arr.ndim != 3 or not np.issubdtype(arr.dtype, np.number):
        raise MillvaeError(
            f"signals: expected a numeric [n_cuts, n_samples, n_signals] array; "
            f"got shape {arr.shape}, dtype {arr.dtype}"
        )
    names = list(signal_names)
    if len(names) != arr.shape[2]:
        raise MillvaeError(
            f"signal_names: expected {arr.shape[2]} names (one per signal column); got {len(names)}"
        )
    unknown = [s for s in names if s not in PRIORITY]
    if unknown or len(set(names)) != len(names):
        raise MillvaeError(
            f"signal_names: expected distinct names among {', '.join(PRIORITY)}; got {names}"
        )
    if arr.shape[1] < window_size:
        raise MillvaeError(
            f"signals: expected cuts of at least window_size={window_size} samples; "
            f"got {arr.shape[1]}"
        )
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        bad = np.flatnonzero(~np.isfinite(arr).all(axis=(1, 2)))
        raise MillvaeError(
            f"signals: expected finite values; cuts at rows {bad[:10].tolist()} hold NaN or inf"
        )
    return arr


def detect_regions(
    signals: np.ndarray, signal_names: Sequence[str], window_size: int = 64
) -> np.ndarray:
    """Stable cutting region of every cut: int64 [n_cuts, 2] of (start, end) sample indices.

    `signals` is raw [n_cuts, n_samples, n_signals], columns named by `signal_names` (any subset of
    the six mill signals). Bounds are multiples of `window_size`, end exclusive, at least one window
    long. Per cut the most informative signal that shows a clear cutting phase decides (see
    PRIORITY); a cut with none gets the central half of the record.
    """
    return detect_regions_with_sources(signals, signal_names, window_size)[0]


def detect_regions_with_sources(
    signals: np.ndarray, signal_names: Sequence[str], window_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """`detect_regions` plus, per cut, the signal that decided it ("central" for the fallback)."""
    arr = _validate(signals, signal_names, window_size)
    n_cuts, n_samples, _ = arr.shape
    fallback = np.array(central_region(n_samples, window_size), dtype=np.int64)
    regions = np.tile(fallback, (n_cuts, 1))
    sources = np.full(n_cuts, "central", dtype=object)
    block, smooth, gap = _resolution(n_samples)
    n_blocks = n_samples // block
    if n_cuts == 0 or n_blocks < MIN_BLOCKS:
        return regions, sources

    names = list(signal_names)
    order = [names.index(s) for s in PRIORITY if s in names]
    bounds = np.empty((len(order), n_cuts, 2), dtype=np.int64)
    usable = np.empty((len(order), n_cuts), dtype=bool)
    last = n_samples // window_size * window_size
    for k, col in enumerate(order):
        start, end, clear = _phase(arr[:, :, col], names[col], block, smooth, gap)
        end = np.where(end >= n_blocks, n_samples, end * block)
        # Round inwards onto the window grid (the tolerance absorbs float noise in the products).
        start = np.ceil(start * block / window_size - 1e-9).astype(np.int64) * window_size
        end = np.floor(end / window_size + 1e-9).astype(np.int64) * window_size
        bounds[k, :, 0] = np.maximum(start, 0)
        bounds[k, :, 1] = np.minimum(end, last)
        usable[k] = clear & (bounds[k, :, 1] - bounds[k, :, 0] >= window_size)

    # The first signal in priority order with a clear cutting phase decides.
    pick = usable.argmax(axis=0)
    ok = usable.any(axis=0)
    rows = np.flatnonzero(ok)
    regions[rows] = bounds[pick[rows], rows]
    sources[rows] = [names[order[k]] for k in pick[rows]]
    return regions, sources
