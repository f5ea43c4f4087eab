"""Benchmark: data preparation (millvae vs. the seed's loops) and β-VAE training throughput.

Runs on the real 5-signal milling file and the seed's labels CSV from the shared data folder
(`../shared/data/milling` relative to the repository root, or `--data-dir`). Prints plain-text
tables; nothing is asserted on timing. Exits 0 with a "skipped" line where the data is absent.

    python benchmarks/bench_prep_train.py            # 5 repeats, 15 epochs per configuration
    python benchmarks/bench_prep_train.py --quick    # smoke run: 2 repeats, 4 epochs
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io
from sklearn.model_selection import train_test_split

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from millvae.config import PAPER_BEST, TrainConfig, make_config
from millvae.data.mat import load_mill
from millvae.data.prepare import Prepared, prepare
from millvae.data.windows import (
    MinMaxScaler,
    cut_windows,
    interpolate_flank_wear,
    read_labels,
    regions_from_labels,
    split_windows,
    tool_class,
    window_starts,
)
from millvae.errors import MillvaeError
from millvae.train import fit

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "milling"
MAT_NAME = "mill_partial_no_AE_spindle.mat"
LABELS_NAME = "labels_with_tool_class.csv"
SIGNALS = ("smcAC", "smcDC", "vib_table", "vib_spindle", "AE_table")  # what the file holds
CORRUPTED_CUTS = (17, 94)
WINDOW = 64
STRIDE = 64
STAGES = ("load", "windows", "split", "scale")
SCALE_TOLERANCE = 1e-6

# From the issue: a plain Keras implementation of the seed, measured on this machine kind (2 CPUs).
REFERENCE_EPOCH_S = "0.6-0.8"
REFERENCE_WINDOWS_PER_S = "3,600-4,900"
REFERENCE_FIRST_EPOCH_S = "5-10"
REFERENCE_PREP_S = "~0.36 (seed's way; windowing + scaling ~4x faster vectorised)"


# ---------------------------------------------------------------- the seed's way (reference)


@dataclass
class SeedResult:
    x_train: np.ndarray  # scaled windows in split order, float64
    x_val: np.ndarray
    x_test: np.ndarray
    idx_train: np.ndarray  # position of each window in the unsplit window list
    idx_val: np.ndarray
    idx_test: np.ndarray
    raw: np.ndarray  # unscaled windows in cut order
    cut_no: np.ndarray
    start: np.ndarray


def seed_load(mat_path: Path, labels_path: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """loadmat, then the per-cut label/meta table with the corrupted cuts dropped by cut_no."""
    mill = scipy.io.loadmat(str(mat_path))["mill"]
    labels = pd.read_csv(labels_path)
    labels = labels[~labels["cut_no"].isin(CORRUPTED_CUTS)].reset_index(drop=True)
    return mill, labels


def seed_windows(mill: np.ndarray, labels: pd.DataFrame) -> tuple[np.ndarray, ...]:
    """One Python iteration per window, as the seed cut them."""
    xs, ys, cut_nos, starts = [], [], [], []
    for row in labels.itertuples(index=False):
        record = mill[0, row.cut_no]
        signals = np.hstack([record[s].reshape(-1, 1) for s in SIGNALS])  # [sample, signal]
        for start in range(row.window_start, row.window_end - WINDOW + 1, STRIDE):
            xs.append(signals[start : start + WINDOW])
            ys.append(row.tool_class)
            cut_nos.append(row.cut_no)
            starts.append(start)
    return np.array(xs), np.array(ys), np.array(cut_nos), np.array(starts)


def seed_split(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """The seed's two stratified splits; an index array rides along to check membership."""
    idx = np.arange(len(y))
    x_train, x_rest, _, y_rest, idx_train, idx_rest = train_test_split(
        x, y, idx, test_size=0.33, random_state=15, stratify=y
    )
    x_val, x_test, _, _, idx_val, idx_test = train_test_split(
        x_rest, y_rest, idx_rest, test_size=0.5, random_state=10, stratify=y_rest
    )
    return x_train, x_val, x_test, idx_train, idx_val, idx_test


