"""The one place in the library that writes to MLflow. This module: a run's life, its params
once, the per-epoch logger, tags, metrics (under their sections, see `metric_groups`), artifacts,
the Keras model and the pyfunc detector. Beside it: `store` (a sqlite store made ready before
use), `registry` (Model Registry versions and aliases) and `search` (what a hyperparameter search
keeps in the store: its parent run, claims, trials).

Everything else computes and returns; entry points (`train`, `repeat`, `baseline`, `register`,
`search`) call in here to record what they computed. `tests/test_tracking_only.py` checks that no
other module calls MLflow's writing API.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.models import Model, infer_signature
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags

import millvae
from millvae.config import TrainConfig
from millvae.data.prepare import Prepared
from millvae.detector import (
    CONFIG_FILE,
    KERAS_FILE,
    MODEL_CODE,
    detector_signature,
    example_frame,
    pip_requirements,
    score_raw,
)
from millvae.errors import MillvaeError
from millvae.metric_groups import flat, grouped
from millvae.tracking.store import prepare_store

# mlflow's generated run names look like "bold-cat-123"; only those are replaced by ours
_GENERATED_NAME = re.compile(r"^[a-z]+-[a-z]+-\d+$")
PROTOCOL_TAGS = {
    "window": "seed protocol: random stratified window split (leaks cuts across splits)",
    "case": "leak-free: whole tools per split, failing tools divided between val and test",
    "cut": "whole cuts per split, stratified by tool class",
    "casefold": "leak-free: tool folds, this fold's failing tools tested, the others validate",
}


# ----------------------------------------------------------------------------------------------
# a run's life


@contextmanager
def tracked_run(
    cfg: TrainConfig,
    *,
    nested: bool = False,
    tags: dict | None = None,
    run_name: str | None = None,
    experiment_id: str | None = None,
) -> Iterator:
    """Start (or continue, under `mlflow run`) a run; any failure ends it FAILED with the reason.

    Under `mlflow run`, MLFLOW_RUN_ID names a run that already exists and holds the -P values as
    params; we continue that run rather than creating one.
    """
    prepare_store()  # two commands on a new sqlite store: one creates it, the other waits
    run_name = run_name or cfg.run_name()
    existing = os.environ.get("MLFLOW_RUN_ID")
    if experiment_id is not None:
        # a search trial: always a new run in the search's experiment, never the driver's run
        run = _start_new_run(experiment_id, run_name, tags)
    elif existing and not nested:
        run = mlflow.start_run(run_id=existing)
        exp = mlflow.get_experiment(run.info.experiment_id)
        if exp is not None and exp.name != cfg.experiment:
            mlflow.set_tag("millvae.experiment_requested", cfg.experiment)
            print(
                f"millvae: note: `mlflow run` created this run in experiment {exp.name!r}; "
                f"pass --experiment-name {cfg.experiment} to `mlflow run` to file it there",
                file=sys.stderr,
            )
    elif nested and mlflow.active_run() is not None:
        # children live beside their parent, wherever `mlflow run` put it
        parent = mlflow.active_run()
        run = _start_new_run(parent.info.experiment_id, run_name, tags, parent.info.run_id)
    else:
        run = _start_new_run(mlflow.set_experiment(cfg.experiment).experiment_id, run_name, tags)
    try:
        if _GENERATED_NAME.match(run.info.run_name or ""):
            mlflow.set_tag("mlflow.runName", run_name)
        yield run
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt | SystemExit) else "FAILED"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        try:
            mlflow.set_tag("millvae.error", f"{type(exc).__name__}: {reason}"[:5000])
        finally:
            mlflow.end_run(status=status)
        raise
    else:
        mlflow.end_run(status="FINISHED")


def _start_new_run(
    experiment_id: str, run_name: str, tags: dict | None, parent_id: str | None = None
):
    """A new run, created explicitly and then made active.

    `mlflow.start_run()` without a run id picks up MLFLOW_RUN_ID, which `mlflow run` sets to the
    entry point's own run: under `mlflow run -e repeat` the first "child" was the parent itself.
    """

    all_tags = {**(tags or {}), "mlflow.runName": run_name}
    if parent_id is not None:
        all_tags["mlflow.parentRunId"] = parent_id
    # the source/user/git tags start_run would add
    created = mlflow.MlflowClient().create_run(experiment_id, tags=resolve_tags(all_tags))
    return mlflow.start_run(run_id=created.info.run_id, nested=parent_id is not None)


def log_params_once(params: Mapping[str, Any]) -> None:
    """Log params, skipping keys `mlflow run` already logged (a param's value can't change)."""
    run = mlflow.active_run()
    have = mlflow.get_run(run.info.run_id).data.params
    todo = {k: v for k, v in params.items() if k not in have}
    if todo:
        mlflow.log_params(todo)


def run_metrics(run_id: str) -> dict[str, float]:
    """A finished run's figures under their own names (`metric_groups.flat`)."""
    return flat(mlflow.get_run(run_id).data.metrics)


def epoch_logger():
    import keras

    class MlflowEpochLogger(keras.callbacks.Callback):
        """Per-epoch metrics to MLflow with step=epoch (1-based, as Keras prints them)."""

        def on_epoch_begin(self, epoch, logs=None):
            self._t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            # non-finite values are logged too (MLflow stores inf as the largest float): an early
            # blow-up of the validation KL is worth seeing, not hiding
            metrics = {k: float(v) for k, v in (logs or {}).items()}
            metrics["epoch_seconds"] = time.perf_counter() - self._t0
            metrics["learning_rate"] = float(self.model.optimizer.learning_rate)
            mlflow.log_metrics(metrics, step=epoch + 1)

    return MlflowEpochLogger()


