"""The registered model: an MLflow pyfunc detector turning raw sensor windows into scores and flags.

It bundles the Keras β-VAE (`.keras`), the min-max scaler fitted on the training split, the
condition normalizer and the thresholds chosen on validation (one JSON file). Scores come from the
same functions the training run evaluates with (`millvae.scoring`), so a served window gets exactly
the score the run's metrics were computed from.

Input (the signature is column-based): a DataFrame with one column per signal, named as in
training (e.g. smcAC, smcDC, vib_table, vib_spindle, AE_table, AE_spindle), raw (unscaled) values,
where each run of `window_size` consecutive rows is one window; optional columns DOC, feed and
material give the cutting condition and must be constant within a window.

Output: one row per window with

    mse, kl                  reconstruction error and KL divergence from the prior
    mse_cond, kl_cond        the same relative to healthy windows of the window's condition (NaN
                             when no condition is given)
    mse_<signal>             reconstruction error per signal
    score, threshold         the decision score (named in `decision`) and its validation threshold
    decision                 e.g. "kl_cond", or "kl (no condition given)" when the decision score is
                             condition-aware and the input has no condition columns
    is_anomaly               score >= threshold

Ways to call it:
- `mlflow.pyfunc.load_model(uri).predict(df)` with the DataFrame above; `mlflow models serve`
  takes the same as a `dataframe_split` JSON body. MLflow 3.17 enforces the column signature
  before the model runs: it refuses a NumPy array (a 3-D array cannot become a DataFrame, a 2-D
  one lacks the column names), reports missing signal columns itself ("Model is missing inputs
  [...]"), and drops columns the signature does not name (with a warning).
- `loaded.unwrap_python_model().predict(None, x)` or `score_raw(keras_model, config, x)` in process:
  x may also be an array [n, window, signal] or [window, signal] of raw values (optionally with
  `conditions`, one row per window, for `score_raw`).
Bad input (wrong columns, shape, row count, NaN/inf, a condition that varies within a window) raises
a one-line error: MillvaeError from `score_raw`, MlflowException (INVALID_PARAMETER_VALUE) from
`predict`. Behind `mlflow models serve` that is HTTP 400 with a JSON body whose `message` ends in
the line "Error: <the one-line message>" (the server puts a dump of the data it got before it).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

# Before anything imports TensorFlow (the model server imports this module first).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

import millvae
from millvae.errors import MillvaeError
from millvae.prep import MinMaxScaler
from millvae.scoring import CONDITION_COLUMNS, ConditionNormalizer, window_scores

__all__ = [
    "MillDetector",
    "detector_config",
    "example_frame",
    "log_detector",
    "raw_windows",
    "score_raw",
]

CONFIG_FORMAT = "millvae-detector/1"
DECISION_SCORES = ("mse", "kl", "mse_cond", "kl_cond")
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


def detector_config(
    *,
    scaler: MinMaxScaler,
    thresholds: dict[str, float],
    normalizer: ConditionNormalizer,
    decision_score: str,
    score_samples: int = 0,
    data_source: str = "real",
    score_seed: int = 0,
) -> dict:
    """Everything besides the Keras model that the detector needs, as a JSON-able dict.

    `thresholds` maps score names to thresholds chosen on validation; it must hold the decision
    score and, for a condition-aware one, its raw counterpart too (used when a request carries no
    condition). Non-finite thresholds of other scores are dropped. `score_samples`/`score_seed`
    are `window_scores`' samples/seed; with samples > 0 the noise is drawn per request, so served
    scores equal the run's evaluation exactly only for deterministic scoring (samples = 0).
    """
    if decision_score not in DECISION_SCORES:
        raise MillvaeError(
            f"decision_score: expected one of {', '.join(DECISION_SCORES)}; got {decision_score!r}"
        )
    needed = [decision_score]
    if decision_score.endswith("_cond"):
        needed.append(_raw_name(decision_score))
        if _raw_name(decision_score) not in normalizer.stats:
            raise MillvaeError(
                f"normalizer: expected statistics for {_raw_name(decision_score)!r} (the decision "
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
    return {
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
    return score.removesuffix("_cond")


def _fmt(values) -> str:
    return ", ".join(map(str, values)) if len(values) else "none"


def _finite_or_raise(values: np.ndarray, what: str, window_size: int, by_row: bool) -> None:
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
        f"first at {where}"
    )


def _windows_from_frame(
    df: pd.DataFrame, signals: list[str], window_size: int
) -> tuple[np.ndarray, pd.DataFrame | None]:
    columns = [str(c) for c in df.columns]
    if len(set(columns)) < len(columns):
        twice = sorted({c for c in columns if columns.count(c) > 1})
        raise MillvaeError(f"input: expected each column once; got {', '.join(twice)} twice")
    missing = [s for s in signals if s not in columns]
    unknown = [c for c in columns if c not in signals and c not in CONDITION_COLUMNS]
    if missing or unknown:
        raise MillvaeError(
            f"input: expected columns {', '.join(signals)} (optionally "
            f"{', '.join(CONDITION_COLUMNS)}); missing {_fmt(missing)}; unknown {_fmt(unknown)}"
        )
    df = df.set_axis(columns, axis=1)
    n_rows = len(df)
    if n_rows == 0 or n_rows % window_size:
        raise MillvaeError(
            f"input: expected a multiple of {window_size} rows (each {window_size} consecutive "
            f"rows form one window); got {n_rows} rows"
        )
    values = _numeric(df, signals)
    _finite_or_raise(values, "the signal columns", window_size, by_row=True)
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
    cond = _numeric(df, list(CONDITION_COLUMNS))
    _finite_or_raise(cond, "the condition columns", window_size, by_row=True)
    per_window = cond.reshape(-1, window_size, len(CONDITION_COLUMNS))
    varies = (per_window != per_window[:, :1, :]).any(axis=1)
    if varies.any():
        w, j = (int(i) for i in np.argwhere(varies)[0])
        seen = np.unique(per_window[w, :, j])
        raise MillvaeError(
            f"input: expected {CONDITION_COLUMNS[j]} constant within each window of {window_size} "
            f"rows; window {w} has {', '.join(f'{v:g}' for v in seen[:4])}"
        )
    conditions = pd.DataFrame(per_window[:, 0, :], columns=list(CONDITION_COLUMNS))
    return raw, conditions


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
    arr: np.ndarray, signals: list[str], window_size: int
) -> tuple[np.ndarray, None]:
    expected = f"[n, {window_size}, {len(signals)}] or [{window_size}, {len(signals)}]"
    shape = tuple(arr.shape)
    if arr.ndim == 2 and shape == (window_size, len(signals)):
        arr = arr[None]
    elif not (arr.ndim == 3 and shape[1:] == (window_size, len(signals)) and shape[0] > 0):
        raise MillvaeError(
            f"input: expected an array {expected} (signals {', '.join(signals)}); got shape "
            f"{list(shape)}"
        )
    if not (np.issubdtype(arr.dtype, np.number) and not np.issubdtype(arr.dtype, np.bool_)):
        raise MillvaeError(f"input: expected an array of numbers; got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    _finite_or_raise(arr, "the array", window_size, by_row=False)
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
    raw: Any, config: dict, conditions: pd.DataFrame | None = None
) -> tuple[np.ndarray, pd.DataFrame | None]:
    """Validate an input and return raw windows [n, window, signal] and the conditions (or None)."""
    signals, window_size = list(config["signal_names"]), int(config["window_size"])
    if isinstance(raw, pd.DataFrame):
        if conditions is not None:
            raise MillvaeError(
                "conditions: expected them as DOC, feed, material columns of the input DataFrame; "
                "got a separate conditions argument too"
            )
        return _windows_from_frame(raw, signals, window_size)
    if isinstance(raw, np.ndarray | list):
        arr, _ = _windows_from_array(np.asarray(raw), signals, window_size)
        cond = None if conditions is None else _check_conditions(conditions, len(arr))
        return arr, cond
    raise MillvaeError(
        f"input: expected a DataFrame with columns {', '.join(signals)} or an array "
        f"[n, {window_size}, {len(signals)}]; got {type(raw).__name__}"
    )


def score_raw(
    keras_model: Any, config: dict, raw: Any, conditions: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Scores and decisions for raw windows (see the module docstring for inputs and columns).

    Scales with the stored scaler, then `window_scores` and `ConditionNormalizer.transform`: the
    same path as the training run's evaluation.
    """
    windows, cond = raw_windows(raw, config, conditions)
    signals = list(config["signal_names"])
    scaler = MinMaxScaler.from_dict(config["scaler"])
    # training scaled float32 windows in float32; doing the same keeps scores identical
    x = scaler.transform(windows.astype(np.float32))
    scores = window_scores(
        keras_model,
        x,
        signals,
        samples=int(config.get("score_samples", 0)),
        seed=int(config.get("score_seed", 0)),
    )
    normalizer = ConditionNormalizer.from_dict(config["normalizer"])
    cond_scores = normalizer.transform(scores, cond)

    out = pd.DataFrame({"mse": scores["mse"], "kl": scores["kl"]})
    for name in ("mse_cond", "kl_cond"):
        out[name] = cond_scores[name] if name in cond_scores else np.nan
    for s in signals:
        out[f"mse_{s}"] = scores[f"mse_{s}"]

    decision = str(config["decision_score"])
    thresholds = config["thresholds"]
    used = decision
    if decision.endswith("_cond") and cond is None:
        used = _raw_name(decision)
        label = f"{used} (no condition given)"
    else:
        label = decision
    score = out[used].to_numpy(dtype=float)
    if np.isnan(score).any():
        raise MillvaeError(
            f"model: expected finite {used} scores; got NaN for "
            f"{int(np.isnan(score).sum())} of {len(score)} windows (a broken model?)"
        )
    out["score"] = score
    out["threshold"] = float(thresholds[used])
    out["decision"] = label
    out["is_anomaly"] = score >= float(thresholds[used])
    return out


