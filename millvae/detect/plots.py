"""Figures logged as MLflow run artifacts: PR/ROC curves, score distributions, per-case trends and
reconstruction examples, each written as a PNG.

Figures are built on `matplotlib.figure.Figure` directly rather than through pyplot: nothing is
registered with pyplot's global figure manager, so no figure can leak, and importing this module
never switches the backend of a user's interactive session (every file is drawn on an Agg canvas).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cbook import violin_stats
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import NullLocator

from millvae.errors import MillvaeError

DPI = 110
CLASS_NAMES = ("healthy", "degraded", "failed")
CLASS_COLORS = ("#2ca02c", "#ff7f0e", "#d62728")
SPLIT_ORDER = ("train", "val", "test")
_RC = {
    "font.size": 9,
    "axes.titlesize": 9.5,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "figure.titlesize": 11,
    "axes.spines.top": False,
    "axes.spines.right": False,
    # A fixed title height: left to matplotlib ("None"), every panel's title is placed after
    # measuring the tight bounding box of its top axis, which these panels never draw; that was a
    # third of the draw of the 16-panel case trends.
    "axes.titley": 1.0,
}
# a score is drawn on a log axis when it is positive and its bulk covers this many decades
_LOG_DECADES = 1.5
# share of a case's panel left blank on each side, so neighbouring cases stay apart
_PANEL_MARGIN = 0.03


def _new_figure(width: float, height: float) -> Figure:
    # No layout engine: constrained layout measured every tick label of every panel before the
    # real draw, a third of the drawing time of a run's plots; margins are set in inches instead
    # (`_margins`), which the fixed fonts and label lengths of these figures allow.
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _margins(
    fig: Figure,
    *,
    left: float = 0.75,
    right: float = 0.2,
    top: float = 0.35,
    bottom: float = 0.55,
    wgap: float = 0.75,
    hgap: float = 0.8,
    nrows: int = 1,
    ncols: int = 1,
) -> None:
    """Subplot margins and gaps in inches (matplotlib wants fractions of the figure and of the
    mean panel size)."""
    w, h = fig.get_size_inches()
    panel_w = max((w - left - right - wgap * (ncols - 1)) / ncols, 0.1)
    panel_h = max((h - top - bottom - hgap * (nrows - 1)) / nrows, 0.1)
    fig.subplots_adjust(
        left=left / w,
        right=1 - right / w,
        top=1 - top / h,
        bottom=bottom / h,
        wspace=wgap / panel_w,
        hspace=hgap / panel_h,
    )


def _title(fig: Figure, title: str) -> None:
    fig.suptitle(title, y=1 - 0.08 / fig.get_size_inches()[1], va="top")


def _bottom_legend(fig: Figure, handles: list, ncols: int) -> None:
    fig.legend(
        handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncols=ncols, frameon=False
    )


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # zlib level 3 rather than PIL's 6: the same pixels, files 3-9 % larger, encoding 40 %
        # faster (about 0.16 s of the five figures each run draws, real data)
        fig.savefig(
            path, dpi=DPI, format="png", facecolor="white", pil_kwargs={"compress_level": 3}
        )
    finally:
        # No pyplot figure manager holds the figure, so it goes with its last reference. Its
        # pixel buffer (several MB) is freed now; `fig.clear()` did that too but rebuilt every
        # panel's ticks on the way, about 0.2 s per figure of a run.
        fig.canvas.renderer, fig.canvas._lastKey = None, None  # a later draw makes a new one
    return path


def _log_y(ax) -> None:
    """Log y axis without minor ticks: on panels of several decades they add little to read, and
    their Tick objects were most of the drawing and layout time of a run's plots."""
    ax.set_yscale("log")
    ax.yaxis.set_minor_locator(NullLocator())


def _empty(path, title: str, message: str) -> Path:
    """A small figure that says why there is nothing to show, so an artifact always exists."""
    with matplotlib.rc_context(_RC):
        fig = _new_figure(6, 2.5)
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=11, color="0.3")
        if title:
            _title(fig, title)
        return _save(fig, path)