def fail_external_run(message: str) -> None:
    """End the run `mlflow run` made for us FAILED with the reason, if it is still RUNNING."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    try:
        client = MlflowClient()
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "millvae.error", message[:5000])
            client.set_terminated(run_id, status="FAILED")
    except Exception as exc:  # the store itself may be what failed
        print(f"millvae: could not mark run {run_id} FAILED: {exc}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# what a run records


def start_record(params: Mapping[str, Any], model_type: str) -> None:
    """The run's params (those `mlflow run` did not log already) and what kind of run it is."""
    log_params_once(params)
    mlflow.set_tags({"millvae.version": millvae.__version__, "model_type": model_type})


def set_tags(tags: Mapping[str, Any]) -> None:
    """Tags on the active run."""
    mlflow.set_tags(dict(tags))


def log_metrics(metrics: Mapping[str, float], model_id: str | None = None) -> None:
    """End-of-run figures under their sections (`metric_groups`), linked to a logged model."""
    mlflow.log_metrics(grouped(metrics), model_id=model_id)


def log_files(folder: Path, where: Mapping[str, str | None]) -> None:
    """Files of `folder` as artifacts; `where` maps a name (or glob) to its artifact folder."""
    for pattern, artifact_path in where.items():
        for path in sorted(folder.glob(pattern)):
            mlflow.log_artifact(str(path), artifact_path)


def log_evaluation(ev: Any, cfg: TrainConfig, folder: Path, *, metrics: bool = True) -> None:
    """A detection evaluation: its tags, the files `detect.report.write_outputs` wrote to
    `folder`, and (unless the caller links them to a model later) its metrics."""
    if metrics:
        log_metrics(ev.metrics)
    mlflow.set_tags(
        {
            "protocol": PROTOCOL_TAGS[cfg.split],
            "decision_score": ev.decision_score,
            "positive_class": cfg.positive,
        }
    )
    log_files(folder, {"*.png": "plots", "window_scores.csv.gz": "scores", "thresholds.json": None})


def log_data(p: Prepared) -> None:
    """Where the run's data came from (tags, the Dataset link) and its window and cut counts."""
    mlflow.set_tags(
        {
            "data_source": p.data_source,
            "data_sha256": p.data_sha256,
            "data_path": p.data_path,
            "signals_used": ",".join(p.signal_names),
            "regions_from": p.regions_from,
            "dropped_records": ",".join(map(str, sorted(p.dropped))) or "none",
        }
    )
    if p.data_source == "synthetic":
        mlflow.set_tag("millvae.synthetic_data", "true: trained on the SYNTHETIC milling simulator")
    if p.labels_path:
        mlflow.set_tags({"labels_path": p.labels_path, "labels_sha256": p.labels_sha256})
    _log_dataset(p)
    mlflow.log_metrics(grouped({k: float(v) for k, v in p.counts().items()}))


def _log_dataset(p: Prepared) -> None:
    """The run's Dataset column in `mlflow ui`: the data file's name, source and digest."""

    if not p.data_path:
        return
    name = f"{Path(p.data_path).name} ({p.data_source})"
    # the store keeps 36 characters of a digest; the full sha256 is the data_sha256 tag
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": all of them local
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(p.data_path)
    dataset = MetaDataset(source, name=name, digest=p.data_sha256[:36])
    # Search workers starting trials on the same data together both insert the experiment's one
    # dataset row; the loser's UNIQUE violation means the row exists: link to it on a retry.
    for attempt in range(3):
        try:
            mlflow.log_input(dataset, context="training")
            return
        except Exception as exc:  # the store's IntegrityError arrives wrapped in MlflowException
            if attempt == 2 or "UNIQUE" not in str(exc).upper():
                print(f"millvae: warning: dataset not linked to the run: {exc}", file=sys.stderr)
                return
            time.sleep(0.2 * (attempt + 1))


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


def log_keras_model(model, prepared: Prepared, inputs: np.ndarray | None = None) -> None:
    """The Keras model with signature, input example and the scaler in its MLmodel metadata;
    `inputs`: the windows as the model reads them, where not `prepared.x` (a conditional
    model's, its condition channels after the signals)."""
    import mlflow.tensorflow  # imports TensorFlow: only once a model exists

    from millvae.model.vae import CUSTOM_OBJECTS, warm_keras_saving  # TensorFlow, see above

    warm_keras_saving()
    x = prepared.x if inputs is None else inputs
    example = x[prepared.mask("val")][:2]
    if len(example) == 0:
        example = x[prepared.mask("train")][:2]
    signature = infer_signature(example, np.asarray(model(example, training=False)))
    # no MLflow serving check: it loads the files back and predicts the example (about 1 s per
    # model, a search trial's time spent deserialising what is in memory); the example was just
    # run through the model above, and the tests load and serve logged models
    Model.log(
        artifact_path=None,
        name="model",
        flavor=NoReloadFlavor(mlflow.tensorflow),
        model=model,
        validate_serving_input=False,
        signature=signature,
        input_example=example,
        custom_objects=CUSTOM_OBJECTS,
        code_paths=[str(Path(millvae.__file__).parent)],
        pip_requirements=pip_requirements(),
        metadata={
            "millvae_scaler": prepared.scaler.to_dict(),
            "data_source": prepared.data_source,
            "data_sha256": prepared.data_sha256,
            "input": "min-max scaled windows [n, window_size, n_signals (+ 3 scaled DOC, feed, "
            "material when conditional)]; see millvae_scaler",
        },
    )


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

    from millvae.model.vae import warm_keras_saving  # TensorFlow: only once a model exists

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
            signature=detector_signature(config),
            input_example=example,
            pip_requirements=pip_requirements(),
        )
