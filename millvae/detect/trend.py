"""A tool's scores over its life: each cut's mean score, smoothed over the tool's cuts in order.

Wear grows from cut to cut while one window's score is noisy, so a running average over a tool's
cuts (an exponentially weighted one: the earlier cuts weigh `smoothing`, the newest 1 - smoothing)
tells a worn tool from a bad window better than any single cut. It is causal: a cut's smoothed
score reads that cut and the tool's earlier ones only, so it is known when the cut ends, as an
alarm per cut would be. On the real data's validation folds it lifted every condition-aware
score (docs/detection.md).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SUFFIX = "_smooth"


def smoothed_name(score: str) -> str:
    """`combined_cond` -> `combined_cond_smooth`."""
    return f"{score}{SUFFIX}"


def unsmoothed_name(score: str) -> str:
    """`combined_cond_smooth` -> `combined_cond` (other names unchanged)."""
    return score.removesuffix(SUFFIX)


def smoothable(names) -> list[str]:
    """The scores that get a smoothed version: the condition-aware ones (the raw scores' levels
    differ between cutting conditions, and a tool's cuts change condition)."""
    return [n for n in names if n.endswith("_cond")]


def cut_ewma(cut_means: np.ndarray, smoothing: float, start: float | None = None) -> np.ndarray:
    """The running average of one tool's cut means, in cut order: e_k = w e_(k-1) + (1-w) m_k,
    starting from the first cut's mean, or from `start` (the tool's smoothed score after its
    previous cuts) where given. A cut without a finite mean keeps the previous value."""
    out = np.empty(len(cut_means), dtype=float)
    e = start if start is not None and np.isfinite(start) else None
    for k, m in enumerate(np.asarray(cut_means, dtype=float)):
        if np.isfinite(m):
            e = m if e is None else smoothing * e + (1.0 - smoothing) * m
        out[k] = np.nan if e is None else e
    return out


def smooth_windows(
    scores: np.ndarray,
    tools: np.ndarray,
    order: np.ndarray,
    cuts: np.ndarray,
    smoothing: float,
    start: float | None = None,
) -> np.ndarray:
    """Each window's smoothed score: the running average of its tool's cut means up to and
    including its own cut. `tools`, `order` (a cut's position in its tool's life, e.g. the run
    number) and `cuts` (a cut id) are given per window; `start` as in `cut_ewma`."""
    d = pd.DataFrame({"tool": tools, "order": order, "cut": cuts, "s": scores})
    per_cut = (
        d.groupby("cut", sort=False)
        .agg(tool=("tool", "first"), order=("order", "first"), s=("s", "mean"))
        .sort_values(["tool", "order"], kind="stable")
    )
    smoothed = pd.Series(np.nan, index=per_cut.index, dtype=float)
    for _, one in per_cut.groupby("tool", sort=False):
        smoothed.loc[one.index] = cut_ewma(one["s"].to_numpy(), smoothing, start)
    return smoothed.reindex(d["cut"]).to_numpy(dtype=float)


def add_smoothed(
    scores: pd.DataFrame, windows: pd.DataFrame, names, smoothing: float
) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """`<score>_smooth` beside each condition-aware score of `names` (none where smoothing is 0),
    over the windows' tools (`case`) and cuts (`cut_no`, in `run` order); the columns and the
    names, smoothed ones appended."""
    names = tuple(names)
    if not smoothing:
        return scores, names
    windows = windows.reset_index(drop=True)
    scores = scores.reset_index(drop=True).copy()
    tools, order = windows["case"].to_numpy(), windows["run"].to_numpy()
    cuts = windows["cut_no"].to_numpy()
    added = []
    for name in smoothable(names):
        s = scores[name].to_numpy(dtype=float)
        scores[smoothed_name(name)] = smooth_windows(s, tools, order, cuts, smoothing)
        added.append(smoothed_name(name))
    return scores, (*names, *added)
