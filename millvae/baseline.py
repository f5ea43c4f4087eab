"""The `baseline` entry point: cheap non-deep detectors with the same data and the same metrics.

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
from millvae.data.prepare import prepare
from millvae.detect.baselines import iforest_scores, pca_scores
from millvae.detect.evaluate import add_condition_scores, evaluate_run
from millvae.detect.report import write_outputs
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


def run_baseline(cfg, pca_variance: float = 0.95, n_estimators: int = 200) -> str:
    """One MLflow run with both baselines' metrics, plots and per-window scores."""
    name = f"baseline_pca-{pca_variance:g}_iforest-{n_estimators}_split-{cfg.split}"
    with tracking.tracked_run(cfg, run_name=name, tags={"model_type": "baseline"}) as run:
        params = {k: v for k, v in cfg.to_params().items() if k in SHARED_PARAMS}
        params.update(pca_variance=str(pca_variance), n_estimators=str(n_estimators))
        tracking.log_params_once(params)
        tracking.set_tags({"model_type": "baseline"})
        prepared = prepare(cfg)
        tracking.log_data(prepared)
        t0 = time.perf_counter()
        fit = prepared.get("train", slim=True)
        pca, n_comp = pca_scores(fit, prepared.x, pca_variance, cfg.seed)
        forest = iforest_scores(fit, prepared.x, n_estimators, cfg.seed)
        raw = pd.DataFrame({"pca": pca, "iforest": forest})
        scores, _ = add_condition_scores(
            raw, prepared.windows.reset_index(drop=True), ["pca", "iforest"]
        )
        extra = {"pca_components": n_comp, "fit_seconds": time.perf_counter() - t0}
        ev = evaluate_run(scores, prepared, BASELINE_SCORES, cfg, extra)
        with tempfile.TemporaryDirectory() as tmp:
            title = f"{name} | {prepared.data_source} data"
            write_outputs(ev, prepared, cfg, Path(tmp), title=title)
            tracking.log_evaluation(ev, cfg, Path(tmp))
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
