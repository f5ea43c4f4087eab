"""One β-VAE training = one MLflow run. Shared by the `main` entry point and the search."""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import millvae
from millvae.config import TrainConfig
from millvae.data.prepare import Prepared, prepare, why_no_detection
from millvae.errors import MillvaeError
from millvae.metric_groups import grouped
from millvae.quiet import import_tensorflow

# mlflow's generated run names look like "bold-cat-123"; only those are replaced by ours
_GENERATED_NAME = re.compile(r"^[a-z]+-[a-z]+-\d+$")
EPOCH_METRICS = ("loss", "reconstruction_loss", "kl_loss", "rounded_accuracy")
MIN_DELTA = 0.0002


@dataclass
class TrainResult:
    run_id: str
    epochs_trained: int
    best_epoch: int
    best_val_loss: float
    training_seconds: float
    history: pd.DataFrame
    model: object
    prepared: Prepared
    evaluation: object = None


def preload() -> None:
    """Import what a training run uses, then keep the garbage collector off it (see
    `millvae.runtime.settle_gc`)."""
    import_tensorflow()
    import mlflow  # noqa: F401

    from millvae.runtime import settle_gc

    settle_gc()


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
    import mlflow

    from millvae.store import prepare_store

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
    import mlflow
    from mlflow.tracking.context.registry import resolve_tags

    all_tags = {**(tags or {}), "mlflow.runName": run_name}
    if parent_id is not None:
        all_tags["mlflow.parentRunId"] = parent_id
    # the source/user/git tags start_run would add
    created = mlflow.MlflowClient().create_run(experiment_id, tags=resolve_tags(all_tags))
    return mlflow.start_run(run_id=created.info.run_id, nested=parent_id is not None)


def log_params_once(cfg: TrainConfig) -> None:
    """Log the config as params, skipping keys `mlflow run` already logged (values can't change)."""
    import mlflow

    run = mlflow.active_run()
    have = mlflow.get_run(run.info.run_id).data.params
    todo = {k: v for k, v in cfg.to_params().items() if k not in have}
    if todo:
        mlflow.log_params(todo)


def _epoch_logger():
    import keras
    import mlflow

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


def build_model(cfg: TrainConfig, n_signals: int):
    """A freshly initialised β-VAE of the run's architecture (seeds Keras with `cfg.seed`)."""
    from millvae.model.vae import build_vae

    return build_vae(
        window_size=cfg.window_size,
        n_signals=n_signals,
        codings_size=cfg.codings_size,
        conv_layers=cfg.conv_layers,
        start_filter_no=cfg.start_filter_no,
        kernel_size=cfg.kernel_size,
        dilations=cfg.dilations,
        final_activation=cfg.final_activation,
        beta=cfg.beta,
        seed=cfg.seed,
        bn_momentum=cfg.bn_momentum,
    )


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Optimizer steps in one epoch (the last batch may be short): what `fit` runs per epoch and
    what the OneCycle schedule counts in."""
    return max(1, math.ceil(n_train / batch_size))


def learning_rate(cfg: TrainConfig, n_train: int):
    """The run's learning rate: a constant, or the OneCycle schedule over optimizer steps."""
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    from millvae.model.vae import OneCycle

    total = cfg.lr_cycle_epochs * steps_per_epoch(n_train, cfg.batch_size)
    return OneCycle(
        start=cfg.learning_rate,
        peak=cfg.lr_max,
        end=cfg.learning_rate / 10.0,
        warmup_steps=round(0.3 * total),
        total_steps=total,
    )