def _score_styles(names: Sequence[str]) -> dict[str, dict]:
    """One colour per base score (mse, kl, pca, ...); the condition-aware variant is dashed."""
    palette = matplotlib.colormaps["tab10"].colors
    bases: list[str] = []
    for n in names:
        b = n.removesuffix("_cond")
        if b not in bases:
            bases.append(b)
    return {
        n: {
            "color": palette[bases.index(n.removesuffix("_cond")) % len(palette)],
            "linestyle": "--" if n.endswith("_cond") else "-",
        }
        for n in names
    }


def _split_key(split: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER), split)


def _finite_pair(y_true, scores, where: str) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(scores, dtype=float).ravel()
    if y.shape != s.shape:
        raise MillvaeError(
            f"{where}: expected labels and scores of the same length; got {y.size} and {s.size}"
        )
    keep = np.isfinite(s)
    return y[keep], s[keep]


def pr_roc_curves(
    curves: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]],
    path: str | Path,
    title: str = "",
) -> Path:
    """Precision-recall (left) and ROC (right) curves, a row per split and a line per score.

    `curves[split][score] = (y_true, scores)`; NaN scores are dropped. The PR panel shows the
    no-skill line at the positive rate and AP in the legend; the ROC panel the diagonal and ROC-AUC.
    """
    splits = sorted((s for s in curves if curves[s]), key=_split_key)
    if not splits:
        return _empty(path, title, "no scores to draw")
    names = list(dict.fromkeys(n for s in splits for n in curves[s]))
    styles = _score_styles(names)

    with matplotlib.rc_context(_RC):
        fig = _new_figure(10, 0.5 + 4.6 * len(splits))
        axes = fig.subplots(len(splits), 2, squeeze=False)
        _margins(fig, top=0.75 if title else 0.35, hgap=0.85, nrows=len(splits), ncols=2)
        for (ax_pr, ax_roc), split in zip(axes, splits, strict=True):
            _pr_roc_row(ax_pr, ax_roc, split, curves[split], styles)
        if title:
            _title(fig, title)
        return _save(fig, path)


def _pr_roc_row(
    ax_pr: Axes,
    ax_roc: Axes,
    split: str,
    by_score: Mapping[str, tuple[np.ndarray, np.ndarray]],
    styles: Mapping[str, dict],
) -> None:
    """One split's PR and ROC panels: the score curves, the no-skill lines, titles and legends."""
    n_all, pos_all = _score_curves(ax_pr, ax_roc, split, by_score, styles)
    rate = pos_all / n_all if n_all else float("nan")
    if np.isfinite(rate) and rate > 0:
        ax_pr.axhline(rate, color="0.5", lw=1, ls=":", label=f"no skill {rate:.3f}")
    ax_roc.plot([0, 1], [0, 1], color="0.5", lw=1, ls=":", label="no skill 0.5")
    counts = f"{n_all} windows, {pos_all} positive"
    ax_pr.set_title(f"{split} · precision-recall ({counts})")
    ax_roc.set_title(f"{split} · ROC ({counts})")
    ax_pr.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    ax_roc.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        xlim=(0, 1),
        ylim=(0, 1.02),
    )
    for ax in (ax_pr, ax_roc):
        ax.grid(alpha=0.3)
    # PR curves wander anywhere; ROC curves leave the lower right free
    ax_pr.legend(loc="best", framealpha=0.85)
    ax_roc.legend(loc="lower right", framealpha=0.85)


