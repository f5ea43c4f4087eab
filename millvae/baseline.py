"""The `baseline` entry point: cheap non-deep detectors with the same data and the same metrics.

Every β-VAE run should be read next to what a few lines of scikit-learn achieve on the same
windows: PCA reconstruction error on the flattened healthy training windows, and an Isolation Forest
on simple per-window features. Both also get condition-aware scores, exactly like the VAE's.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from millvae.config import PARAM_DEFAULTS, PARAM_HELP, PREP_PARAMS, make_config
from millvae.errors import ArgParser, MillvaeError

BASELINE_SCORES = ("pca", "iforest", "pca_cond", "iforest_cond")
# the TrainConfig fields that shape data preparation and evaluation (the rest describe the VAE)
SHARED_PARAMS = (
    *PREP_PARAMS,
    "positive",
    "threshold_method",
    "threshold_percentile",
    "bootstrap",
    "seed",
    "experiment",
)


def window_features(x: np.ndarray) -> np.ndarray:
    """Per-signal mean, standard deviation, RMS and peak-to-peak of each window [n, window, s]."""
    x = np.asarray(x, dtype=np.float64)
    return np.concatenate(
        [x.mean(axis=1), x.std(axis=1), np.sqrt((x**2).mean(axis=1)), np.ptp(x, axis=1)], axis=1
    )


def pca_scores(x_fit: np.ndarray, x: np.ndarray, variance: float, seed: int):
    """Mean squared reconstruction error with the components explaining `variance` of x_fit."""
    from sklearn.decomposition import PCA

    flat_fit = x_fit.reshape(len(x_fit), -1)
    pca = PCA(n_components=variance, svd_solver="full", random_state=seed).fit(flat_fit)
    flat = x.reshape(len(x), -1)
    recon = pca.inverse_transform(pca.transform(flat))
    return ((flat - recon) ** 2).mean(axis=1), int(pca.n_components_)


def iforest_scores(x_fit: np.ndarray, x: np.ndarray, n_estimators: int, seed: int) -> np.ndarray:
    """Isolation Forest anomaly score (larger = more anomalous, in (0, 1])."""
    from sklearn.ensemble import IsolationForest

    forest = IsolationForest(n_estimators=n_estimators, random_state=seed, n_jobs=1)
    forest.fit(window_features(x_fit))
    return -forest.score_samples(window_features(x))


def run_baseline(cfg, pca_variance: float = 0.95, n_estimators: int = 200) -> str:
    """One MLflow run with both baselines' metrics, plots and per-window scores."""
    import mlflow

    from millvae.data.prepare import prepare
    from millvae.detect.evaluate import add_condition_scores, evaluate_and_log
    from millvae.train import _log_data, tracked_run

    name = f"baseline_pca-{pca_variance:g}_iforest-{n_estimators}_split-{cfg.split}"
    with tracked_run(cfg, run_name=name, tags={"model_type": "baseline"}) as run:
        have = mlflow.get_run(run.info.run_id).data.params
        params = {k: v for k, v in cfg.to_params().items() if k in SHARED_PARAMS}
        params.update(pca_variance=str(pca_variance), n_estimators=str(n_estimators))
        mlflow.log_params({k: v for k, v in params.items() if k not in have})
        mlflow.set_tag("model_type", "baseline")
        prepared = prepare(cfg)
        _log_data(prepared)
        t0 = time.perf_counter()
        fit = prepared.get("train", slim=True)
        pca, n_comp = pca_scores(fit, prepared.x, pca_variance, cfg.seed)
        forest = iforest_scores(fit, prepared.x, n_estimators, cfg.seed)
        raw = pd.DataFrame({"pca": pca, "iforest": forest})
        scores, _ = add_condition_scores(
            raw, prepared.windows.reset_index(drop=True), ["pca", "iforest"]
        )
        ev = evaluate_and_log(
            scores,
            prepared,
            BASELINE_SCORES,
            cfg,
            title=f"{name} | {prepared.data_source} data",
            extra_metrics={"pca_components": n_comp, "fit_seconds": time.perf_counter() - t0},
        )
        summary = ", ".join(
            f"{s} {ev.metrics[f'test_ap_{s}']:.3f}"
            for s in BASELINE_SCORES
            if f"test_ap_{s}" in ev.metrics
        )
        print(f"millvae baseline: run {run.info.run_id}: test AP {summary}")
        return run.info.run_id


def main(argv: list[str] | None = None) -> int:
    p = ArgParser(prog="millvae baseline", description="PCA and Isolation Forest baselines.")
    for name in SHARED_PARAMS:
        p.add_argument(f"--{name}", default=PARAM_DEFAULTS[name], help=PARAM_HELP[name])
    p.add_argument("--pca_variance", default="0.95", help="explained variance kept by the PCA")
    p.add_argument("--n_estimators", default="200", help="trees of the Isolation Forest")
    args = vars(p.parse_args(argv))
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
    run_baseline(cfg, variance, trees)
    return 0
