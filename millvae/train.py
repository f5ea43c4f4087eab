"""`millvae train`: one β-VAE training = one MLflow run (the MLproject `main` entry point).

The flow, top to bottom: `main` parses the parameters into a `TrainConfig`; `train_run` prepares
the data (`data.prepare`), builds and fits the β-VAE (`model.vae`, `fit` below), scores every
window and evaluates the detector (`detect.evaluate`), and records all of it in MLflow
(`tracking`, the one module that writes there). The search and `repeat` call `train_run` too.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from millvae import tracking
from millvae.config import (
    PARAM_DEFAULTS,
    PARAM_HELP,
    PARAM_NAMES,
    TrainConfig,
    check_combine,
    make_config,
)
from millvae.data.conditions import CONDITION_COLUMNS, ConditionScale
from millvae.data.prepare import Prepared, prepare, why_no_detection
from millvae.detect import plots
from millvae.detect.evaluate import (
    COMBINED_SCORES,
    VAE_SCORES,
    Evaluation,
    combined_detector_scores,
    evaluate_run,
    vae_scores,
)
from millvae.detect.report import reconstruction_examples, write_outputs
from millvae.detector import detector_config, fallback_scores
from millvae.errors import ArgParser, MillvaeError
from millvae.pipeline import quiet_first_step, training_batches, validation_callback
from millvae.quiet import import_tensorflow
from millvae.runtime import configure_threads, settle_gc

EPOCH_METRICS = ("loss", "reconstruction_loss", "kl_loss", "rounded_accuracy")
MIN_DELTA = 0.0002


def parser() -> ArgParser:
    """`millvae train`'s options: every `TrainConfig` parameter, plus `--quiet`."""
    p = ArgParser(prog="millvae train", description="Train one β-VAE as one MLflow run.")
    for name in PARAM_NAMES:
        p.add_argument(f"--{name}", default=PARAM_DEFAULTS[name], help=PARAM_HELP[name])
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress lines")
    return p


def main(argv: list[str]) -> int:
    """Parse, train one model, say where it went."""
    args = vars(parser().parse_args(argv))
    quiet = args.pop("quiet")
    cfg = make_config(**args)
    preload()
    result = train_run(cfg, verbose=0 if quiet else 2)
    print(
        f"millvae: run {result.run_id} finished: {result.epochs_trained} epochs, best val loss "
        f"{result.best_val_loss:.5f} at epoch {result.best_epoch}, {result.training_seconds:.1f} s"
    )
    return 0


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

    settle_gc()


def build_model(cfg: TrainConfig, n_signals: int):
    """A freshly initialised β-VAE of the run's architecture (seeds Keras with `cfg.seed`)."""
    from millvae.model.vae import ARCHITECTURE, build_vae

    own = ("n_signals", "conditions")
    given = {name: getattr(cfg, name) for name in ARCHITECTURE if name not in own}
    conditions = len(CONDITION_COLUMNS) if cfg.conditional == "true" else 0
    return build_vae(**given, n_signals=n_signals, conditions=conditions)


def model_inputs(cfg: TrainConfig, prepared: Prepared) -> tuple[np.ndarray, ConditionScale | None]:
    """The windows as the model reads them, and the condition scale: `prepared.x` itself, or
    for a conditional model (`conditional=true`) each window with its condition, scaled over the
    training windows, appended as channels."""
    if cfg.conditional != "true":
        return prepared.x, None
    scale = ConditionScale.fit(prepared.windows[prepared.mask("train")])
    return scale.append(prepared.x, prepared.windows), scale


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