def seed_scale(x_train: np.ndarray, x_val: np.ndarray, x_test: np.ndarray) -> tuple:
    """Min/max of the training windows, then a Python loop per window and per signal."""
    n_signals = x_train.shape[2]
    mins = np.array([x_train[:, :, j].min() for j in range(n_signals)])
    maxs = np.array([x_train[:, :, j].max() for j in range(n_signals)])
    out = []
    for x in (x_train, x_val, x_test):
        # train_test_split returns fresh arrays, so scaling in place (as the seed did) is safe
        for i in range(x.shape[0]):
            for j in range(n_signals):
                x[i, :, j] = (x[i, :, j] - mins[j]) / abs(maxs[j] - mins[j])
        out.append(x)
    return tuple(out)


def run_seed_way(mat_path: Path, labels_path: Path) -> tuple[SeedResult, dict[str, float]]:
    times: dict[str, float] = {}
    t = time.perf_counter()
    mill, labels = seed_load(mat_path, labels_path)
    times["load"] = time.perf_counter() - t

    t = time.perf_counter()
    raw, y, cut_nos, starts = seed_windows(mill, labels)
    times["windows"] = time.perf_counter() - t

    t = time.perf_counter()
    x_train, x_val, x_test, idx_train, idx_val, idx_test = seed_split(raw, y)
    times["split"] = time.perf_counter() - t

    t = time.perf_counter()
    x_train, x_val, x_test = seed_scale(x_train, x_val, x_test)
    times["scale"] = time.perf_counter() - t
    times["total"] = sum(times[s] for s in STAGES)
    result = SeedResult(x_train, x_val, x_test, idx_train, idx_val, idx_test, raw, cut_nos, starts)
    return result, times


# ---------------------------------------------------------------- the project's code


def run_millvae_stages(cfg: TrainConfig, mat_path: Path) -> tuple[np.ndarray, dict[str, float]]:
    """The steps of `millvae.data.prepare.prepare` timed one by one (split=window)."""
    times: dict[str, float] = {}
    t = time.perf_counter()
    mill = load_mill(mat_path, cfg.signals)
    cuts = mill.cuts.copy()
    cuts["tool_class"] = tool_class(
        interpolate_flank_wear(cuts), cfg.healthy_max_vb, cfg.failed_min_vb
    )
    regions = regions_from_labels(read_labels(cfg.labels), cuts.index.tolist(), mill.n_samples)
    times["load"] = time.perf_counter() - t

    t = time.perf_counter()
    rows, starts = window_starts(regions, cfg.window_size, cfg.stride)
    raw = cut_windows(mill.signals, rows, starts, cfg.window_size)
    times["windows"] = time.perf_counter() - t

    t = time.perf_counter()
    split = split_windows(cuts["tool_class"].to_numpy()[rows])
    times["split"] = time.perf_counter() - t

    t = time.perf_counter()
    train = split == "train"
    MinMaxScaler.fit(raw[train], mill.signal_names, cfg.window_size).transform(raw)
    times["scale"] = time.perf_counter() - t
    times["total"] = sum(times[s] for s in STAGES)
    return raw, times


def run_millvae_prepare(cfg: TrainConfig, mat_path: Path) -> tuple[Prepared, float]:
    """End to end, as a run does it: load_mill + data.prepare."""
    t = time.perf_counter()
    mill = load_mill(mat_path, cfg.signals)
    prepared = prepare(cfg, mill=mill)
    return prepared, time.perf_counter() - t


# ---------------------------------------------------------------- measurements


def best_of(repeats: int, func: Callable[[], tuple]) -> tuple:
    """Call `func` `repeats` times; keep the last result and the best time of every stage."""
    best: dict[str, float] = {}
    result = None
    for _ in range(repeats):
        result, times = func()
        if isinstance(times, float):
            times = {"total": times}
        for k, v in times.items():
            best[k] = min(best.get(k, float("inf")), v)
    return result, best