def _score_curves(
    ax_pr: Axes,
    ax_roc: Axes,
    split: str,
    by_score: Mapping[str, tuple[np.ndarray, np.ndarray]],
    styles: Mapping[str, dict],
) -> tuple[int, int]:
    """A PR and a ROC curve per score, AP and ROC-AUC in their labels.

    Returns the most windows and positives any score kept: NaNs are dropped per score, and the
    panel titles and the no-skill rate report the fullest count.
    """
    from sklearn.metrics import (
        average_precision_score,
        precision_recall_curve,
        roc_auc_score,
        roc_curve,
    )

    n_all = pos_all = 0
    for name, (y_true, scores) in by_score.items():
        y, s = _finite_pair(y_true, scores, f"pr_roc_curves[{split!r}][{name!r}]")
        n_all, pos_all = max(n_all, y.size), max(pos_all, int(y.sum()))
        if y.size == 0 or y.all() or not y.any():
            # one class only: AP and ROC-AUC are undefined, say so in the legend
            ax_pr.plot([], [], label=f"{name}: undefined (one class)", **styles[name])
            ax_roc.plot([], [], label=f"{name}: undefined (one class)", **styles[name])
            continue
        prec, rec, _ = precision_recall_curve(y, s)
        ap = average_precision_score(y, s)
        ax_pr.step(rec, prec, where="post", lw=1.6, label=f"{name}  AP {ap:.3f}", **styles[name])
        fpr, tpr, _ = roc_curve(y, s)
        auc = roc_auc_score(y, s)
        ax_roc.plot(fpr, tpr, lw=1.6, label=f"{name}  AUC {auc:.3f}", **styles[name])
    return n_all, pos_all


def _use_log(values: np.ndarray) -> bool:
    v = values[np.isfinite(values)]
    if v.size < 2 or (v <= 0).any():
        return False
    lo, hi = np.percentile(v, [1, 99])
    return bool(np.log10(hi / lo) >= _LOG_DECADES)


def _violin(ax, groups: list[np.ndarray], positions: list[float], colors, log: bool) -> None:
    """Violins with median and quartiles; on a log axis the density is estimated in log space."""
    for data, pos, color in zip(groups, positions, colors, strict=True):
        if data.size == 0:
            continue
        d = np.log10(data) if log else data
        back = (lambda v: 10.0 ** np.asarray(v)) if log else (lambda v: np.asarray(v))
        q1, med, q3 = back(np.percentile(d, [25, 50, 75]))
        if data.size >= 3 and np.ptp(d) > 0:
            stats = violin_stats(d[:, None], _kde, quantiles=None)
            for st in stats:
                st["coords"] = back(st["coords"])
                for key in ("mean", "median", "min", "max"):
                    st[key] = float(back(st[key]))
            parts = ax.violin(stats, positions=[pos], widths=0.8, showextrema=False)
            for body in parts["bodies"]:
                body.set(facecolor=color, edgecolor=color, alpha=0.35)
        else:
            # too few distinct values for a density: show the points themselves
            ax.scatter(np.full(data.size, pos), data, s=14, color=color, zorder=3)
        ax.vlines(pos, q1, q3, color="0.15", lw=4, zorder=3)
        ax.scatter([pos], [med], s=18, color="white", edgecolor="0.15", zorder=4)


