"""The `baseline` entry point: cheap non-deep detectors with the same data and the same metrics.

With `split_seeds` (e.g. `all` under `split=casefold`) one child run per fold and the pooled
out-of-fold figures on the parent, as `repeat` does for the β-VAE.

Every β-VAE run should be read next to what a few lines of scikit-learn achieve on the same
windows: PCA reconstruction error on the flattened healthy training windows, and an Isolation Forest
on simple per-window features. Both also get condition-aware scores, exactly like the VAE's.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pandas as pd

from millvae import tracking
from millvae.config import PARAM_DEFAULTS, PARAM_HELP, PREP_PARAMS, make_config
from millvae.crossval import (
    covers_every_fold,
    each_fold,
    parse_seeds,
    record_pooled,
    tag_data,
)
from millvae.data.prepare import prepare
from millvae.detect.baselines import iforest_scores, pca_scores, time_in_use
from millvae.detect.evaluate import add_condition_scores, evaluate_run
from millvae.detect.pooled import fold_scores
from millvae.detect.report import write_outputs
from millvae.errors import ArgParser, MillvaeError

BASELINE_SCORES = ("pca", "iforest", "pca_cond", "iforest_cond", "time_in_use")
# the TrainConfig fields that shape data preparation and evaluation (the rest describe the VAE)
SHARED_PARAMS = (
    *PREP_PARAMS,
    "positive",
    "threshold_method",
    "threshold_percentile",
    "smoothing",
    "bootstrap",
    "seed",
    "experiment",
)


def baseline_scores(prepared, cfg, pca_variance: float, n_estimators: int):
    """Every baseline score of every window, and the figures of the fit."""
    t0 = time.perf_counter()
    fit = prepared.get("train", slim=True)
    pca, n_comp = pca_scores(fit, prepared.x, pca_variance, cfg.seed)
    forest = iforest_scores(fit, prepared.x, n_estimators, cfg.seed)
    raw = pd.DataFrame({"pca": pca, "iforest": forest})
    windows = prepared.windows.reset_index(drop=True)
    scores, _ = add_condition_scores(raw, windows, ["pca", "iforest"])
    # No model at all: failed cuts are the last cuts of their tool (run-to-failure), so the cut's
    # run number ranks them; every detector has to beat this.
    scores["time_in_use"] = time_in_use(windows)
    return scores, {"pca_components": n_comp, "fit_seconds": time.perf_counter() - t0}


def run_baseline(
    cfg, pca_variance: float = 0.95, n_estimators: int = 200, *, prepared=None, nested=False
):
    """One MLflow run with every baseline's metrics, plots and per-window scores; its run id and
    Evaluation."""
    name = f"baseline_pca-{pca_variance:g}_iforest-{n_estimators}_{_split_label(cfg)}"
    with tracking.tracked_run(
        cfg, run_name=name, nested=nested, tags={"model_type": "baseline"}
    ) as run:
        params = {k: v for k, v in cfg.to_params().items() if k in SHARED_PARAMS}
        params.update(pca_variance=str(pca_variance), n_estimators=str(n_estimators))
        tracking.log_params_once(params)
        tracking.set_tags({"model_type": "baseline"})
        prepared = prepared if prepared is not None else prepare(cfg)
        tracking.log_data(prepared)
        scores, extra = baseline_scores(prepared, cfg, pca_variance, n_estimators)
        ev = evaluate_run(scores, prepared, BASELINE_SCORES, cfg, extra)
        with tempfile.TemporaryDirectory() as tmp:
            title = f"{name} | {prepared.data_source} data"
            write_outputs(ev, prepared, cfg, Path(tmp), title=title)
            tracking.log_evaluation(ev, cfg, Path(tmp))
        summary = ", ".join(
            f"{s} {ev.metrics[f'test_ap_{s}']:.3f}"
            for s in ev.score_names
            if f"test_ap_{s}" in ev.metrics
        )
        print(f"millvae baseline: run {run.info.run_id}: test AP {summary}")
        return run.info.run_id, ev


def _split_label(cfg) -> str:
    if cfg.split == "casefold":
        return f"split-casefold{cfg.folds}-f{cfg.split_seed}"
    return f"split-{cfg.split}"


def run_baseline_folds(cfg, seeds: list[int], pca_variance: float, n_estimators: int) -> str:
    """A parent run with one child per split seed; under split=casefold with every fold, the
    pooled out-of-fold figures on the parent, exactly as `repeat` logs them for a β-VAE."""
    name = f"baseline_pca-{pca_variance:g}_iforest-{n_estimators}_split-{cfg.split}_folds"
    with tracking.tracked_run(cfg, run_name=name, tags={"model_type": "baseline"}) as parent:
        params = {k: v for k, v in cfg.to_params().items() if k in SHARED_PARAMS}
        params.update(
            pca_variance=str(pca_variance),
            n_estimators=str(n_estimators),
            split_seeds=",".join(map(str, seeds)),
        )
        tracking.start_record(params, model_type="baseline")
        folds, names = [], BASELINE_SCORES
        for seed, child_cfg, prepared in each_fold(cfg, seeds):
            _, ev = run_baseline(
                child_cfg, pca_variance, n_estimators, prepared=prepared, nested=True
            )
            folds.append(fold_scores(seed, ev, prepared.windows))
            names = ev.score_names  # with the smoothed scores, where asked for
        tag_data(prepared)
        if covers_every_fold(cfg, seeds):
            record_pooled(folds, names, cfg, "baseline")
        return parent.info.run_id


def main(argv: list[str] | None = None) -> int:
    p = ArgParser(prog="millvae baseline", description="PCA and Isolation Forest baselines.")
    for name in SHARED_PARAMS:
        p.add_argument(f"--{name}", default=PARAM_DEFAULTS[name], help=PARAM_HELP[name])
    p.add_argument("--pca_variance", default="0.95", help="explained variance kept by the PCA")
    p.add_argument("--n_estimators", default="200", help="trees of the Isolation Forest")
    p.add_argument(
        "--split_seeds",
        default="",
        help="empty: one run at split_seed; seeds or 'all' (every casefold fold): a child run "
        "each, pooled out-of-fold figures on the parent",
    )
    args = vars(p.parse_args(argv))
    seeds_text = str(args.pop("split_seeds")).strip()
    try:
        variance = float(args.pop("pca_variance"))
        trees = int(float(args.pop("n_estimators")))
    except ValueError:
        raise MillvaeError("pca_variance / n_estimators: expected numbers") from None
    if not 0 < variance < 1:
        raise MillvaeError(f"pca_variance: expected 0 < v < 1; got {variance:g}")
    if trees < 1:
        raise MillvaeError(f"n_estimators: expected >= 1; got {trees}")
    cfg = make_config(**args)
    if not seeds_text:
        run_baseline(cfg, variance, trees)
        return 0
    if cfg.split == "window":
        raise MillvaeError(
            "split_seeds: split=window always uses the seed's fixed random states; use "
            "split=casefold, case or cut"
        )
    run_baseline_folds(cfg, parse_seeds(seeds_text, cfg, default=None), variance, trees)
    return 0