def check_equal(seed: SeedResult, raw: np.ndarray, prepared: Prepared) -> list[str]:
    """Same windows in the same order, same split membership, scaled values within tolerance."""
    problems = []
    w = prepared.windows
    if len(w) != len(seed.cut_no):
        return [f"window count: seed {len(seed.cut_no)}, millvae {len(w)}"]
    if not (np.array_equal(w["cut_no"], seed.cut_no) and np.array_equal(w["start"], seed.start)):
        problems.append("windows: (cut_no, start) differ or come in another order")
    # millvae keeps signals as float32; the seed's float64 values rounded to float32 must match
    if not np.array_equal(raw, seed.raw.astype(np.float32)):
        problems.append("windows: raw values differ")
    splits = (
        ("train", seed.idx_train, seed.x_train),
        ("val", seed.idx_val, seed.x_val),
        ("test", seed.idx_test, seed.x_test),
    )
    for name, idx, x_seed in splits:
        ours = np.flatnonzero(prepared.mask(name))
        if not np.array_equal(np.sort(idx), ours):
            problems.append(f"split {name}: membership differs")
            continue
        diff = float(np.abs(prepared.x[idx].astype(np.float64) - x_seed).max())
        if diff > SCALE_TOLERANCE:
            problems.append(f"scale {name}: max |difference| {diff:.2e} > {SCALE_TOLERANCE:g}")
    return problems


def bench_preparation(cfg: TrainConfig, mat_path: Path, labels_path: Path, repeats: int):
    """Time both preparations (best of `repeats`), check they agree, print the table."""
    with warnings.catch_warnings():
        # load_mill names the corrupted records it drops each time; known, and not news here
        warnings.simplefilter("ignore")
        seed, seed_t = best_of(repeats, lambda: run_seed_way(mat_path, labels_path))
        raw, ours_t = best_of(repeats, lambda: run_millvae_stages(cfg, mat_path))
        prepared, e2e = best_of(repeats, lambda: run_millvae_prepare(cfg, mat_path))

    print(f"\n== Preparation (best of {repeats}; seconds) ==")
    print(f"{'stage':<22}{'seed way':>10}{'millvae':>10}{'speed-up':>10}")
    for stage in (*STAGES, "total"):
        a, b = seed_t[stage], ours_t[stage]
        label = "total (sum of stages)" if stage == "total" else stage
        print(f"{label:<22}{a:>10.3f}{b:>10.3f}{a / b:>9.1f}x")
    a, b = seed_t["total"], e2e["total"]
    print(f"{'end to end prepare()':<22}{a:>10.3f}{b:>10.3f}{a / b:>9.1f}x")
    a = seed_t["windows"] + seed_t["scale"]
    b = ours_t["windows"] + ours_t["scale"]
    print(f"{'windows + scale':<22}{a:>10.3f}{b:>10.3f}{a / b:>9.1f}x")
    print(f"reference (issue): {REFERENCE_PREP_S}")
    print("'load' = mat file + per-cut labels/regions; millvae drops records 17/94 itself.")

    c = prepared.counts()
    print(
        f"windows: {c['n_windows']:,} (train {c['n_train']:,}, train slim {c['n_train_slim']:,}, "
        f"val {c['n_val']:,}, test {c['n_test']:,})"
    )
    problems = check_equal(seed, raw, prepared)
    if problems:
        print("equality check: FAILED: " + "; ".join(problems))
    else:
        print(
            "equality check: OK (same windows in the same order, same split membership, "
            f"scaled values within {SCALE_TOLERANCE:g})"
        )
    return prepared, not problems


def _epoch_timer():
    import keras

    class EpochTimer(keras.callbacks.Callback):
        """Wall seconds of every epoch, validation included (as Keras reports epochs)."""

        def __init__(self) -> None:
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self._t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._t0)

    return EpochTimer()


