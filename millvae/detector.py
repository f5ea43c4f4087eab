"""The registered model: an MLflow pyfunc detector turning raw sensor windows into scores and flags.

It bundles the Keras β-VAE (`.keras`), the min-max scaler fitted on the training split, the
condition normalizer and the thresholds chosen on validation (one JSON file). Scores come from the
same functions the training run evaluates with (`millvae.detect.scoring`), so a served window
gets exactly the score the run's metrics were computed from.

Input (the signature is column-based): a DataFrame with one column per signal, named as in
training (e.g. smcAC, smcDC, vib_table, vib_spindle, AE_table, AE_spindle), raw (unscaled) values,
where each run of `window_size` consecutive rows is one window; optional columns DOC, feed and
material give the cutting condition and must be constant within a window (required where the
β-VAE is conditional: `conditional=true`, the config's `condition_scale`). A detector whose decision
is smoothed over a tool's cuts (`smoothing` > 0, `combined_cond_smooth`) also takes `cut` (which cut
a row is of, constant within a window; the request's cuts are one tool's, in time order) and
`smooth_start` (that tool's smoothed score after its earlier cuts, from an earlier answer).
Signal values must be finite and within `signal_ranges(config)`: the training range widened by
`RANGE_SPANS` (100) times its width on each side; farther out a value is no reading of the
machine and overflows the float32 model.

Output: one row per window with

    mse, kl                  reconstruction error and KL divergence from the prior
    mse_cond, kl_cond        the same relative to healthy windows of the window's condition (NaN
                             in process, null when served, when no condition is given)
    mse_<signal>             reconstruction error per signal
    lat, pca, combined       detector=combined only: the coding's Mahalanobis distance from the
    (and their _cond)        healthy codings, PCA's reconstruction error, and the mean of the
                             z-scores the run's `combine` names (default mse_smcAC, lat, pca)
    <decision>_smooth        smoothing > 0 only: the decision score's cut means averaged over the
                             request's cuts (NaN / null without a `cut` column)
    score, score_name        the score decided on and its name ("kl_cond", or "kl" without a
                             condition when the decision score is condition-aware)
    threshold                its validation threshold
    decision                 e.g. "kl_cond", or "kl (no condition given)"
    is_anomaly               score >= threshold
    warning                  None, or one line: decided on the raw score because no condition
                             was given, or the window's condition was never seen healthy

Ways to call it:
- `mlflow.pyfunc.load_model(uri).predict(df)` with the DataFrame above; `mlflow models serve`
  takes the same as a `dataframe_split` JSON body. MLflow 3.17 enforces the column signature
  before the model runs: it refuses a NumPy array (a 3-D array cannot become a DataFrame, a 2-D
  one lacks the column names), reports missing signal columns itself ("Model is missing inputs
  [...]"), drops columns the signature does not name (with a warning) and converts what it can to
  double (true, "1.5"), so the model never sees those.
- `loaded.unwrap_python_model().predict(None, x)` or `score_raw(keras_model, config, x)` in process:
  x may also be an array [n, window, signal] or [window, signal] of raw values (optionally with
  `conditions`, one row per window, for `score_raw`).
Bad input (wrong columns, shape, row count, NaN/inf, out of range, a condition that varies within a
window) raises a one-line error: MillvaeError from `score_raw`, MlflowException
(INVALID_PARAMETER_VALUE) from `predict`.

Served (`mlflow models serve`), `load_context` also wraps MLflow's /invocations endpoint
(`_install_request_guard`): a body over $MILLVAE_MAX_BODY_BYTES (16 MiB) is answered 413 before it
is read (on its Content-Length, or as soon as a chunked body passes it); every error, MLflow's own
parsing and schema errors included, keeps its status (400 for bad input) and gets a JSON `message`
of one line (MLflow put a dump of the data, the schema or a stack trace in it); a request over
$MILLVAE_MAX_WINDOWS (1024) windows is refused before it is scored; and missing values are null,
not the bare NaN that MLflow writes and strict JSON parsers refuse.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import sys
from importlib import metadata as importlib_metadata
from typing import Any

# Before anything imports TensorFlow (the model server imports this module first).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST, INVALID_PARAMETER_VALUE, ErrorCode

import millvae
from millvae.config import COMBINE_LEGACY
from millvae.data.conditions import ConditionScale
from millvae.data.windows import MinMaxScaler
from millvae.detect.baselines import pca_error
from millvae.detect.scoring import (
    COMBINED_PARTS,
    CONDITION_COLUMNS,
    ConditionNormalizer,
    combined_scores,
    condition_keys,
    latent_distance,
    window_outputs,
)
from millvae.detect.trend import SUFFIX, smooth_windows, unsmoothed_name
from millvae.errors import MillvaeError

__all__ = [
    "MillDetector",
    "detector_config",
    "example_frame",
    "raw_windows",
    "score_raw",
]

CONFIG_FORMAT = "millvae-detector/1"
DECISION_SCORES = (
    *("mse", "kl", "mse_cond", "kl_cond", "combined", "combined_cond"),
    # smoothing > 0: the condition-aware scores averaged over a tool's cuts (`detect.trend`)
    *("mse_cond_smooth", "kl_cond_smooth", "combined_cond_smooth"),
)
# A smoothed decision reads which cut each window belongs to (`cut`, constant within a window;
# the request's cuts are one tool's, in time order) and may continue a tool's earlier requests
# (`smooth_start`: the smoothed score of its last cut, from an earlier response).
HISTORY_COLUMNS = ("cut", "smooth_start")
# scores only a detector=combined model computes (its config carries the PCA and the healthy
# codings' mean and precision)
COMBINED_ONLY = ("lat", "lat_cond", "pca", "pca_cond", "combined", "combined_cond")
# Limits of a served request (`mlflow models serve`), read from the environment at model load.
# 16 MiB holds 1,400 (float64 digits) to 2,300 (float32 digits) windows of 64 rows x 9 columns.
MAX_BODY_ENV, MAX_BODY_BYTES = "MILLVAE_MAX_BODY_BYTES", 16 * 1024 * 1024
MAX_WINDOWS_ENV, MAX_WINDOWS = "MILLVAE_MAX_WINDOWS", 1024
# A signal value may lie this many training ranges (max - min) below the training minimum or above
# the maximum. Farther out it is no reading of this machine (a unit or sensor fault) and overflows
# the float32 model: 1e300 became inf and NaN scores.
RANGE_SPANS = 100
# MLflow 3.17's scoring server, imported by the uvicorn worker that `mlflow models serve` starts;
# it loads the model while this module is being imported
SCORING_APP_MODULE = "mlflow.pyfunc.scoring_server.app"
KERAS_FILE = "vae.keras"
CONFIG_FILE = "detector.json"
# MLflow's models-from-code entry point (no pickle of the Python model; MLflow recommends it)
MODEL_CODE = """\"\"\"The millvae detector as MLflow models-from-code (see millvae.detector).\"\"\"

