"""How well does a detector find a worn tool? Scores → the metrics and thresholds of one run
(`detect.report` writes its plots and files).

Everything that selects (thresholds, the decision score) reads validation data only; test labels are
used for reporting, never for choosing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from millvae.data.conditions import ConditionScale
from millvae.data.prepare import Prepared
from millvae.detect import metrics as M
from millvae.detect.baselines import fit_pca, pca_error
from millvae.detect.scoring import (
    COMBINED_PARTS,
    CONDITION_COLUMNS,
    ConditionNormalizer,
    combined_scores,
    latent_scores,
    window_outputs,
    window_scores,
)
from millvae.detect.trend import add_smoothed, smoothed_name

VAE_SCORES = ("mse", "kl", "mse_cond", "kl_cond")
# detector=combined: PCA's reconstruction error beside the VAE's, and the two averaged
COMBINED_SCORES = (
    *VAE_SCORES,
    *("lat", "lat_cond", "pca", "pca_cond", "combined", "combined_cond"),
)
PCA_VARIANCE = 0.95


@dataclass
class Evaluation:
    """Metrics by name, the validation-chosen threshold per score and the decision score."""

    metrics: dict[str, float]
    thresholds: dict[str, float]
    decision_score: str
    scores: pd.DataFrame  # one row per window of the prepared data, every score column
    score_names: tuple[str, ...]
    normalizer: ConditionNormalizer | None = None
    # detector=combined: what its score needs ({"pca": ..., "latent": ..., "combine": [...]})
    references: dict | None = None
    # conditional=true: the scale of the condition channels the model reads
    condition_scale: ConditionScale | None = None


def healthy_fit_mask(windows: pd.DataFrame) -> np.ndarray:
    """Windows the condition-aware normaliser learns from: the healthy training windows.

    Not validation's: a validation tool's own healthy windows would then centre its scores,
    while a test tool is always scored against other tools. On the real data under
    split=casefold that made validation AP optimistic by up to 0.16 for some scores and not for
    others, so it ranked detectors differently from the test it stands in for; test scores are
    the same either way (each test tool's condition partner is a training tool).
    """
    return ((windows["split"] == "train") & (windows["tool_class"] == 0)).to_numpy()


def add_condition_scores(
    scores: pd.DataFrame, windows: pd.DataFrame, names: tuple[str, ...] | list[str]
) -> tuple[pd.DataFrame, ConditionNormalizer]:
    """Append `<name>_cond` columns: each window scored against healthy windows of its condition."""
    fit = healthy_fit_mask(windows)
    cond = windows[list(CONDITION_COLUMNS)].reset_index(drop=True)
    normalizer = ConditionNormalizer.fit(
        scores.loc[fit].reset_index(drop=True), cond.loc[fit].reset_index(drop=True), names
    )
    out = pd.concat([scores, normalizer.transform(scores, cond)], axis=1)
    return out, normalizer


def vae_scores(model, prepared: Prepared, samples: int = 0, seed: int = 0, inputs=None):
    """mse, kl (+ per-signal errors) and their condition-aware versions for every window;
    `inputs`: the windows as the model reads them, where not `prepared.x` (a conditional
    model's, with its condition channels)."""
    x = prepared.x if inputs is None else inputs
    raw = window_scores(model, x, prepared.signal_names, samples=samples, seed=seed)
    return add_condition_scores(raw, prepared.windows.reset_index(drop=True), ["mse", "kl"])


def combined_detector_scores(
    model,
    prepared: Prepared,
    samples: int = 0,
    seed: int = 0,
    inputs=None,
    parts: tuple[str, ...] = COMBINED_PARTS,
):
    """The VAE's scores and its latent distance, PCA's (both references fitted on the healthy
    training windows) and `combined(_cond)`; the normalizer and the references (`pca`, `latent`),
    which the served detector needs (`parts`: the scores combined). `inputs` as in `vae_scores`;
    PCA reads the signals."""
    x = prepared.x if inputs is None else inputs
    raw, codings = window_outputs(model, x, prepared.signal_names, samples=samples, seed=seed)
    fit = prepared.mask("train", slim=True)
    raw["lat"], latent = latent_scores(codings, fit)
    pca = fit_pca(prepared.x[fit], PCA_VARIANCE, seed)
    raw["pca"] = pca_error(pca, prepared.x)
    windows = prepared.windows.reset_index(drop=True)
    # mse_<signal> parts (their signals are checked against the run's before training)
    names = ["mse", "kl", "lat", "pca", *(p for p in parts if p.startswith("mse_"))]
    scores, normalizer = add_condition_scores(raw, windows, names)
    both = combined_scores(normalizer, scores, windows[list(CONDITION_COLUMNS)], parts)
    references = {"pca": pca, "latent": latent, "combine": list(parts)}
    return pd.concat([scores, both], axis=1), normalizer, references


def choose_threshold(
    y_val: np.ndarray, s_val: np.ndarray, healthy_val: np.ndarray, method: str, percentile: float
) -> float:
    """A threshold from validation data only."""
    if method == "percentile":
        return M.threshold_percentile(s_val[healthy_val], percentile)
    return M.threshold_f1(y_val, s_val)


class _Figures(dict):
    """Metric name -> value, keeping finite values only."""

    def put(self, name: str, value: float | None) -> None:
        if value is not None and np.isfinite(value):
            self[name] = float(value)


def evaluate(
    scores: pd.DataFrame,
    windows: pd.DataFrame,
    score_names: tuple[str, ...] | list[str],
    *,
    positive: str = "failed",
    threshold_method: str = "f1",
    threshold_percentile: float = 99.0,
    n_boot: int = 1000,
    seed: int = 0,
) -> Evaluation:
    """Window-, cut- and condition-level metrics of each score on validation and test."""
    windows = windows.reset_index(drop=True)
    scores = scores.reset_index(drop=True)
    y = M.positive_labels(windows["tool_class"].to_numpy(), positive)
    split = windows["split"].to_numpy()
    healthy = (windows["tool_class"] == 0).to_numpy()
    out = _Figures()
    thresholds: dict[str, float] = {}
    for part in ("val", "test"):
        m = split == part
        out.put(f"{part}_positive_rate", y[m].mean() if m.any() else np.nan)
        out.put(f"{part}_n_positive", y[m].sum())
    for name in score_names:
        s_all = scores[name].to_numpy(dtype=float)
        _ranking_figures(out, name, y, s_all, split)
        v = (split == "val") & np.isfinite(s_all)
        if not v.any() or y[v].all() or not y[v].any():
            continue  # no threshold can be chosen without both classes on validation
        thr = choose_threshold(y[v], s_all[v], healthy[v], threshold_method, threshold_percentile)
        thresholds[name] = float(thr)
        out.put(f"threshold_{name}", thr)
        _decision_figures(out, name, y, s_all, split, thr)
        t = (split == "test") & np.isfinite(s_all)
        if t.any():
            _test_figures(out, name, y[t], s_all[t], windows.loc[t], thr, n_boot, seed)
    ranked = [(out.get(f"val_ap_{n}", -np.inf), n) for n in score_names if n in thresholds]
    decision = max(ranked)[1] if ranked else str(score_names[0])
    return Evaluation(
        metrics=dict(out),
        thresholds=thresholds,
        decision_score=decision,
        scores=scores,
        score_names=tuple(score_names),
    )


def _ranking_figures(out: _Figures, name: str, y, s_all, split) -> None:
    """AP, ROC-AUC and the seed's PR-AUC on validation and test: no threshold needed."""
    for part in ("val", "test"):
        m = (split == part) & np.isfinite(s_all)
        yp, sp = y[m], s_all[m]
        out.put(f"{part}_ap_{name}", M.average_precision(yp, sp))
        out.put(f"{part}_rocauc_{name}", M.roc_auc(yp, sp))
        out.put(f"{part}_prauc_{name}", M.seed_pr_auc(yp, sp))


def _decision_figures(out: _Figures, name: str, y, s_all, split, thr: float) -> None:
    """Precision, recall and F1 at the validation-chosen threshold."""
    for part in ("val", "test"):
        m = (split == part) & np.isfinite(s_all)
        if not m.any():
            continue
        p, r, f1 = M.precision_recall_f1(y[m], s_all[m], thr)
        out.put(f"{part}_precision_{name}", p)
        out.put(f"{part}_recall_{name}", r)
        out.put(f"{part}_f1_{name}", f1)


def _test_figures(
    out: _Figures, name: str, y, s, windows: pd.DataFrame, thr: float, n_boot: int, seed: int
) -> None:
    """On the test windows: AP's bootstrap interval over cuts, cut-level figures, and AP per
    cutting condition."""
    cuts = windows["cut_no"].to_numpy()
    if n_boot > 0:
        lo, hi = M.bootstrap_ci(M.average_precision, y, s, cuts, n_boot=n_boot, seed=seed)
        out.put(f"test_ap_{name}_lo", lo)
        out.put(f"test_ap_{name}_hi", hi)
    per_cut = M.cut_level(s, cuts, y, thr)
    out.put(f"test_cut_ap_{name}", M.average_precision(per_cut["y"], per_cut["mean"]))
    out.put(f"test_cut_rocauc_{name}", M.roc_auc(per_cut["y"], per_cut["mean"]))
    out.put(f"test_cutshare_ap_{name}", M.average_precision(per_cut["y"], per_cut["share"]))
    for cond, mask in M.condition_subsets(windows).items():
        yc, sc = y[mask], s[mask]
        out.put(f"test_ap_{name}_{cond}", M.average_precision(yc, sc))
        out.put(f"test_prauc_{name}_{cond}", M.seed_pr_auc(yc, sc))


def evaluate_run(
    scores: pd.DataFrame,
    prepared: Prepared,
    score_names: tuple[str, ...] | list[str],
    cfg,
    extra_metrics: dict | None = None,
) -> Evaluation:
    """`evaluate` with a run's settings (positive class, threshold rule, bootstrap, seed), the
    scores smoothed over each tool's cuts beside them where `smoothing` asks for it."""
    scores, score_names = add_smoothed(scores, prepared.windows, score_names, cfg.smoothing)
    ev = evaluate(
        scores,
        prepared.windows,
        score_names,
        positive=cfg.positive,
        threshold_method=cfg.threshold_method,
        threshold_percentile=cfg.threshold_percentile,
        n_boot=cfg.bootstrap,
        seed=cfg.seed,
    )
    ev.metrics.update(extra_metrics or {})
    combined = smoothed_name("combined_cond") if cfg.smoothing else "combined_cond"
    if cfg.detector == "combined" and combined in ev.thresholds:
        # the detector asked for, not the best validation score of its parts
        ev.decision_score = combined
    return ev
