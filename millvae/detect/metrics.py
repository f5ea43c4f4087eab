"""Detection metrics on anomaly scores (larger = more anomalous): pure functions of numpy arrays.

Window-level average precision / ROC-AUC, the seed's grid PR-AUC (for comparison with the paper),
thresholds chosen from validation arrays only, precision / recall / F1 at a threshold, cut-level
aggregation, a bootstrap interval that resamples whole cuts, and the per-condition subsets.
A metric that is undefined because the labels hold one class only is `nan`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
from sklearn.metrics import auc, average_precision_score, roc_auc_score

from millvae.errors import MillvaeError

POSITIVE_CHOICES = ("failed", "worn")
# material codes of the UC Berkeley milling data
_MATERIAL_NAMES = {1: "castiron", 2: "steel"}


def _as_labels_scores(y, s) -> tuple[np.ndarray, np.ndarray]:
    """1-D bool labels and float scores of equal length, scores finite."""
    y = np.asarray(y)
    s = np.asarray(s)
    if y.ndim != 1 or s.ndim != 1:
        raise MillvaeError(f"expected 1-D labels and scores, got shapes {y.shape} and {s.shape}")
    if len(y) != len(s):
        raise MillvaeError(
            f"expected as many labels as scores, got {len(y)} labels, {len(s)} scores"
        )
    if not np.issubdtype(s.dtype, np.number) or np.issubdtype(s.dtype, np.complexfloating):
        raise MillvaeError(f"expected real-valued scores, got dtype {s.dtype}")
    if np.issubdtype(s.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(s)))
        if bad:
            raise MillvaeError(f"expected finite scores, got {bad} NaN/inf of {len(s)}")
    else:
        s = s.astype(np.float64)
    if y.dtype != bool:
        values = set(np.unique(y).tolist())
        if not values <= {0, 1}:
            raise MillvaeError(f"expected binary labels (0/1 or bool), got values {sorted(values)}")
        y = y.astype(bool)
    return y, s


def _two_classes(y: np.ndarray) -> bool:
    return bool(y.any()) and not bool(y.all())


def positive_labels(tool_class: np.ndarray, positive: str = "failed") -> np.ndarray:
    """Binary labels from tool classes (0 healthy, 1 degraded, 2 failed).

    "failed": class 2 is positive (the seed's choice); "worn": degraded and failed are positive.
    """
    tc = np.asarray(tool_class)
    if positive not in POSITIVE_CHOICES:
        raise MillvaeError(f"expected positive in {POSITIVE_CHOICES}, got {positive!r}")
    if tc.ndim != 1:
        raise MillvaeError(f"expected 1-D tool classes, got shape {tc.shape}")
    if len(tc):
        try:
            values = set(np.unique(tc).tolist())
        except TypeError as err:
            raise MillvaeError(f"expected tool classes 0, 1, 2, got mixed values ({err})") from None
        if not values <= {0, 1, 2}:
            raise MillvaeError(
                f"expected tool classes 0, 1, 2, got values {sorted(values, key=str)}"
            )
    tc = tc.astype(np.int64)
    return tc == 2 if positive == "failed" else tc >= 1


def average_precision(y, s) -> float:
    """sklearn's average precision of continuous scores; nan when y holds one class."""
    y, s = _as_labels_scores(y, s)
    if not _two_classes(y):
        return float("nan")
    return float(average_precision_score(y, s))


def roc_auc(y, s) -> float:
    """sklearn's ROC-AUC of continuous scores; nan when y holds one class."""
    y, s = _as_labels_scores(y, s)
    if not _two_classes(y):
        return float("nan")
    return float(roc_auc_score(y, s))


def _counts_at(y: np.ndarray, s: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, ...]:
    """(tp, fp) when predicting positive at s >= t, for every t; one sort, no loop."""
    pos = np.sort(s[y])
    neg = np.sort(s[~y])
    # side="left": the count of values < t, so the rest are >= t
    tp = len(pos) - np.searchsorted(pos, thresholds, side="left")
    fp = len(neg) - np.searchsorted(neg, thresholds, side="left")
    return tp, fp


def seed_pr_auc(y, s, n_thresholds: int = 250) -> float:
    """The seed's PR-AUC (Hahn & Mechefske 2021, ml-tool-wear `threshold.py`), reproduced exactly.

    - Grid: ``np.arange(min, max, |max - min| / n_thresholds)`` over this set's scores, not
      linspace: it starts at the minimum and stops below the maximum, so usually n_thresholds
      points; floating-point rounding sometimes (about 1 set in 8) yields n_thresholds + 1, the
      last one a rounding error away from the maximum (kept as the seed keeps it).
    - A window is predicted positive when ``score >= t``.
    - A threshold where precision, recall or the false-positive rate would divide by zero is
      skipped (the seed catches ZeroDivisionError); within the grid that only happens at an
      extra point above the maximum (nothing predicted positive), or for one-class labels.
    - Area: trapezoid rule over the kept (recall, precision) points in grid order,
      ``sklearn.metrics.auc(recall, precision)``; no (0, 1) end point is added, so even a perfect
      scorer gets less than 1 (the curve stops at the recall of the highest grid threshold).

    nan when y holds one class, the scores are constant, or fewer than 2 points remain.
    """
    y, s = _as_labels_scores(y, s)
    if int(n_thresholds) != n_thresholds or n_thresholds < 2:
        raise MillvaeError(f"expected n_thresholds an integer >= 2, got {n_thresholds!r}")
    if not _two_classes(y):
        return float("nan")
    lo, hi = s.min(), s.max()
    if hi == lo:
        return float("nan")  # the seed's arange would have a zero step
    grid = np.arange(lo, hi, np.abs(hi - lo) / int(n_thresholds))
    tp, fp = _counts_at(y, s, grid)
    keep = (tp + fp) > 0
    if keep.sum() < 2:
        return float("nan")
    tp, fp = tp[keep], fp[keep]
    precision = tp / (tp + fp)
    recall = tp / y.sum()
    return float(auc(recall, precision))


def threshold_percentile(scores_healthy_val: np.ndarray, q: float = 99.0) -> float:
    """The q-th percentile (linear interpolation) of healthy validation scores."""
    s = np.asarray(scores_healthy_val, dtype=np.float64)
    if s.ndim != 1 or len(s) == 0:
        raise MillvaeError(f"expected a non-empty 1-D array of healthy scores, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise MillvaeError(
            f"expected finite healthy scores, got {int((~np.isfinite(s)).sum())} NaN/inf"
        )
    if not 0.0 <= q <= 100.0:
        raise MillvaeError(f"expected a percentile between 0 and 100, got {q}")
    return float(np.percentile(s, q))


def threshold_f1(y_val, s_val) -> float:
    """The threshold that maximises F1 on validation (predict positive when s >= t).

    Candidates are the distinct validation scores: every t in (s_(k-1), s_(k)] gives the same
    predictions, and t = s_(k) reproduces them exactly. Among equal F1 the highest threshold wins
    (fewer alarms). nan when there is no positive (F1 is 0 everywhere).
    """
    y, s = _as_labels_scores(y_val, s_val)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    cand = np.unique(s)
    tp, fp = _counts_at(y, s, cand)
    f1 = 2.0 * tp / (tp + fp + n_pos)
    best = np.flatnonzero(f1 == f1.max())[-1]
    return float(cand[best])


def precision_recall_f1(y, s, threshold) -> tuple[float, float, float]:
    """Precision, recall and F1 when s >= threshold is positive; 0/0 counts as 0.0."""
    y, s = _as_labels_scores(y, s)
    pred = s >= threshold
    tp = int(np.count_nonzero(pred & y))
    fp = int(np.count_nonzero(pred & ~y))
    fn = int(np.count_nonzero(~pred & y))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return float(precision), float(recall), float(f1)


def cut_level(scores, cut_ids, y_window, threshold) -> pd.DataFrame:
    """One row per cut (sorted by cut id): ``cut_id``, ``y`` (any window positive), ``mean``
    score, ``share`` of windows with score >= threshold, ``n`` windows."""
    y, s = _as_labels_scores(y_window, scores)
    cuts = np.asarray(cut_ids)
    if cuts.shape != s.shape:
        raise MillvaeError(f"expected one cut id per window ({len(s)}), got shape {cuts.shape}")
    df = pd.DataFrame({"cut_id": cuts, "y": y, "score": s, "over": s >= threshold})
    g = df.groupby("cut_id", sort=True)
    out = pd.DataFrame(
        {
            "y": g["y"].any(),
            "mean": g["score"].mean(),
            "share": g["over"].mean(),
            "n": g.size(),
        }
    ).reset_index()
    return out


def bootstrap_ci(
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    y,
    s,
    groups,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of metric_fn(y, s), resampling GROUPS (cuts) with replacement.

    Windows of one cut are correlated, so resampling windows would understate the spread. A
    resample whose labels hold one class (or whose metric is nan) is skipped; (nan, nan) when
    fewer than 10 resamples are valid.
    """
    y, s = _as_labels_scores(y, s)
    groups = np.asarray(groups)
    if groups.shape != s.shape:
        raise MillvaeError(f"expected one group per window ({len(s)}), got shape {groups.shape}")
    if not 0.0 < level < 1.0:
        raise MillvaeError(f"expected a confidence level between 0 and 1, got {level}")
    if int(n_boot) != n_boot or n_boot < 1:
        raise MillvaeError(f"expected n_boot a positive integer, got {n_boot!r}")
    if len(s) == 0:
        return float("nan"), float("nan")
    _, inverse = np.unique(groups, return_inverse=True)
    if metric_fn is average_precision:
        values = _bootstrap_ap_values(y, s, inverse, int(n_boot), seed)
        return _percentile_interval(values, level)
    order = np.argsort(inverse, kind="stable")
    sizes = np.bincount(inverse)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    n_groups = len(sizes)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(int(n_boot)):
        pick = rng.integers(0, n_groups, size=n_groups)
        # window positions of the picked groups, concatenated, without a loop over groups
        lens = sizes[pick]
        offsets = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
        idx = order[np.repeat(starts[pick], lens) + offsets]
        yb = y[idx]
        if not _two_classes(yb):
            continue
        v = metric_fn(yb, s[idx])
        if np.isfinite(v):
            values.append(v)
    return _percentile_interval(np.asarray(values, dtype=np.float64), level)


def _percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    if len(values) < 10:
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _bootstrap_ap_values(
    y: np.ndarray, s: np.ndarray, inverse: np.ndarray, n_boot: int, seed: int, chunk: int = 64
) -> np.ndarray:
    """The average precision of each group resample, as `bootstrap_ci`'s loop would compute it.

    A resample that draws group g k times is the data with weight k on g's windows, and AP with
    integer weights equals AP of the repeated windows. So the scores are sorted once and every
    resample is a weighted cumulative sum over that order (a chunk of resamples per matrix),
    instead of a copy, a sort and an sklearn call per resample: about 100x faster at 1,000
    resamples. Same random draws, same skips, same values to rounding.
    """
    n_groups = int(inverse.max()) + 1
    rng = np.random.default_rng(seed)
    order = np.argsort(-s, kind="stable")
    ys = y[order].astype(np.float64)
    gs = inverse[order]
    # the last position of each run of equal scores: sklearn's thresholds
    ss = s[order]
    ends = np.flatnonzero(np.append(ss[1:] != ss[:-1], True))
    values = []
    for start in range(0, n_boot, chunk):
        k = min(chunk, n_boot - start)
        # drawn one resample at a time, as the generic loop does, so the intervals agree
        picks = [rng.integers(0, n_groups, size=n_groups) for _ in range(k)]
        counts = np.stack([np.bincount(p, minlength=n_groups) for p in picks]).astype(np.float64)
        w = counts[:, gs]
        tp = np.cumsum(w * ys, axis=1)[:, ends]
        fp = np.cumsum(w * (1.0 - ys), axis=1)[:, ends]
        total_tp, total_fp = tp[:, -1], fp[:, -1]
        ok = (total_tp > 0) & (total_fp > 0)
        if not ok.any():
            continue
        tp, fp, total_tp = tp[ok], fp[ok], total_tp[ok]
        d_recall = np.diff(tp, axis=1, prepend=0.0) / total_tp[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = tp / (tp + fp)
        # thresholds no drawn window reaches add no recall; their 0/0 precision counts as 0
        ap = np.where(d_recall > 0, d_recall * precision, 0.0).sum(axis=1)
        values.extend(ap[np.isfinite(ap)].tolist())
    return np.asarray(values, dtype=np.float64)


def _value_name(v) -> str:
    # round away float32 noise (0.75 stored as 0.7500000x) so names read as the paper's
    return f"{round(float(v), 6):g}"


def condition_subsets(windows_df: pd.DataFrame) -> dict[str, np.ndarray]:
    """Boolean masks over the rows (positional) for each cutting condition value present:
    ``doc<v>``, ``feed<v>`` (e.g. ``doc0.75``, ``feed0.25``), ``castiron`` (material 1) and
    ``steel`` (material 2); another material code gives ``material<v>``."""
    missing = [c for c in ("DOC", "feed", "material") if c not in windows_df.columns]
    if missing:
        raise MillvaeError(f"expected columns DOC, feed, material, got no {', '.join(missing)}")
    out: dict[str, np.ndarray] = {}
    for col, prefix in (("DOC", "doc"), ("feed", "feed")):
        vals = windows_df[col].to_numpy(dtype=np.float64)
        for v in np.unique(vals[np.isfinite(vals)]):
            out[f"{prefix}{_value_name(v)}"] = vals == v
    mat = windows_df["material"].to_numpy(dtype=np.float64)
    for v in np.unique(mat[np.isfinite(mat)]):
        out[_MATERIAL_NAMES.get(v, f"material{_value_name(v)}")] = mat == v
    return out