def _train_dataset(x_train: np.ndarray, batch_size: int, seed: int):
    """Training batches reshuffled every epoch (seeded), repeated: fit with `steps_per_epoch`.

    The same epochs as `model.fit(x, batch_size, shuffle=True)`, a different (seeded) order.
    Keras' own pipeline for arrays gathers each batch through an autotuned parallel map and
    prefetch; it measured slower and more variable: 0.50 s against 0.43 s per epoch (median of 12,
    paper's best configuration, real data, two cores).

    Repeated, because Keras makes a new iterator of a finite dataset at each epoch's start and
    another at its end (thrown away unused), each with its prefetch thread and a refilled shuffle
    buffer; in about a third of the epochs the next epoch then waited 0.2-0.5 s before its first
    step. One iterator for the whole fit: seed default on the real data, epochs 2-11 took 0.83 s
    against 1.00 s (two cores). Shuffling before `repeat` keeps each epoch one permutation.

    Without tf.data's autotuning: nothing here is autotuned, and its model thread sleeps in
    periods that grow as the fit goes on; the iterator's teardown at the end of `fit` waited for
    it. Measured with one thread per process, two fits side by side (real data, 5 epochs): 6 of
    12 fits ended 1.5-1.7 s late with the process idle, 0 of 12 without it; stalls of 4-7 s at
    the end of search trials.
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return (
        tf.data.Dataset.from_tensor_slices(x_train)
        .shuffle(len(x_train), seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size)
        .repeat()
        .prefetch(2)
        .with_options(options)
    )


def _validation(x_val: np.ndarray, batch_size: int):
    """A callback that puts `val_*` metrics into each epoch's logs, ahead of the callbacks that
    read them (EarlyStopping, progress, history, MLflow): `validation_data` done by
    `BetaVAE.validate`, whose graph scoring reuses after training (Keras' evaluate traces a
    function of its own, thrown away with the fit: scoring all 11,570 real windows after a fit
    took 1.3-2.0 s this way against 2.1-3.1 s, one AMD core)."""
    import keras

    class Validation(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            metrics = self.model.validate(x_val, batch_size=batch_size)
            if logs is not None:
                logs.update({f"val_{k}": v for k, v in sorted(metrics.items())})

    return Validation()


def _quiet_first_step():
    """A callback that filters fd 2 during the first training step only, when TensorFlow's
    graph passes print oneDNN's DT_INT32 notice (see `millvae.quiet`)."""
    import keras

    from millvae.quiet import StderrFilter

    class QuietFirstStep(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.filter = StderrFilter()

        def on_train_begin(self, logs=None):
            self.filter.start()

        def on_train_batch_end(self, batch, logs=None):
            self.filter.stop()

    return QuietFirstStep()


def fit(cfg: TrainConfig, prepared: Prepared, callbacks: list | None = None, verbose: int = 2):
    """Build and train the β-VAE on healthy training windows; early stop on healthy validation."""
    import_tensorflow()
    import keras

    from millvae.model.vae import FusedAdam
    from millvae.runtime import configure_threads

    configure_threads()  # before the first op; a no-op where the caller already sized the pools
    x_train, x_val = prepared.get("train", slim=True), prepared.get("val", slim=True)
    if len(x_val) == 0:
        raise MillvaeError("split: expected healthy windows in the validation split; found none")
    model = build_model(cfg, len(prepared.signal_names))
    model.compile(optimizer=FusedAdam(learning_rate(cfg, len(x_train))))
    # Created here, eagerly: left to the first traced step, the optimizer's variables are made
    # inside the trace (one small function each) and the step is traced twice, ~2 s per model.
    model.optimizer.build(model.trainable_variables)
    stopper = keras.callbacks.EarlyStopping(
        monitor="val_loss",
        min_delta=MIN_DELTA,
        patience=cfg.earlystop_patience,
        restore_best_weights=True,
        verbose=0,
    )
    train_data = _train_dataset(x_train, cfg.batch_size, cfg.seed)
    quiet = _quiet_first_step()
    t0 = time.perf_counter()
    try:
        hist = model.fit(
            train_data,
            epochs=cfg.epochs,
            steps_per_epoch=steps_per_epoch(len(x_train), cfg.batch_size),
            callbacks=[
                quiet,
                _validation(x_val, cfg.batch_size),  # before the others: they read its val_* logs
                stopper,
                *(callbacks or []),
            ],
            shuffle=False,  # the dataset reshuffles itself; Keras' flag only warns on a dataset
            verbose=verbose,
        )
    finally:
        quiet.filter.stop()  # a first step that raises must not take fd 2 with it
    seconds = time.perf_counter() - t0
    history = pd.DataFrame(hist.history)
    history.insert(0, "epoch", np.arange(1, len(history) + 1))
    # Validation metrics may be inf in the first epochs (BatchNorm's moving statistics have barely
    # moved after a few large batches); only a non-finite training loss or best val loss is fatal.
    if not np.isfinite(history["loss"]).all():
        bad = int(history.loc[~np.isfinite(history["loss"]), "epoch"].iloc[0])
        raise MillvaeError(f"training diverged: loss is not finite at epoch {bad}")
    if not np.isfinite(history["val_loss"]).any():
        raise MillvaeError(
            f"training: expected a finite val_loss in some epoch; all {len(history)} were inf or "
            "nan (in the first epochs BatchNorm's moving statistics lag the weights: train for "
            "more epochs or lower bn_momentum)"
        )
    # the epoch whose weights EarlyStopping restored (gains below min_delta do not count)
    history.attrs["best_epoch"] = int(stopper.best_epoch) + 1
    return model, history, seconds


def train_run(
    cfg: TrainConfig,
    *,
    prepared: Prepared | None = None,
    nested: bool = False,
    tags: dict | None = None,
    verbose: int = 2,
    run_name: str | None = None,
    experiment_id: str | None = None,
) -> TrainResult:
    """Prepare data (unless given), train and log everything to one MLflow run."""
    import_tensorflow()
    import mlflow

    from millvae.detect import plots

    with tracked_run(
        cfg, nested=nested, tags=tags, run_name=run_name, experiment_id=experiment_id
    ) as run:
        log_params_once(cfg)
        mlflow.set_tags({"millvae.version": millvae.__version__, "model_type": "beta_vae"})
        if prepared is None:
            prepared = prepare(cfg)
        _log_data(prepared)
        if run_name is None:  # ours: now the data source is known, name it
            mlflow.set_tag("mlflow.runName", cfg.run_name(prepared.data_source))
        why = why_no_detection(prepared, cfg.positive)
        if why:  # said up front, not discovered as missing metrics after the fit
            warnings.warn(why, stacklevel=2)
            mlflow.set_tag("millvae.no_detection", why)
        model, history, seconds = fit(cfg, prepared, [_epoch_logger()], verbose=verbose)
        best_idx = history.attrs["best_epoch"] - 1
        result = TrainResult(
            run_id=run.info.run_id,
            epochs_trained=len(history),
            best_epoch=best_idx + 1,
            best_val_loss=float(history["val_loss"].iloc[best_idx]),
            training_seconds=seconds,
            history=history,
            model=model,
            prepared=prepared,
        )
        mlflow.log_metrics(
            {
                "epochs_trained": result.epochs_trained,
                "best_epoch": result.best_epoch,
                "best_val_loss": result.best_val_loss,
                "training_seconds": seconds,
                "param_count": int(model.count_params()),
            }
        )
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            history.to_csv(tmp / "history.csv", index=False)
            plots.loss_curves(history, result.best_epoch, tmp / "loss_curves.png")
            (tmp / "scaler.json").write_text(json.dumps(prepared.scaler.to_dict(), indent=2))
            cuts_table(prepared).to_csv(tmp / "cuts.csv")
            mlflow.log_artifact(str(tmp / "cuts.csv"), "data")
            mlflow.log_artifact(str(tmp / "history.csv"))
            mlflow.log_artifact(str(tmp / "loss_curves.png"), "plots")
            mlflow.log_artifact(str(tmp / "scaler.json"))
        log_keras_model(model, prepared)
        result.evaluation = evaluate_run(model, prepared, cfg)
    return result


def evaluate_run(model, prepared: Prepared, cfg: TrainConfig):
    """Score every window, log detection metrics, plots, scores and the pyfunc detector."""
    import mlflow

    from millvae.detect.evaluate import (
        VAE_SCORES,
        evaluate_and_log,
        reconstruction_examples,
        vae_scores,
    )

    t0 = time.perf_counter()
    scores, normalizer = vae_scores(model, prepared, cfg.score_samples, cfg.seed)
    ev = evaluate_and_log(
        scores,
        prepared,
        VAE_SCORES,
        cfg,
        title=f"{cfg.model_name()} | split={cfg.split} | {prepared.data_source} data",
        examples=reconstruction_examples(model, prepared, scores),
        extra_metrics={"scoring_seconds": time.perf_counter() - t0},
        log_metrics=False,
    )
    ev.normalizer = normalizer
    info = None
    try:
        info = _log_detector(model, prepared, cfg, ev)
    finally:
        # Logged after the detector and linked to it, which is what `Model.log` does for the
        # metrics a run already has: it reads the whole history of every metric key of the run
        # to find them (201 queries per trial, about 0.5 s, growing with the epochs); logged
        # before it, these 125 keys were read and written twice.
        model_id = info.model_id if info is not None else None
        mlflow.log_metrics(grouped(ev.metrics), model_id=model_id)
    return ev


def _log_detector(model, prepared: Prepared, cfg: TrainConfig, ev):
    """The pyfunc detector, when validation allows a threshold; its ModelInfo, else None."""
    import mlflow

    from millvae.detector import detector_config, log_detector

    d = ev.decision_score
    if d not in ev.thresholds or d.removesuffix("_cond") not in ev.thresholds:
        # without both classes on validation no threshold can be chosen honestly
        mlflow.set_tag(
            "millvae.detector", "not logged: validation lacks healthy or positive windows"
        )
        return None
    part = "val" if prepared.mask("val").any() else "train"
    pick = np.flatnonzero(prepared.mask(part))[:2]
    config = detector_config(
        scaler=prepared.scaler,
        thresholds=ev.thresholds,
        normalizer=ev.normalizer,
        decision_score=d,
        score_samples=cfg.score_samples,
        data_source=prepared.data_source,
        score_seed=cfg.seed,
    )
    conditions = prepared.windows.iloc[pick][["DOC", "feed", "material"]].reset_index(drop=True)
    return log_detector(
        model,
        config,
        example_raw=prepared.scaler.inverse_transform(prepared.x[pick]),
        example_conditions=conditions,
    )


def cuts_table(p: Prepared) -> pd.DataFrame:
    """One row per cut: labels, region, windows per split ("mixed" cuts leak under split=window)."""
    per_split = p.windows.groupby(["cut_no", "split"]).size().unstack(fill_value=0)
    table = p.cuts.join(per_split.add_prefix("windows_"), how="left")
    splits = p.windows.groupby("cut_no")["split"].agg(
        lambda s: s.iloc[0] if s.nunique() == 1 else "mixed"
    )
    table["split"] = splits
    return table


def _log_data(p: Prepared) -> None:
    import mlflow

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
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

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


def log_keras_model(model, prepared: Prepared) -> None:
    """The Keras model with signature, input example and the scaler in its MLmodel metadata."""
    import mlflow.tensorflow
    from mlflow.models import Model, infer_signature

    from millvae.detector import NoReloadFlavor
    from millvae.detector import pip_requirements as detector_pip_requirements
    from millvae.model.vae import CUSTOM_OBJECTS, warm_keras_saving

    warm_keras_saving()
    example = prepared.get("val")[:2]
    if len(example) == 0:
        example = prepared.get("train")[:2]
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
        pip_requirements=detector_pip_requirements(),
        metadata={
            "millvae_scaler": prepared.scaler.to_dict(),
            "data_source": prepared.data_source,
            "data_sha256": prepared.data_sha256,
            "input": "min-max scaled windows [n, window_size, n_signals]; see millvae_scaler",
        },
    )
