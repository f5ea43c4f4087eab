"""Cross-validation over tools: the out-of-fold test scores of every fold pooled into one figure.

Under `split=casefold` each failing tool is tested in exactly one fold, so the folds' test windows
together hold every failing tool once. Pooling them gives one AP over all of them instead of K
small, noisy ones; its interval resamples whole tools (windows and cuts of one tool are not
independent). Each window keeps the threshold its own fold chose on its own validation split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from millvae.detect import metrics as M

FOLD_COLUMNS = ("fold", "case", "cut_no", "tool_class")


@dataclass
class FoldScores:
    """One fold's test windows (case, cut_no, tool_class), their scores, the fold's thresholds
    and its validation metrics (for choosing by validation folds)."""

    fold: int
    windows: pd.DataFrame
    scores: pd.DataFrame
    thresholds: dict[str, float]
    val_metrics: dict[str, float]


def fold_scores(fold: int, ev, windows: pd.DataFrame) -> FoldScores:
    """The test part of one fold's Evaluation (`ev.scores` has a row per window of `windows`)."""
    windows = windows.reset_index(drop=True)
    test = (windows["split"] == "test").to_numpy()
    val = {k: v for k, v in ev.metrics.items() if k.startswith("val_")}
    return FoldScores(
        fold=fold,
        windows=windows.loc[test, ["case", "cut_no", "tool_class"]].reset_index(drop=True),
        scores=ev.scores.reset_index(drop=True).loc[test].reset_index(drop=True),
        thresholds=dict(ev.thresholds),
        val_metrics=val,
    )


def pooled_table(folds: list[FoldScores], score_names) -> pd.DataFrame:
    """One row per out-of-fold test window: fold, case, cut_no, tool_class and every score."""
    parts = []
    for f in folds:
        part = f.windows.copy()
        part.insert(0, "fold", f.fold)
        for name in score_names:
            part[name] = f.scores[name].to_numpy(dtype=float) if name in f.scores else np.nan
        parts.append(part)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=FOLD_COLUMNS)


def pooled_metrics(
    folds: list[FoldScores],
    score_names,
    *,
    positive: str = "failed",
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """`pooled_test_{ap,cut_ap,rocauc,cut_rocauc,f1}_<score>` (+ `_lo`/`_hi` tool-bootstrap
    intervals) over all folds' test windows, and `cv_val_ap_<score>`: the mean validation AP over
    the folds, the figure to choose a score or configuration by."""
    table = pooled_table(folds, score_names)
    y = M.positive_labels(table["tool_class"].to_numpy(dtype=int), positive)
    out: dict[str, float] = {"pooled_folds": float(len(folds))}
    out["pooled_test_n_positive"] = float(y.sum())
    out["pooled_test_n_windows"] = float(len(y))
    out["pooled_test_tools"] = float(table["case"].nunique())
    for name in score_names:
        s = table[name].to_numpy(dtype=float)
        ok = np.isfinite(s)
        _put_with_interval(
            out,
            f"pooled_test_ap_{name}",
            M.average_precision,
            y[ok],
            s[ok],
            table["case"].to_numpy()[ok],
            n_boot,
            seed,
        )
        _put_with_interval(
            out,
            f"pooled_test_rocauc_{name}",
            M.roc_auc,
            y[ok],
            s[ok],
            table["case"].to_numpy()[ok],
            n_boot,
            seed,
        )
        cuts = _cut_table(table.loc[ok], y[ok], s[ok])
        _put_with_interval(
            out,
            f"pooled_test_cut_ap_{name}",
            M.average_precision,
            cuts["y"].to_numpy(),
            cuts["mean"].to_numpy(),
            cuts["case"].to_numpy(),
            n_boot,
            seed,
        )
        _put(
            out,
            f"pooled_test_cut_rocauc_{name}",
            M.roc_auc(cuts["y"].to_numpy(), cuts["mean"].to_numpy()),
        )
        _put(out, f"pooled_test_f1_{name}", _pooled_f1(folds, name, positive))
        val = [f.val_metrics.get(f"val_ap_{name}", np.nan) for f in folds]
        if folds and np.isfinite(val).all():
            out[f"cv_val_ap_{name}"] = float(np.mean(val))
    return out


def _put(out: dict, key: str, value: float | None) -> None:
    if value is not None and np.isfinite(value):
        out[key] = float(value)


def _put_with_interval(out, key, fn, y, s, groups, n_boot, seed) -> None:
    _put(out, key, fn(y, s))
    if n_boot > 0 and key in out:
        lo, hi = M.bootstrap_ci(fn, y, s, groups, n_boot=n_boot, seed=seed)
        _put(out, f"{key}_lo", lo)
        _put(out, f"{key}_hi", hi)


def _cut_table(table: pd.DataFrame, y: np.ndarray, s: np.ndarray) -> pd.DataFrame:
    """Per cut: positive (any window), mean score, its tool."""
    df = pd.DataFrame(
        {"cut_no": table["cut_no"].to_numpy(), "case": table["case"].to_numpy(), "y": y, "s": s}
    )
    g = df.groupby("cut_no", sort=True)
    return pd.DataFrame({"y": g["y"].any(), "mean": g["s"].mean(), "case": g["case"].first()})


def _pooled_f1(folds: list[FoldScores], name: str, positive: str) -> float | None:
    """F1 of all test windows, each flagged at its own fold's validation threshold."""
    ys, flags = [], []
    for f in folds:
        if name not in f.thresholds or name not in f.scores:
            return None  # a fold without a threshold: no honest pooled decision figure
        s = f.scores[name].to_numpy(dtype=float)
        ok = np.isfinite(s)
        ys.append(M.positive_labels(f.windows["tool_class"].to_numpy(dtype=int)[ok], positive))
        flags.append(s[ok] >= f.thresholds[name])
    if not ys:
        return None
    y, flag = np.concatenate(ys), np.concatenate(flags)
    tp = float((y & flag).sum())
    denom = float(y.sum() + flag.sum())
    return 2 * tp / denom if denom else None