def fit(
    cfg: TrainConfig,
    prepared: Prepared,
    callbacks: list | None = None,
    verbose: int = 2,
    inputs: np.ndarray | None = None,
):
    """Build and train the β-VAE on healthy training windows; early stop on healthy validation.
    `inputs`: `model_inputs(cfg, prepared)[0]` where the caller has it already."""
    import_tensorflow()
    import keras

    from millvae.model.vae import FusedAdam

    configure_threads()  # before the first op; a no-op where the caller already sized the pools
    x = model_inputs(cfg, prepared)[0] if inputs is None else inputs
    x_train, x_val = x[prepared.mask("train", slim=True)], x[prepared.mask("val", slim=True)]
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
    train_data = training_batches(x_train, cfg.batch_size, cfg.seed)
    quiet = quiet_first_step()
    t0 = time.perf_counter()
    try:
        hist = model.fit(
            train_data,
            epochs=cfg.epochs,
            steps_per_epoch=steps_per_epoch(len(x_train), cfg.batch_size),
            callbacks=[
                quiet,
                validation_callback(x_val, cfg.batch_size),  # first: others read val_*
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
    """Prepare data (unless given), train, evaluate and record everything in one MLflow run."""
    import_tensorflow()
    with tracking.tracked_run(
        cfg, nested=nested, tags=tags, run_name=run_name, experiment_id=experiment_id
    ) as run:
        tracking.start_record(cfg.to_params(), model_type="beta_vae")
        prepared = prepared if prepared is not None else prepare(cfg)
        _record_data(prepared, cfg, rename=run_name is None)
        inputs, scale = model_inputs(cfg, prepared)
        model, history, seconds = fit(
            cfg, prepared, [tracking.epoch_logger()], verbose=verbose, inputs=inputs
        )
        result = _result(run.info.run_id, model, history, seconds, prepared)
        _record_training(result, inputs)
        result.evaluation = evaluate_model(model, prepared, cfg, (inputs, scale))
    return result


def _record_data(prepared: Prepared, cfg: TrainConfig, rename: bool) -> None:
    """The data's provenance and counts; the run named once its source is known; a warning up
    front (not missing metrics after the fit) where no detection figure can be computed."""
    tracking.log_data(prepared)
    why_not = check_combine(cfg, list(prepared.signal_names))
    if why_not:  # before any training: the data's signals are known only now
        raise MillvaeError(why_not)
    if rename:
        tracking.set_tags({"mlflow.runName": cfg.run_name(prepared.data_source)})
    why = why_no_detection(prepared, cfg.positive)
    if why:
        warnings.warn(why, stacklevel=3)
        tracking.set_tags({"millvae.no_detection": why})


def _result(run_id: str, model, history: pd.DataFrame, seconds: float, prepared: Prepared):
    best_idx = history.attrs["best_epoch"] - 1
    return TrainResult(
        run_id=run_id,
        epochs_trained=len(history),
        best_epoch=best_idx + 1,
        best_val_loss=float(history["val_loss"].iloc[best_idx]),
        training_seconds=seconds,
        history=history,
        model=model,
        prepared=prepared,
    )


def _record_training(result: TrainResult, inputs: np.ndarray) -> None:
    """The fit's figures, history, loss plot, scaler, per-cut table and the Keras model."""
    tracking.log_metrics(
        {
            "epochs_trained": result.epochs_trained,
            "best_epoch": result.best_epoch,
            "best_val_loss": result.best_val_loss,
            "training_seconds": result.training_seconds,
            "param_count": int(result.model.count_params()),
        }
    )
    prepared = result.prepared
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        result.history.to_csv(tmp / "history.csv", index=False)
        plots.loss_curves(result.history, result.best_epoch, tmp / "loss_curves.png")
        (tmp / "scaler.json").write_text(json.dumps(prepared.scaler.to_dict(), indent=2))
        cuts_table(prepared).to_csv(tmp / "cuts.csv")
        tracking.log_files(
            tmp,
            {
                "cuts.csv": "data",
                "history.csv": None,
                "loss_curves.png": "plots",
                "scaler.json": None,
            },
        )
    tracking.log_keras_model(result.model, prepared, inputs)


def evaluate_model(
    model,
    prepared: Prepared,
    cfg: TrainConfig,
    inputs: tuple[np.ndarray, ConditionScale | None] | None = None,
) -> Evaluation:
    """Score every window; record the detection metrics, plots, scores and the pyfunc detector.
    `inputs`: `model_inputs(cfg, prepared)` where the caller has it already."""
    t0 = time.perf_counter()
    references = None
    x, scale = model_inputs(cfg, prepared) if inputs is None else inputs
    if cfg.detector == "combined":
        scores, normalizer, references = combined_detector_scores(
            model, prepared, cfg.score_samples, cfg.seed, inputs=x, parts=cfg.combine_parts
        )
    else:
        scores, normalizer = vae_scores(model, prepared, cfg.score_samples, cfg.seed, inputs=x)
    names = COMBINED_SCORES if cfg.detector == "combined" else VAE_SCORES
    ev = evaluate_run(scores, prepared, names, cfg, {"scoring_seconds": time.perf_counter() - t0})
    ev.normalizer, ev.references, ev.condition_scale = normalizer, references, scale
    with tempfile.TemporaryDirectory() as tmp:
        title = f"{cfg.model_name()} | split={cfg.split} | {prepared.data_source} data"
        examples = reconstruction_examples(model, prepared, scores, inputs=x)
        write_outputs(ev, prepared, cfg, Path(tmp), title=title, examples=examples)
        tracking.log_evaluation(ev, cfg, Path(tmp), metrics=False)
    info = None
    try:
        info = _log_detector(model, prepared, cfg, ev)
    finally:
        # Logged after the detector and linked to it, which is what `Model.log` does for the
        # metrics a run already has: it reads the whole history of every metric key of the run
        # to find them (201 queries per trial, about 0.5 s, growing with the epochs); logged
        # before it, these 125 keys were read and written twice.
        tracking.log_metrics(ev.metrics, model_id=info.model_id if info is not None else None)
    return ev


def _log_detector(model, prepared: Prepared, cfg: TrainConfig, ev: Evaluation):
    """The pyfunc detector, when validation allows a threshold; its ModelInfo, else None."""
    d = ev.decision_score
    if any(name not in ev.thresholds for name in fallback_scores(d)):
        # without both classes on validation no threshold can be chosen honestly
        tracking.set_tags(
            {"millvae.detector": "not logged: validation lacks healthy or positive windows"}
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
        references=ev.references,
        condition_scale=ev.condition_scale,
        smoothing=cfg.smoothing,
    )
    conditions = prepared.windows.iloc[pick][["DOC", "feed", "material"]].reset_index(drop=True)
    return tracking.log_detector(
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