import mlflow

from millvae.detector import MillDetector

mlflow.models.set_model(MillDetector())
"""
REQUIREMENTS = (
    "tensorflow",
    "keras",
    "keras-tcn",
    "numpy",
    "scipy",
    "pandas",
    "scikit-learn",
    "mlflow",
)

_logger = logging.getLogger(__name__)


def detector_config(
    *,
    scaler: MinMaxScaler,
    thresholds: dict[str, float],
    normalizer: ConditionNormalizer,
    decision_score: str,
    score_samples: int = 0,
    data_source: str = "real",
    score_seed: int = 0,
    references: dict | None = None,
    condition_scale: ConditionScale | None = None,
    smoothing: float = 0.0,
) -> dict:
    """Everything besides the Keras model that the detector needs, as a JSON-able dict.

    `thresholds` maps score names to thresholds chosen on validation; it must hold the decision
    score and, for a condition-aware one, its raw counterpart too (used when a request carries no
    condition). Non-finite thresholds of other scores are dropped. `score_samples`/`score_seed`
    are `window_scores`' samples/seed; with samples > 0 the noise is drawn per request, so served
    scores equal the run's evaluation exactly only for deterministic scoring (samples = 0).
    `condition_scale`: a conditional model's (`conditional=true`); its requests must then carry
    DOC, feed and material. `smoothing`: the weight of earlier cuts, for a decision score
    smoothed over a tool's cuts (`<score>_smooth`).
    """
    if decision_score not in DECISION_SCORES:
        raise MillvaeError(
            f"decision_score: expected one of {', '.join(DECISION_SCORES)}; got {decision_score!r}"
        )
    smoothed = decision_score.endswith(SUFFIX)
    if smoothed and not 0 < float(smoothing) < 1:
        raise MillvaeError(
            f"smoothing: expected a weight 0 < w < 1 for the decision score {decision_score}; "
            f"got {smoothing!r}"
        )
    needed = fallback_scores(decision_score)
    combined = decision_score.startswith("combined")
    if combined and not (references and {"pca", "latent"} <= set(references)):
        raise MillvaeError(
            f"references: expected the PCA and the healthy codings of a detector=combined run "
            f"(the decision score is {decision_score}); got {sorted(references or {}) or 'none'}"
        )
    parts = list((references or {}).get("combine", COMBINED_PARTS))
    stats = parts if combined else []
    if len(needed) > 1:  # a condition-aware decision: its raw score needs no condition
        stats = stats or [needed[-1]]
    for name in stats:
        if name not in normalizer.stats:
            raise MillvaeError(
                f"normalizer: expected statistics for {name!r} (the decision "
                f"score is {decision_score}); it has {', '.join(normalizer.stats) or 'none'}"
            )
    for name in needed:
        value = thresholds.get(name)
        if value is None or not math.isfinite(float(value)):
            raise MillvaeError(
                f"thresholds: expected a finite threshold for {name!r} (decision score "
                f"{decision_score}); got {value!r}"
            )
    if int(score_samples) < 0:
        raise MillvaeError(f"score_samples: expected an integer >= 0; got {score_samples!r}")
    extra = {}
    if references:
        extra = {"pca": references["pca"], "latent": references["latent"], "combine": parts}
    if condition_scale is not None:
        extra["condition_scale"] = condition_scale.to_dict()
    if smoothed:
        extra["smoothing"] = float(smoothing)
    return {
        **extra,
        "format": CONFIG_FORMAT,
        "millvae_version": millvae.__version__,
        "signal_names": list(scaler.signal_names),
        "window_size": int(scaler.window_size),
        "scaler": scaler.to_dict(),
        "normalizer": normalizer.to_dict(),
        "thresholds": {
            str(k): float(v)
            for k, v in thresholds.items()
            if v is not None and math.isfinite(float(v))
        },
        "decision_score": decision_score,
        "score_samples": int(score_samples),
        "score_seed": int(score_seed),
        "data_source": str(data_source),
    }


def _raw_name(score: str) -> str:
    return unsmoothed_name(score).removesuffix("_cond")


def fallback_scores(decision: str) -> list[str]:
    """The decision score, then what a request decides on without a `cut` column (the score per
    window) and without a condition (the raw score): each needs its validation threshold."""
    chain = [decision, unsmoothed_name(decision), _raw_name(decision)]
    return list(dict.fromkeys(chain))


def _fmt(values) -> str:
    return ", ".join(map(str, values)) if len(values) else "none"


def _finite_or_raise(
    values: np.ndarray, what: str, window_size: int, by_row: bool, names: list[str]
) -> None:
    """values [rows, column] (by_row) or [n, window, signal]; names: the last axis."""
    bad = ~np.isfinite(values)
    if not bad.any():
        return
    first = np.argwhere(bad)[0]
    if by_row:  # values [rows, columns] of a DataFrame
        where = f"row {first[0]} (window {first[0] // window_size})"
    else:  # values [n, window, signal]
        where = f"window {first[0]}, sample {first[1]}"
    raise MillvaeError(
        f"input: expected finite numbers; found {int(bad.sum())} NaN/inf value(s) in {what}, the "
        f"first at {where}, {names[first[-1]]} = {values[tuple(first)]}"
    )


def signal_ranges(config: dict) -> tuple[np.ndarray, np.ndarray]:
    """The raw values each signal may take: the training range widened by `RANGE_SPANS` ranges."""
    scaler = config["scaler"]
    low, high = np.asarray(scaler["min"], dtype=float), np.asarray(scaler["max"], dtype=float)
    span = np.where(high > low, high - low, 1.0)  # a constant signal scales by 1, as MinMaxScaler
    return low - RANGE_SPANS * span, high + RANGE_SPANS * span


def _in_range_or_raise(values: np.ndarray, config: dict, by_row: bool) -> None:
    """values: finite [rows, signal] (by_row) or [n, window, signal], in the config's order."""
    low, high = signal_ranges(config)
    bad = (values < low) | (values > high)
    if not bad.any():
        return
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    j, window_size = first[-1], int(config["window_size"])
    name = config["signal_names"][j]
    where = (
        f"row {first[0]} (window {first[0] // window_size})"
        if by_row
        else f"window {first[0]}, sample {first[1]}"
    )
    scaler = config["scaler"]
    raise MillvaeError(
        f"input: expected {name} within [{low[j]:.6g}, {high[j]:.6g}] (its training range "
        f"[{scaler['min'][j]:.6g}, {scaler['max'][j]:.6g}] widened {RANGE_SPANS} times its width "
        f"each way); got {values[first]:.6g} at {where}, {int(bad.sum())} value(s) out of range"
    )