def peak_rss_mib() -> float:
    # ru_maxrss is KiB on Linux (bytes on macOS)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def bench_training(cfg: TrainConfig, prepared: Prepared) -> dict[str, float]:
    """Train `cfg` for its fixed epoch count and measure throughput with a callback."""
    timer = _epoch_timer()
    note = ""
    t0 = time.perf_counter()
    try:
        _, _, seconds = fit(cfg, prepared, callbacks=[timer], verbose=0)
    except MillvaeError as exc:
        # fit checks the history only after training, so every epoch was timed already
        seconds = time.perf_counter() - t0
        note = f"fit raised: {exc}"
    later = timer.seconds[1:] or timer.seconds
    median = statistics.median(later)
    n_train = len(prepared.get("train", slim=True))
    return {
        "epochs": len(timer.seconds),
        "first_s": timer.seconds[0],
        "median_s": median,
        "windows_per_s": n_train / median,
        "fit_s": seconds,
        "peak_rss_mib": peak_rss_mib(),
        "note": note,
    }


TRAIN_COLUMNS = (  # (header, width) of the training table
    ("config", 14),
    ("epochs", 8),
    ("s/epoch", 10),
    ("1st epoch s", 13),
    ("windows/s", 13),
    ("fit s", 8),
    ("peak RSS MiB", 14),
)


def _row(cells: tuple[str, ...]) -> str:
    return "".join(
        f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
        for i, (c, (_, w)) in enumerate(zip(cells, TRAIN_COLUMNS, strict=True))
    ).rstrip()


def print_training(rows: list[tuple[str, dict]], epochs: int, n_train: int) -> None:
    print(f"\n== Training (millvae.train.fit, {epochs} epochs, {n_train:,} train-slim windows) ==")
    print(_row(tuple(h for h, _ in TRAIN_COLUMNS)))
    for name, r in rows:
        cells = (
            name,
            str(r["epochs"]),
            f"{r['median_s']:.2f}",
            f"{r['first_s']:.2f}",
            f"{r['windows_per_s']:,.0f}",
            f"{r['fit_s']:.1f}",
            f"{r['peak_rss_mib']:,.0f}",
        )
        print(_row(cells))
    reference = (REFERENCE_EPOCH_S, REFERENCE_FIRST_EPOCH_S, REFERENCE_WINDOWS_PER_S)
    print(_row(("reference", "", *reference, "", "")))
    print(
        "s/epoch: median over epochs after the first, validation included; "
        "peak RSS: whole process so far."
    )
    print(
        "reference: a plain Keras implementation of the seed on this machine kind (from the issue)."
    )
    for name, r in rows:
        if r["note"]:
            print(f"note, {name}: {r['note']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--repeats", type=int, default=5, help="preparation repeats (best of)")
    parser.add_argument("--epochs", type=int, default=15, help="fixed epochs per configuration")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 repeats, 4 epochs")
    parser.add_argument("--skip-training", action="store_true", help="preparation only")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # keep tables in order with TensorFlow's stderr
    if args.quick:
        args.repeats, args.epochs = 2, 4
    if args.repeats < 1 or args.epochs < 1:
        parser.error("--repeats and --epochs must be >= 1")

    mat_path, labels_path = args.data_dir / MAT_NAME, args.data_dir / LABELS_NAME
    absent = [p for p in (mat_path, labels_path) if not p.is_file()]
    if absent:
        print(f"skipped: real milling data absent ({', '.join(map(str, absent))})")
        return 0

    base = {
        "data": str(mat_path),
        "signals": "available",
        "labels": str(labels_path),
        "epochs": args.epochs,
        "earlystop_patience": args.epochs,  # no early stop: every config runs all epochs
    }
    seed_default = make_config(**base)
    prepared, agree = bench_preparation(seed_default, mat_path, labels_path, args.repeats)
    if args.skip_training:
        return 0 if agree else 1

    configs = [("seed default", seed_default), ("paper best", make_config(**base, **PAPER_BEST))]
    rows = [(name, bench_training(cfg, prepared)) for name, cfg in configs]
    print_training(rows, args.epochs, len(prepared.get("train", slim=True)))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