class MillDetector(mlflow.pyfunc.PythonModel):
    """Pyfunc wrapper: artifacts `keras_model` (.keras) and `config` (JSON of `detector_config`)."""

    def load_context(self, context: Any) -> None:
        # importing millvae.model registers BetaVAE (and keras-tcn's TCN) with Keras
        import keras

        import millvae.model

        millvae.model.warm_keras_saving()
        with open(context.artifacts["config"], encoding="utf-8") as f:
            self.config = json.load(f)
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
            return score_raw(self.keras_model, self.config, model_input)
        except MillvaeError as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None


def pip_requirements() -> list[str]:
    """Exact installed versions (skips MLflow's slow requirement inference)."""
    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={importlib_metadata.version(name)}")
        except importlib_metadata.PackageNotFoundError:
            out.append(name)
    return out


def _signature(config: dict):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    signals = list(config["signal_names"])
    inputs = Schema(
        [ColSpec("double", s) for s in signals]
        + [ColSpec("double", c, required=False) for c in CONDITION_COLUMNS]
    )
    score_cols = ["mse", "kl", "mse_cond", "kl_cond", *[f"mse_{s}" for s in signals]]
    outputs = Schema(
        [ColSpec("double", c) for c in [*score_cols, "score", "threshold"]]
        + [ColSpec("string", "decision"), ColSpec("boolean", "is_anomaly")]
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
    return df


class NoReloadFlavor:
    """A flavor module for `mlflow.models.Model.log` without MLflow's reload of the input example.

    `Model.log` reads `validate_serving_input` from the kwargs it forwards to the flavor's
    `save_model`, which does not take it; it is dropped here.
    """

    def __init__(self, module: Any) -> None:
        self._module = module
        self.__name__ = module.__name__

    def save_model(self, *, validate_serving_input: bool = False, **kwargs: Any) -> None:
        self._module.save_model(**kwargs)


def log_detector(
    keras_model: Any,
    config: dict,
    *,
    example_raw: np.ndarray,
    name: str = "detector",
    example_conditions: pd.DataFrame | None = None,
) -> Any:
    """Log the pyfunc detector to the active MLflow run; returns MLflow's ModelInfo.

    `example_raw` holds raw windows [n, window, signal]; the first two become the input example
    (with `example_conditions`, one row per window, as DOC/feed/material columns when given).
    """
    import mlflow

    if mlflow.active_run() is None:
        raise MillvaeError("log_detector: expected an active MLflow run; got none")
    example_raw = np.asarray(example_raw)
    cond = None if example_conditions is None else example_conditions.iloc[:2]
    example = example_frame(example_raw[:2], config, cond)
    # MLflow's check of the input example reloads the files just written and traces the reloaded
    # model: about half a second per search trial, spent deserialising what is in memory. The
    # example is scored here instead, through the same function `predict` calls; loading and
    # serving logged detectors is what the tests check.
    score_raw(keras_model, config, example_raw[:2], cond)

    from millvae.model import warm_keras_saving

    with tempfile.TemporaryDirectory(prefix="millvae-detector-") as tmp:
        tmp_path = Path(tmp)
        warm_keras_saving()
        keras_model.save(tmp_path / KERAS_FILE)
        (tmp_path / CONFIG_FILE).write_text(json.dumps(config, indent=1), encoding="utf-8")
        # a clean copy of the package (no __pycache__) so the model loads where millvae is absent
        package = Path(millvae.__file__).resolve().parent
        code = tmp_path / "code" / "millvae"
        shutil.copytree(package, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        model_code = tmp_path / "detector_model.py"
        model_code.write_text(MODEL_CODE, encoding="utf-8")
        from mlflow.models import Model

        return Model.log(
            artifact_path=None,
            name=name,
            flavor=NoReloadFlavor(mlflow.pyfunc),
            validate_serving_input=False,
            flavor_name="pyfunc.ModelFromCode",  # what mlflow.pyfunc.log_model passes
            python_model=str(model_code),
            artifacts={
                "keras_model": str(tmp_path / KERAS_FILE),
                "config": str(tmp_path / CONFIG_FILE),
            },
            code_paths=[str(code)],
            signature=_signature(config),
            input_example=example,
            pip_requirements=pip_requirements(),
        )