def _too_many(got: int, unit: str, max_windows: int | None, window_size: int) -> None:
    limit = None if max_windows is None else max_windows * (window_size if unit == "rows" else 1)
    if limit is not None and got > limit:
        raise MillvaeError(
            f"input: expected at most {max_windows} windows ({max_windows * window_size} rows) "
            f"per request (the server's {MAX_WINDOWS_ENV}); got {got} {unit}"
        )


def _windows_from_frame(
    df: pd.DataFrame, config: dict, max_windows: int | None
) -> tuple[np.ndarray, pd.DataFrame | None]:
    signals, window_size = list(config["signal_names"]), int(config["window_size"])
    _too_many(len(df), "rows", max_windows, window_size)  # before any copy of the data
    columns = [str(c) for c in df.columns]
    if len(set(columns)) < len(columns):
        twice = sorted({c for c in columns if columns.count(c) > 1})
        raise MillvaeError(f"input: expected each column once; got {', '.join(twice)} twice")
    missing = [s for s in signals if s not in columns]
    optional = [*CONDITION_COLUMNS, *(HISTORY_COLUMNS if "smoothing" in config else ())]
    unknown = [c for c in columns if c not in signals and c not in optional]
    if missing or unknown:
        raise MillvaeError(
            f"input: expected columns {', '.join(signals)} (optionally "
            f"{', '.join(optional)}); missing {_fmt(missing)}; unknown {_fmt(unknown)}"
        )
    df = df.set_axis(columns, axis=1)
    n_rows = len(df)
    if n_rows == 0 or n_rows % window_size:
        raise MillvaeError(
            f"input: expected a multiple of {window_size} rows (each {window_size} consecutive "
            f"rows form one window); got {n_rows} rows"
        )
    values = _numeric(df, signals)
    _finite_or_raise(values, "the signal columns", window_size, True, signals)
    _in_range_or_raise(values, config, by_row=True)
    raw = values.reshape(n_rows // window_size, window_size, len(signals))

    given = [c for c in CONDITION_COLUMNS if c in columns]
    if not given:
        return raw, None
    if len(given) < len(CONDITION_COLUMNS):
        absent = [c for c in CONDITION_COLUMNS if c not in given]
        raise MillvaeError(
            f"input: expected all condition columns {', '.join(CONDITION_COLUMNS)} or none; "
            f"got {', '.join(given)} without {', '.join(absent)}"
        )
    return raw, _per_window(df, list(CONDITION_COLUMNS), "the condition columns", window_size)


def _per_window(df: pd.DataFrame, columns: list[str], what: str, window_size: int) -> pd.DataFrame:
    """One row per window of per-window columns (a condition, a cut): numbers, finite and
    constant within each window of `window_size` rows, or a one-line error."""
    values = _numeric(df, columns)
    _finite_or_raise(values, what, window_size, True, columns)
    per_window = values.reshape(-1, window_size, len(columns))
    varies = (per_window != per_window[:, :1, :]).any(axis=1)
    if varies.any():
        w, j = (int(i) for i in np.argwhere(varies)[0])
        seen = np.unique(per_window[w, :, j])
        raise MillvaeError(
            f"input: expected {columns[j]} constant within each window of {window_size} "
            f"rows; window {w} has {', '.join(f'{v:g}' for v in seen[:4])}"
        )
    return pd.DataFrame(per_window[:, 0, :], columns=columns)


def _numeric(df: pd.DataFrame, columns: list[str]) -> np.ndarray:
    out = np.empty((len(df), len(columns)), dtype=np.float64)
    for j, c in enumerate(columns):
        values = pd.to_numeric(df[c], errors="coerce")
        bad = values.isna() & df[c].notna()
        if bad.any() or pd.api.types.is_bool_dtype(df[c]):
            example = df[c][bad].iloc[0] if bad.any() else df[c].iloc[0]
            raise MillvaeError(f"input: expected numbers in column {c!r}; got {example!r}")
        out[:, j] = values.to_numpy(dtype=np.float64, na_value=np.nan)
    return out


def _windows_from_array(
    arr: np.ndarray, config: dict, max_windows: int | None
) -> tuple[np.ndarray, None]:
    signals, window_size = list(config["signal_names"]), int(config["window_size"])
    expected = f"[n, {window_size}, {len(signals)}] or [{window_size}, {len(signals)}]"
    shape = tuple(arr.shape)
    if arr.ndim == 2 and shape == (window_size, len(signals)):
        arr = arr[None]
    elif not (arr.ndim == 3 and shape[1:] == (window_size, len(signals)) and shape[0] > 0):
        raise MillvaeError(
            f"input: expected an array {expected} (signals {', '.join(signals)}); got shape "
            f"{list(shape)}"
        )
    _too_many(len(arr), "windows", max_windows, window_size)
    if not (np.issubdtype(arr.dtype, np.number) and not np.issubdtype(arr.dtype, np.bool_)):
        raise MillvaeError(f"input: expected an array of numbers; got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    _finite_or_raise(arr, "the array", window_size, False, signals)
    _in_range_or_raise(arr, config, by_row=False)
    return arr, None


def _check_conditions(conditions: Any, n_windows: int) -> pd.DataFrame:
    if not isinstance(conditions, pd.DataFrame):
        raise MillvaeError(
            f"conditions: expected a DataFrame with columns {', '.join(CONDITION_COLUMNS)}; got "
            f"{type(conditions).__name__}"
        )
    missing = [c for c in CONDITION_COLUMNS if c not in conditions.columns]
    if missing or len(conditions) != n_windows:
        raise MillvaeError(
            f"conditions: expected {n_windows} rows (one per window) with columns "
            f"{', '.join(CONDITION_COLUMNS)}; got {len(conditions)} rows, missing {_fmt(missing)}"
        )
    values = _numeric(conditions, list(CONDITION_COLUMNS))
    if not np.isfinite(values).all():
        raise MillvaeError("conditions: expected finite DOC, feed and material; found NaN/inf")
    return pd.DataFrame(values, columns=list(CONDITION_COLUMNS))


def raw_windows(
    raw: Any,
    config: dict,
    conditions: pd.DataFrame | None = None,
    max_windows: int | None = None,
) -> tuple[np.ndarray, pd.DataFrame | None]:
    """Validate an input and return raw windows [n, window, signal] and the conditions (or None).

    Signal values must be finite and within `signal_ranges(config)`; `max_windows` (None: no
    limit) caps the windows of one input, checked before the data is converted.
    """
    signals, window_size = list(config["signal_names"]), int(config["window_size"])
    if isinstance(raw, pd.DataFrame):
        if conditions is not None:
            raise MillvaeError(
                "conditions: expected them as DOC, feed, material columns of the input DataFrame; "
                "got a separate conditions argument too"
            )
        return _windows_from_frame(raw, config, max_windows)
    if isinstance(raw, np.ndarray | list):
        arr, _ = _windows_from_array(np.asarray(raw), config, max_windows)
        cond = None if conditions is None else _check_conditions(conditions, len(arr))
        return arr, cond
    raise MillvaeError(
        f"input: expected a DataFrame with columns {', '.join(signals)} or an array "
        f"[n, {window_size}, {len(signals)}]; got {type(raw).__name__}"
    )


def score_raw(
    keras_model: Any,
    config: dict,
    raw: Any,
    conditions: pd.DataFrame | None = None,
    max_windows: int | None = None,
) -> pd.DataFrame:
    """Scores and decisions for raw windows (see the module docstring for inputs and columns).

    Scales with the stored scaler, then `window_scores` and `ConditionNormalizer.transform`: the
    same path as the training run's evaluation. Every score is finite, or it raises; only the
    `_cond` scores are NaN, when no condition is given.
    """
    windows, cond = raw_windows(raw, config, conditions, max_windows)
    history = _history(raw, config) if isinstance(raw, pd.DataFrame) else None
    signals = list(config["signal_names"])
    scaler = MinMaxScaler.from_dict(config["scaler"])
    # training scaled float32 windows in float32; doing the same keeps scores identical
    x = scaler.transform(windows.astype(np.float32))
    inputs = x
    if "condition_scale" in config:
        if cond is None:
            raise MillvaeError(
                "conditions: expected DOC, feed and material columns (this detector's β-VAE is "
                "conditional and reads them); got none"
            )
        inputs = ConditionScale.from_dict(config["condition_scale"]).append(x, cond)
    with np.errstate(over="ignore"):  # an overflow is reported below, with its window
        scores, codings = window_outputs(
            keras_model,
            inputs,
            signals,
            samples=int(config.get("score_samples", 0)),
            seed=int(config.get("score_seed", 0)),
        )
    with_refs = "pca" in config
    if with_refs:
        scores["pca"] = pca_error(config["pca"], x)
        scores["lat"] = latent_distance(config["latent"], codings)
    normalizer = ConditionNormalizer.from_dict(config["normalizer"])
    cond_scores = normalizer.transform(scores, cond)

    out = pd.DataFrame({"mse": scores["mse"], "kl": scores["kl"]})
    for name in ("mse_cond", "kl_cond"):
        out[name] = cond_scores[name] if name in cond_scores else np.nan
    for s in signals:
        out[f"mse_{s}"] = scores[f"mse_{s}"]
    if with_refs:
        for name in ("lat", "pca"):
            out[name] = scores[name]
            out[f"{name}_cond"] = cond_scores[f"{name}_cond"] if cond is not None else np.nan
        parts = config.get("combine", COMBINE_LEGACY)  # detectors logged before `combine`
        both = combined_scores(normalizer, scores, cond, parts)
        out["combined"], out["combined_cond"] = both["combined"], both["combined_cond"]
    _finite_scores_or_raise(out, cond is not None)
    decision = str(config["decision_score"])
    if decision.endswith(SUFFIX):
        out[decision] = np.nan
        if history is not None and cond is not None:
            per_window = out[unsmoothed_name(decision)].to_numpy(dtype=float)
            out[decision] = _smooth_request(per_window, history, float(config["smoothing"]))
    _decide(out, config, normalizer, cond, history is not None)
    return out


def _history(df: pd.DataFrame, config: dict) -> pd.DataFrame | None:
    """Per window: its cut and the tool's `smooth_start` (NaN: a new tool), from a request's
    columns; None without a `cut` column (the input has passed `raw_windows`)."""
    if "smoothing" not in config or "cut" not in df.columns:
        if "smooth_start" in df.columns:
            raise MillvaeError(
                "input: expected a cut column beside smooth_start (which cut each row is of); "
                "got smooth_start alone"
            )
        return None
    given = [c for c in HISTORY_COLUMNS if c in df.columns]
    out = _per_window(df, given, "the cut columns", int(config["window_size"]))
    if "smooth_start" in out and out["smooth_start"].nunique() > 1:
        raise MillvaeError(
            "input: expected one smooth_start per request (its cuts are one tool's); got "
            f"{', '.join(f'{v:g}' for v in out['smooth_start'].unique()[:4])}"
        )
    return out


def _smooth_request(per_window: np.ndarray, history: pd.DataFrame, smoothing: float) -> np.ndarray:
    """The request's cuts (in the order their first windows come) as one tool's: each window
    gets the running average of the cut means up to its own cut, from `smooth_start` if given."""
    cuts = history["cut"].to_numpy()
    # a cut's place in the tool's life: where its first window comes in the request
    order = pd.Series(np.arange(len(cuts))).groupby(cuts).transform("min").to_numpy()
    start = float(history["smooth_start"].iloc[0]) if "smooth_start" in history else None
    one_tool = np.zeros(len(cuts))
    return smooth_windows(per_window, one_tool, order, cuts, smoothing, start=start)


def _finite_scores_or_raise(out: pd.DataFrame, with_conditions: bool) -> None:
    computed = [c for c in out.columns if with_conditions or not c.endswith("_cond")]
    bad = ~np.isfinite(out[computed].to_numpy(dtype=float))
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        names = [c for c, b in zip(computed, bad.any(axis=0), strict=True) if b]
        raise MillvaeError(
            f"model: expected finite scores; got NaN/inf {', '.join(names)} for {len(rows)} of "
            f"{len(out)} windows, the first window {rows[0]} (its inputs are within the allowed "
            "ranges: the model overflows on them or is broken)"
        )


def _decide(
    out: pd.DataFrame,
    config: dict,
    normalizer: ConditionNormalizer,
    cond: pd.DataFrame | None,
    with_cuts: bool = False,
) -> None:
    """The decision columns: the score used, its threshold, the flag and a warning per row."""
    decision = str(config["decision_score"])
    thresholds = config["thresholds"]
    used, label, warning = decision, decision, None
    if decision.endswith(SUFFIX) and not with_cuts and cond is not None:
        used = unsmoothed_name(decision)
        label = f"{used} (no cut given)"
        warning = (
            f"no cut column: decided per window on {used} against its threshold "
            f"{float(thresholds[used]):.6g} instead of the model's decision score {decision} "
            f"(threshold {float(thresholds[decision]):.6g}, the tool's cuts averaged); send "
            "each row's cut (one tool's cuts in time order) for the smoothed decision"
        )
    elif "_cond" in decision and cond is None:
        used = _raw_name(decision)
        label = f"{used} (no condition given)"
        # the fallback changes score and threshold: each row says so, served JSON included
        warning = (
            f"no condition columns ({', '.join(CONDITION_COLUMNS)}): decided on {used} against "
            f"its threshold {float(thresholds[used]):.6g} instead of the model's decision score "
            f"{decision} (threshold {float(thresholds[decision]):.6g}); send the condition "
            "columns for condition-aware decisions"
        )
    score = out[used].to_numpy(dtype=float)
    out["score"] = score
    out["score_name"] = used
    out["threshold"] = float(thresholds[used])
    out["decision"] = label
    out["is_anomaly"] = score >= float(thresholds[used])
    warnings = [warning] * len(out)
    if "_cond" in decision and cond is not None:
        # the combined score's parts were all fitted on the same healthy windows
        stats_name = "pca" if decision.startswith("combined") else _raw_name(decision)
        unseen = _unseen_condition_warnings(normalizer, stats_name, cond, decision)
        warnings = ["; ".join(w for w in (warning, u) if w) or None for u in unseen]
    # object, not pandas' string dtype, which would turn None into NaN
    out["warning"] = pd.Series(warnings, index=out.index, dtype=object)


def _unseen_condition_warnings(
    normalizer: ConditionNormalizer, raw_score: str, cond: pd.DataFrame, decision: str
) -> list[str | None]:
    """A warning for each window whose condition the normalizer never saw healthy, else None."""
    known = normalizer.stats[raw_score]
    return [
        None
        if key in known
        else (
            f"condition {key} (DOC|feed|material) was not seen healthy in training: "
            f"{decision} compares the window with all healthy windows"
        )
        for key in condition_keys(cond)
    ]


class MillDetector(mlflow.pyfunc.PythonModel):
    """Pyfunc wrapper: artifacts `keras_model` (.keras) and `config` (JSON of `detector_config`).

    Loaded by MLflow's scoring server (`mlflow models serve`) it also limits requests: the body
    to $MILLVAE_MAX_BODY_BYTES, the windows to $MILLVAE_MAX_WINDOWS; errors are one line and
    scores that are not computed are None (JSON null, not the bare NaN strict parsers refuse).
    """

    def load_context(self, context: Any) -> None:
        # importing millvae.model.vae registers BetaVAE (and keras-tcn's TCN) with Keras
        import keras

        import millvae.model.vae

        millvae.model.vae.warm_keras_saving()
        with open(context.artifacts["config"], encoding="utf-8") as f:
            self.config = json.load(f)
        # no limit in process: the caller owns its data; a server takes anyone's
        self.served = SCORING_APP_MODULE in sys.modules
        self.max_windows = _env_limit(MAX_WINDOWS_ENV, MAX_WINDOWS) if self.served else None
        if self.served:
            _install_request_guard(_env_limit(MAX_BODY_ENV, MAX_BODY_BYTES), self.config)
        self.keras_model = keras.models.load_model(context.artifacts["keras_model"], compile=False)

    # MLflow 3 reads the hint of model_input: pd.DataFrame means "no schema from hints" (the
    # signature is given); no hint or a Union makes it warn. Arrays are accepted all the same.
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        """Scores per window; bad input raises MlflowException (HTTP 400 when served).

        model_input: the DataFrame of the signature or, in process, an array [n, window, signal].
        """
        try:
            out = score_raw(
                self.keras_model,
                self.config,
                model_input,
                max_windows=getattr(self, "max_windows", None),
            )
        except MillvaeError as exc:
            error = MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE)
            # MLflow's server rewrites .message to put a dump of the data ahead; the guard
            # answers with this line instead
            error.millvae_message = str(exc)
            raise error from None
        if getattr(self, "served", False):
            # MLflow writes NaN as a bare NaN token, which strict JSON parsers refuse; None
            # becomes null (the _cond and _smooth scores can be missing, and warning)
            for c in out.columns:
                if out[c].isna().any():
                    out[c] = out[c].astype(object).where(out[c].notna(), None)
        return out


def _env_limit(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise MillvaeError(f"{name}: expected a whole number >= 1; got {raw!r}")
    return int(raw)


def _install_request_guard(max_body_bytes: int, config: dict) -> bool:
    """Put `_guard_invocations` around the /invocations endpoint of the server being built.

    MLflow 3.17 exposes no body limit (uvicorn has none either) and reads the whole body before
    the model sees it. Its app module loads the model first and then builds the app, applying
    `scoring_server._async_catch_mlflow_exception` to the endpoint, so a wrapper set here lands
    inside it. Returns False, with a warning, where that function is missing (another MLflow):
    the window limit of `predict` still holds there.
    """
    from mlflow.pyfunc import scoring_server

    catch = getattr(scoring_server, "_async_catch_mlflow_exception", None)
    if catch is None:
        _logger.warning(
            "millvae: this MLflow's scoring server has no _async_catch_mlflow_exception; request "
            "bodies are not limited and errors keep MLflow's form"
        )
        return False
    if getattr(catch, "millvae_guard", False):  # a second load in the same worker
        return True

    def catch_guarded(endpoint: Any) -> Any:
        return catch(_guard_invocations(endpoint, max_body_bytes, config))

    catch_guarded.millvae_guard = True
    scoring_server._async_catch_mlflow_exception = catch_guarded
    _logger.info("millvae: request bodies limited to %d bytes", max_body_bytes)
    return True


def _guard_invocations(endpoint: Any, max_body_bytes: int, config: dict) -> Any:
    """The endpoint with a body limit (HTTP 413) and one-line errors (no data dump, no trace)."""
    from starlette.requests import Request
    from starlette.responses import Response

    def too_large(got: str) -> Response:
        message = (
            f"request: expected a body of at most {max_body_bytes} bytes (the server's "
            f"{MAX_BODY_ENV}); got {got}"
        )
        content = json.dumps({"error_code": "REQUEST_LIMIT_EXCEEDED", "message": message})
        return Response(content, status_code=413, media_type="application/json")

    @functools.wraps(endpoint)  # FastAPI reads the endpoint's signature through __wrapped__
    async def guarded(request: Any) -> Any:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            return too_large(f"Content-Length {declared}")  # nothing of it read
        chunks, size = [], 0
        async for chunk in request.stream():  # a chunked body: stop reading past the limit
            size += len(chunk)
            if size > max_body_bytes:
                return too_large(f"a longer body (stopped reading at {size} bytes)")
            chunks.append(chunk)
        body, replayed = b"".join(chunks), False

        async def receive() -> dict:
            nonlocal replayed
            if replayed:
                return await request.receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            return await endpoint(Request(request.scope, receive))
        except MlflowException as exc:
            line = _one_line(exc, config)
            _logger.info("millvae: refused a request: %s", line)
            # error_code is the code's name here; the constructor takes its number
            known = exc.error_code in ErrorCode.keys()
            code = ErrorCode.Value(exc.error_code) if known else BAD_REQUEST
            raise MlflowException(line, error_code=code) from None

    return guarded


_MISSING_INPUTS = re.compile(r"Model is missing inputs \[(.*?)\]")
_JSON_ERROR = re.compile(r"JSONDecodeError\('(.*?)'\)")
_NOT_CONVERTED = re.compile(r"Failed to convert column (.+?) to type '\w+'\. Error: '\w+\((.*)\)'")
_FORMAT_KEYS = "dataframe_split, dataframe_records, inputs or instances"


def _one_line(exc: MlflowException, config: dict) -> str:
    """One line for an error of the scoring server: ours as raised, MLflow's without its dumps."""
    own = getattr(exc, "millvae_message", None)
    if own:
        return own
    text = str(exc.message)
    # MLflow puts the data it got (a DataFrame repr), then the schema, ahead of the reason
    if text.startswith("Failed to predict data '") and "'. \nError: " in text:
        text = text.rpartition("'. \nError: ")[2]
    if text.startswith("Failed to enforce schema of data '") and "' with schema '" in text:
        text = text.partition("' with schema '")[2].partition("'. Error: ")[2] or text
    if missing := _MISSING_INPUTS.search(text):
        return (
            f"input: expected columns {', '.join(config['signal_names'])} (optionally "
            f"{', '.join(CONDITION_COLUMNS)}); missing {missing.group(1).replace(chr(39), '')}"
        )
    if failed := _NOT_CONVERTED.search(text):
        column, reason = failed.group(1), failed.group(2)
        if len(reason) > 1 and reason[0] == reason[-1] and reason[0] in "'\"":
            reason = reason[1:-1]  # the repr's quotes
        return f"input: expected numbers in column {column!r}; got something else ({reason})"
    if "'DataFrame' object has no attribute 'dtype'" in text:
        # MLflow's schema check picks a column by name; a name given twice picks a DataFrame
        return "input: expected each column once; got a column name twice"
    if text.startswith("Failed to parse input as a Pandas DataFrame"):  # CSV or Parquet
        reason = text.partition(" Error: ")[2].strip().removeprefix("'").removesuffix("'")
        return f"request: expected a table pandas reads as numbers; got an error ({reason})"
    if "Ensure that input is a valid JSON formatted string" in text:
        found = _JSON_ERROR.search(text)
        reason = found.group(1) if found else "not parsed"
        return f"request: expected a JSON object; got invalid JSON ({reason})"
    if "The input must be a JSON dictionary with exactly one of the input fields" in text:
        got = text.partition(". Received ")[2].partition(". IMPORTANT:")[0].rstrip(".")
        got = got or "something else"
        return f"request: expected a JSON object with exactly one of {_FORMAT_KEYS}; got {got}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = f"request: {lines[0].removeprefix('Invalid input. ')}" if lines else "request: refused"
    return line if len(line) <= 400 else line[:397] + "..."


def pip_requirements() -> list[str]:
    """Exact installed versions (skips MLflow's slow requirement inference)."""
    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={importlib_metadata.version(name)}")
        except importlib_metadata.PackageNotFoundError:
            out.append(name)
    return out


def detector_signature(config: dict) -> Any:
    """The detector's MLflow signature: raw signals (condition columns optional) in; every score,
    the decision score, its threshold, the decision and a warning out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    signals = list(config["signal_names"])
    needs_conditions = "condition_scale" in config  # a conditional β-VAE reads them
    smoothed = "smoothing" in config
    inputs = Schema(
        [ColSpec("double", s) for s in signals]
        + [ColSpec("double", c, required=needs_conditions) for c in CONDITION_COLUMNS]
        # a cut is numbered: MLflow refuses an int64 column declared double ("not safely")
        + ([ColSpec("long", "cut", required=False)] if smoothed else [])
        + ([ColSpec("double", "smooth_start", required=False)] if smoothed else [])
    )
    score_cols = ["mse", "kl", "mse_cond", "kl_cond", *[f"mse_{s}" for s in signals]]
    if "pca" in config:
        score_cols += list(COMBINED_ONLY)
    if smoothed:
        score_cols.append(str(config["decision_score"]))
    outputs = Schema(
        [ColSpec("double", c) for c in [*score_cols, "score"]]
        + [ColSpec("string", "score_name"), ColSpec("double", "threshold")]
        + [ColSpec("string", "decision"), ColSpec("boolean", "is_anomaly")]
        + [ColSpec("string", "warning", required=False)]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


def example_frame(
    example_raw: np.ndarray, config: dict, conditions: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Raw windows [n, window, signal] as the detector's input DataFrame (window after window)."""
    windows, cond = raw_windows(np.asarray(example_raw), config, conditions)
    n, w, _ = windows.shape
    df = pd.DataFrame(windows.reshape(n * w, -1), columns=list(config["signal_names"]))
    if cond is not None:
        for c in CONDITION_COLUMNS:
            df[c] = np.repeat(cond[c].to_numpy(), w)
    if "smoothing" in config:
        df["cut"] = 1  # the windows of one cut
    return df