def _kde(x: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Gaussian KDE with Scott's bandwidth, written out to avoid a scipy.stats import per panel."""
    x = np.asarray(x, dtype=float).ravel()
    bw = 1.06 * x.std() * x.size ** (-1 / 5) or 1.0
    z = (coords[:, None] - x[None, :]) / bw
    return np.exp(-0.5 * z**2).sum(axis=1) / (x.size * bw * np.sqrt(2 * np.pi))


def score_distributions(
    scores: pd.DataFrame,
    tool_class: np.ndarray,
    thresholds: Mapping[str, float],
    path: str | Path,
    title: str = "",
) -> Path:
    """A violin per tool class (healthy/degraded/failed) for each score column, with its threshold.

    Positive scores spanning decades get a log axis; NaN scores are dropped.
    """
    tc = np.asarray(tool_class).ravel()
    if len(scores) != tc.size:
        raise MillvaeError(
            "score_distributions: expected one tool class per score row; "
            f"got {len(scores)} rows and {tc.size} classes"
        )
    cols = list(scores.columns)
    if not cols or tc.size == 0:
        return _empty(path, title, "no scores to draw")

    ncols = min(len(cols), 4)
    nrows = -(-len(cols) // ncols)
    with matplotlib.rc_context(_RC):
        fig = _new_figure(max(3.6 * ncols, 5.0), 0.6 + 3.4 * nrows)
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        # two-line class labels under every panel
        _margins(
            fig,
            left=0.8,
            top=0.7 if title else 0.35,
            bottom=0.6,
            wgap=0.85,
            hgap=1.0,
            nrows=nrows,
            ncols=ncols,
        )
        for ax in axes[len(cols) :]:
            ax.axis("off")
        for ax, name in zip(axes, cols, strict=False):
            _score_panel(ax, name, scores[name].to_numpy(dtype=float), tc, thresholds.get(name))
        if title:
            _title(fig, title)
        return _save(fig, path)


def _score_panel(
    ax: Axes, name: str, values: np.ndarray, tool_class: np.ndarray, threshold: float | None
) -> None:
    """One score's panel: a violin per tool class, its threshold, and how many NaNs were dropped."""
    keep = np.isfinite(values)
    groups = [values[keep & (tool_class == k)] for k in range(len(CLASS_NAMES))]
    log = _use_log(values[keep])
    if log:
        _log_y(ax)
    _violin(ax, groups, [0, 1, 2], CLASS_COLORS, log)
    # a threshold at or below zero has no place on a log axis
    if threshold is not None and np.isfinite(threshold) and (threshold > 0 or not log):
        ax.axhline(threshold, color="0.1", lw=1.2, ls="--", label=f"threshold {threshold:.3g}")
        ax.legend(loc="upper left", framealpha=0.85)
    ax.set_xticks([0, 1, 2], [f"{c}\nn={g.size}" for c, g in zip(CLASS_NAMES, groups, strict=True)])
    for tick, color in zip(ax.get_xticklabels(), CLASS_COLORS, strict=True):
        tick.set_color(color)
    ax.set_xlim(-0.6, 2.6)
    dropped = int((~keep).sum())
    ax.set_title(name + (f"  ({dropped} NaN dropped)" if dropped else ""))
    ax.set_ylabel(f"{name} score" + (" (log)" if log else ""))
    ax.grid(axis="y", alpha=0.3)


def case_trends(
    windows: pd.DataFrame,
    score: np.ndarray,
    threshold: float | None,
    path: str | Path,
    score_name: str = "",
    title: str = "",
) -> Path:
    """One panel per case: each cut's window scores in run order, shaded by tool class.

    `windows` needs columns case, cut_no, run, tool_class, split, one row per entry of `score`.
    """
    df = _trend_rows(windows, score)
    if df.empty:
        return _empty(path, title, "no finite scores to draw")
    label = score_name or "score"
    threshold = float("nan") if threshold is None else float(threshold)
    log = _use_log(df["score"].to_numpy())
    cases = sorted(df["case"].unique())
    ncols = min(len(cases), 4)
    nrows = -(-len(cases) // ncols)
    markers = _split_markers(df)
    rng = np.random.default_rng(0)  # jitter only; fixed so the same run draws the same picture

    with matplotlib.rc_context(_RC):
        fig, axes = _trend_figure(nrows, ncols)
        per_cut = _cut_means(df)
        by_case = dict(tuple(df.groupby("case", sort=False)))
        for r, ax in enumerate(axes):
            row = cases[r * ncols : (r + 1) * ncols]
            # the jitter draws come case by case, row by row: the same order gives the same picture
            panels = [
                _case_panel(ax, k, case, by_case[case], per_cut[per_cut["case"] == case], rng)
                for k, case in enumerate(row)
            ]
            _case_row(ax, panels, markers, threshold=threshold, log=log)
            ax.set_ylabel(label + (" (log)" if log else ""))
            if len(row) < ncols:
                # a short last row keeps the panel width of the rows above
                box = ax.get_position()
                ax.set_position([box.x0, box.y0, box.width * len(row) / ncols, box.height])
        if log:
            _log_y(axes[0])
        axes[-1].set_xlabel("run (cut order)")
        handles = _trend_legend(markers, threshold)
        # a narrow figure (one or two cases) wraps the legend instead of clipping it
        _bottom_legend(fig, handles, min(len(handles), 2 + 2 * ncols))
        _title(fig, title or f"{label} per cut, by case")
        return _save(fig, path)


def _trend_figure(nrows: int, ncols: int) -> tuple[Figure, np.ndarray]:
    """The case_trends figure for `nrows` rows of up to `ncols` cases, with room for the legend."""
    fig = _new_figure(max(3.4 * ncols, 5.5), 0.9 + 2.5 * nrows)
    # One axes per row of cases, each case a unit-wide panel inside it: a figure of 16
    # separate axes spent most of its time building and drawing their ticks (1.5 s of a
    # search trial, real data); four axes show the same at a third of the cost.
    axes = fig.subplots(nrows, 1, squeeze=False, sharey=True)[:, 0]
    legend_rows = 1 if ncols >= 3 else 2
    _margins(
        fig,
        left=0.8,
        top=0.6,
        bottom=0.55 + 0.22 * legend_rows,
        hgap=0.75,
        nrows=nrows,
        ncols=1,
    )
    return fig, axes


def _trend_rows(windows: pd.DataFrame, score: np.ndarray) -> pd.DataFrame:
    """The window columns case_trends draws, with the score; rows of a non-finite score dropped."""
    need = ("case", "cut_no", "run", "tool_class", "split")
    missing = [c for c in need if c not in windows.columns]
    if missing:
        raise MillvaeError(f"case_trends: expected window columns {list(need)}; missing {missing}")
    s = np.asarray(score, dtype=float).ravel()
    if s.size != len(windows):
        raise MillvaeError(
            f"case_trends: expected one score per window; got {s.size} scores for "
            f"{len(windows)} windows"
        )
    df = windows.loc[:, list(need)].reset_index(drop=True)
    df["score"] = s
    return df[np.isfinite(s)]


def _split_markers(df: pd.DataFrame) -> dict[str, str]:
    """A window marker per split, in split order."""
    # with several splits in the picture (split=cut or window) the marker tells them apart
    all_splits = sorted(df["split"].unique(), key=_split_key)
    shapes = {"train": "s", "val": "o", "test": "^"}
    return {sp: shapes.get(str(sp), "D") if len(all_splits) > 1 else "o" for sp in all_splits}


def _cut_means(df: pd.DataFrame) -> pd.DataFrame:
    """A row per cut, by case and run: its case, run, tool class and mean score."""
    # one grouping for all panels (a groupby per panel was a tenth of this figure's time)
    return (
        df.groupby("cut_no", sort=False)
        .agg(
            case=("case", "first"),
            run=("run", "first"),
            tool_class=("tool_class", "first"),
            mean=("score", "mean"),
        )
        .sort_values(["case", "run"])
    )


@dataclass
class _CasePanel:
    """What one case adds to its row of case_trends, gathered so the row draws each kind once."""

    spans: list[list[tuple[float, float]]]  # a class band per cut
    band_colors: list[str]
    x: np.ndarray  # the windows: jittered position, score, split
    y: np.ndarray
    split: np.ndarray
    mean_x: list[float]  # the cut means, NaN-terminated
    mean_y: list[float]
    ticks: list[float]
    tick_labels: list[str]


def _case_panel(
    ax: Axes,
    k: int,
    case,
    part: pd.DataFrame,
    cuts: pd.DataFrame,
    rng: np.random.Generator,
) -> _CasePanel:
    """Place one case's cuts and windows in panel [k, k + 1) of `ax` and write its header."""
    n = len(cuts)
    # cut i of the case's panel [k, k + 1): centred in its slot, a margin each side
    slot = (1.0 - 2 * _PANEL_MARGIN) / n
    centre = k + _PANEL_MARGIN + slot * (np.arange(n) + 0.5)
    pos = dict(zip(cuts.index, centre, strict=True))
    runs = cuts["run"].to_numpy()
    every = max(1, int(np.ceil(n / 6)))
    splits = sorted(part["split"].unique(), key=_split_key)
    ax.annotate(
        f"case {int(case)} · {'/'.join(map(str, splits))} · {n} cut{'s' * (n != 1)}",
        xy=(k + 0.5, 1.0),
        xycoords=ax.get_xaxis_transform(),
        xytext=(0, 4),
        textcoords="offset points",
        ha="center",
        va="bottom",
        fontsize=_RC["axes.titlesize"],
    )
    return _CasePanel(
        spans=[
            [(c - slot / 2, 0), (c - slot / 2, 1), (c + slot / 2, 1), (c + slot / 2, 0)]
            for c in centre
        ],
        band_colors=[CLASS_COLORS[int(c)] for c in cuts["tool_class"]],
        x=part["cut_no"].map(pos).to_numpy(dtype=float)
        + rng.uniform(-0.22, 0.22, len(part)) * slot,
        y=part["score"].to_numpy(),
        split=part["split"].to_numpy(),
        # NaN between cases breaks the line of cut means: one artist for the row
        mean_x=[*centre, np.nan],
        mean_y=[*cuts["mean"], np.nan],
        ticks=list(centre[::every]),
        tick_labels=[str(int(v)) for v in runs[::every]],
    )


def _case_row(
    ax: Axes,
    panels: list[_CasePanel],
    markers: Mapping[str, str],
    *,
    threshold: float,
    log: bool,
) -> None:
    """Draw a row of case panels on one axes: class bands, windows, cut means and threshold."""
    # the class bands as one collection (x in data, y spanning the axes)
    ax.add_collection(
        PolyCollection(
            [span for p in panels for span in p.spans],
            facecolors=[c for p in panels for c in p.band_colors],
            alpha=0.16,
            linewidths=0,
            transform=ax.get_xaxis_transform(),
        ),
        autolim=False,
    )
    x = np.concatenate([p.x for p in panels])
    y = np.concatenate([p.y for p in panels])
    split = np.concatenate([p.split for p in panels])
    for sp, marker in markers.items():
        m = split == sp
        # markers of a Line2D: Agg stamps one rendered marker, where a scatter
        # collection draws each point as a path (same look: scatter's s=8 is ms 8**0.5)
        ax.plot(x[m], y[m], ls="", marker=marker, ms=8**0.5, mew=0, color="0.25", alpha=0.35)
    mean_x = [v for p in panels for v in p.mean_x]
    mean_y = [v for p in panels for v in p.mean_y]
    ax.plot(mean_x, mean_y, color="#1f3b73", lw=1.4, marker="o", ms=3)
    # a threshold at or below zero has no place on a log axis
    if np.isfinite(threshold) and (threshold > 0 or not log):
        ax.axhline(threshold, color="0.1", lw=1.1, ls="--")
    for k in range(1, len(panels)):
        ax.axvline(k, color="0.55", lw=0.9)
    ax.set_xticks([t for p in panels for t in p.ticks], [s for p in panels for s in p.tick_labels])
    ax.set_xlim(0, len(panels))
    ax.grid(axis="y", alpha=0.3)


def _trend_legend(markers: Mapping[str, str], threshold: float) -> list:
    """Legend handles of case_trends: the tool classes, the window markers, cut mean, threshold."""
    handles = [
        Patch(color=c, alpha=0.35, label=n) for n, c in zip(CLASS_NAMES, CLASS_COLORS, strict=True)
    ]
    handles += [
        *[
            Line2D(
                [],
                [],
                color="0.25",
                marker=mk,
                ls="",
                ms=4,
                alpha=0.6,
                label=f"{sp} window" if len(markers) > 1 else "window",
            )
            for sp, mk in markers.items()
        ],
        Line2D([], [], color="#1f3b73", marker="o", ms=3, lw=1.4, label="cut mean"),
    ]
    if np.isfinite(threshold):
        handles.append(Line2D([], [], color="0.1", ls="--", label=f"threshold {threshold:.3g}"))
    return handles


def reconstruction_examples(
    examples: Mapping[str, tuple[np.ndarray, np.ndarray]],
    signal_names: Sequence[str],
    path: str | Path,
    title: str = "",
) -> Path:
    """Input vs reconstruction of a window per class: a column per example with its signals
    stacked, and below them the mean squared error per signal, a bar per class.
    """
    names = [str(n) for n in signal_names]
    pairs = _example_pairs(examples, names)
    if not pairs:
        return _empty(path, title, "no example windows to draw")
    errors = {k: np.mean((w - r) ** 2, axis=0) for k, (w, r) in pairs.items()}
    colors = {
        k: CLASS_COLORS[CLASS_NAMES.index(k)] if k in CLASS_NAMES else "#1f77b4" for k in pairs
    }

    nsig, ncol = len(names), len(pairs)
    # the traces of a window's signals stacked in one panel, this far apart (scaled values
    # lie in about [0, 1]); a panel per signal and class made 18 axes, whose ticks and frames
    # were most of the figure's 1.1-1.7 s in a search trial
    gap = 1.35
    offsets = gap * np.arange(nsig)[::-1]
    with matplotlib.rc_context(_RC):
        fig = _new_figure(max(3.6 * ncol, 5.5), 1.0 + 1.2 * nsig + 2.4)
        _margins(
            fig,
            left=0.95,
            top=1.0 if title else 0.65,
            bottom=0.85,
            wgap=0.35,
            hgap=0.85,
            nrows=2,
            ncols=ncol,
        )
        grid = fig.add_gridspec(2, ncol, height_ratios=[1.2 * nsig, 1.6])
        traces = [fig.add_subplot(grid[0, 0])]
        traces += [fig.add_subplot(grid[0, j], sharey=traces[0]) for j in range(1, ncol)]
        for j, (ax, (key, (win, rec))) in enumerate(zip(traces, pairs.items(), strict=True)):
            _example_panel(ax, key, win, rec, errors[key], colors[key], offsets, first=j == 0)
        traces[0].set_yticks(offsets + 0.5, names)
        traces[0].set_ylim(-0.25, offsets[0] + 1.3)
        _error_bars(fig.add_subplot(grid[1, :]), errors, colors, names)
        _bottom_legend(
            fig,
            [
                Line2D([], [], color="0.15", lw=1.1, label="input"),
                *[
                    Line2D([], [], color=colors[k], lw=1.4, label=f"reconstruction ({k})")
                    for k in pairs
                ],
            ],
            ncol + 1,
        )
        if title:
            _title(fig, title)
        return _save(fig, path)


def _example_pairs(
    examples: Mapping[str, tuple[np.ndarray, np.ndarray]], names: Sequence[str]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each example as a [window, signal] input and reconstruction, the tool classes first in
    healthy/degraded/failed order, then any other key as given."""
    order = [k for k in CLASS_NAMES if k in examples] + [
        k for k in examples if k not in CLASS_NAMES
    ]
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key in order:
        win, rec = (np.asarray(a, dtype=float) for a in examples[key])
        # a single window may come with its batch axis
        win = win[0] if win.ndim == 3 and win.shape[0] == 1 else win
        rec = rec[0] if rec.ndim == 3 and rec.shape[0] == 1 else rec
        if win.ndim != 2 or win.shape != rec.shape or win.shape[1] != len(names):
            raise MillvaeError(
                f"reconstruction_examples[{key!r}]: expected window and reconstruction of shape "
                f"[window, {len(names)}]; got {win.shape} and {rec.shape}"
            )
        pairs[key] = (win, rec)
    return pairs


def _example_panel(
    ax: Axes,
    key: str,
    win: np.ndarray,
    rec: np.ndarray,
    error: np.ndarray,
    color: str,
    offsets: np.ndarray,
    *,
    first: bool,
) -> None:
    """One example's column: its signals' input and reconstruction stacked at `offsets`, each
    with its squared error; only the first column labels the shared y axis."""
    nsig, t = len(offsets), np.arange(win.shape[0])
    # NaN rows separate the signals: one line for all inputs, one for all reconstructions
    sep = np.full((1, nsig), np.nan)
    tt = np.tile(np.append(t, t[-1]), nsig)
    ax.plot(tt, np.vstack([win + offsets, sep]).T.ravel(), color="0.15", lw=1.1)
    ax.plot(tt, np.vstack([rec + offsets, sep]).T.ravel(), color=color, lw=1.4)
    for i in range(nsig):
        ax.text(
            t[-1],
            offsets[i] + 1.02,
            f"sq. error {error[i]:.2e}",
            ha="right",
            va="bottom",
            fontsize=7.5,
            color="0.3",
        )
    ax.set_title(
        f"{key}  (mse {error.mean():.2e})", fontsize=10.5, fontweight="bold", color=color, pad=8
    )
    ax.set_xlim(t[0], t[-1])
    ax.set_xlabel("sample in window")
    ax.grid(axis="x", alpha=0.3)
    ax.spines["left"].set_visible(False)
    ax.tick_params(axis="y", length=0, labelleft=first)


def _error_bars(
    ax: Axes, errors: Mapping[str, np.ndarray], colors: Mapping[str, str], names: Sequence[str]
) -> None:
    """The mean squared error per signal, a bar per example side by side."""
    nsig, ncol = len(names), len(errors)
    width = min(0.8 / ncol, 0.27)  # one or two classes: bars of the usual width
    for j, (key, err) in enumerate(errors.items()):
        pos = np.arange(nsig) + (j - (ncol - 1) / 2) * width
        ax.bar(pos, err, width=width, color=colors[key], alpha=0.8)
    ax.set_xticks(np.arange(nsig), names)
    ax.set_xlim(-0.6, nsig - 0.4)
    ax.set_title("mean squared error per signal", fontsize=9)
    ax.set_ylabel("sq. error")
    ax.grid(axis="y", alpha=0.3)


def loss_curves(history: pd.DataFrame, best_epoch: int, path: str | Path) -> Path:
    """Training and validation loss, reconstruction loss and KL per epoch (log y), best epoch
    marked. `history` has an `epoch` column and Keras' history keys."""
    finite = history.replace([np.inf, -np.inf], np.nan)
    keys = ("loss", "reconstruction_loss", "kl_loss")
    with matplotlib.rc_context(_RC):
        fig = _new_figure(13, 3.6)
        axes = fig.subplots(1, 3)
        _margins(fig, left=0.65, top=0.35, bottom=0.55, wgap=0.7, ncols=3)
        for ax, key in zip(axes, keys, strict=True):
            if key not in finite:
                ax.axis("off")
                continue
            ax.plot(finite["epoch"], finite[key], label="train")
            if f"val_{key}" in finite:
                ax.plot(finite["epoch"], finite[f"val_{key}"], label="validation (healthy)")
            # the first epochs' validation values can be orders of magnitude larger
            values = finite[[c for c in (key, f"val_{key}") if c in finite]].to_numpy().ravel()
            if _use_log(values):
                _log_y(ax)
            ax.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"best epoch {best_epoch}")
            ax.set_title(key.replace("_", " "))
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        axes[0].legend(framealpha=0.85)
        return _save(fig, path)
