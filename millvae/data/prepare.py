"""From a `data` parameter to scaled, split windows: the whole preparation of one run."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from millvae.config import TrainConfig
from millvae.data.mat import MillData, load_mill
from millvae.data.regions import detect_regions_with_sources
from millvae.data.sources import DataFile, resolve_data, resolve_labels
from millvae.data.windows import (
    CLASS_NAMES,
    HEALTHY,
    MinMaxScaler,
    cut_windows,
    interpolate_flank_wear,
    read_labels,
    regions_from_labels,
    split_casefold,
    split_cases,
    split_cuts,
    split_windows,
    tool_class,
    window_starts,
)
from millvae.detect.metrics import positive_labels
from millvae.errors import MillvaeError

SPLIT_NAMES = ("train", "val", "test")


@dataclass
class Prepared:
    """Everything a run trains and scores on. `windows` has one row per window (same order as x)."""

    x: np.ndarray  # scaled windows [n, window, signal], float32
    windows: pd.DataFrame  # cut_no, case, run, VB, tool_class, DOC, feed, material, start, split
    scaler: MinMaxScaler
    signal_names: tuple[str, ...]
    data_source: str  # "real" | "synthetic"
    data_path: str
    data_sha256: str
    regions_from: str  # "labels" | "detected"
    dropped: dict[int, str] = field(default_factory=dict)
    cuts: pd.DataFrame = field(default_factory=pd.DataFrame)
    labels_path: str = ""  # the labels CSV the regions came from ("" when detected)
    labels_sha256: str = ""

    def mask(self, split: str, slim: bool = False) -> np.ndarray:
        m = (self.windows["split"] == split).to_numpy()
        if slim:
            m = m & (self.windows["tool_class"] == HEALTHY).to_numpy()
        return m

    def get(self, split: str, slim: bool = False) -> np.ndarray:
        return self.x[self.mask(split, slim)]

    def counts(self) -> dict[str, int]:
        """Window counts per split and class, e.g. n_train, n_train_slim, n_test_failed."""
        out: dict[str, int] = {"n_windows": len(self.windows), "n_cuts": len(self.cuts)}
        if "region_signal" in self.cuts:
            out["n_regions_central_fallback"] = int((self.cuts["region_signal"] == "central").sum())
        for s in SPLIT_NAMES:
            part = self.windows[self.windows["split"] == s]
            out[f"n_{s}"] = len(part)
            out[f"n_{s}_slim"] = int((part["tool_class"] == HEALTHY).sum())
            for k, name in enumerate(CLASS_NAMES):
                out[f"n_{s}_{name}"] = int((part["tool_class"] == k).sum())
            out[f"n_{s}_cuts"] = int(part["cut_no"].nunique())
            out[f"n_{s}_cases"] = int(part["case"].nunique())
        return out


def prepare_from_mill(
    mill: MillData, cfg: TrainConfig, labels_file: DataFile | None = None
) -> tuple:
    """Label cuts, find regions, cut windows and split them (unscaled): pure array work.

    ``labels_file`` is ``cfg.labels`` already resolved (see `resolve_labels`); without it the
    labels parameter is resolved here.
    """
    cuts = mill.cuts.copy()
    cuts["VB_filled"] = interpolate_flank_wear(cuts)
    cuts["tool_class"] = tool_class(cuts["VB_filled"], cfg.healthy_max_vb, cfg.failed_min_vb)
    if labels_file is None and cfg.labels:
        labels_file = resolve_labels(cfg.labels)
    if labels_file is not None:
        regions = _regions_from_labels_file(mill, cuts, labels_file)
        regions_from = "labels"
    else:
        regions = _detected_regions(mill, cuts, cfg.window_size)
        regions_from = "detected"
    cuts["region_start"], cuts["region_end"] = regions[:, 0], regions[:, 1]

    rows, starts = window_starts(regions, cfg.window_size, cfg.stride)
    if len(rows) == 0:
        raise MillvaeError(
            f"window_size: expected windows of {cfg.window_size} samples to fit in the stable "
            "regions; none does"
        )
    raw = cut_windows(mill.signals, rows, starts, cfg.window_size)
    windows = _window_table(cuts.iloc[rows], starts)
    windows["split"] = _split(windows["tool_class"].to_numpy(), cuts, rows, cfg)
    return raw, windows, cuts, regions_from


def _regions_from_labels_file(mill: MillData, cuts: pd.DataFrame, labels_file: DataFile):
    """The seed's hand-labelled stable regions; warns where its tool class disagrees with ours."""
    labels = read_labels(labels_file.path)
    regions = regions_from_labels(
        labels, cuts.index.tolist(), mill.n_samples, cuts["case"].to_numpy()
    )
    if "tool_class" in labels.columns:
        theirs = labels.loc[cuts.index, "tool_class"].to_numpy()
        differ = cuts.index[theirs != cuts["tool_class"].to_numpy()].tolist()
        if differ:
            warnings.warn(
                f"labels: tool_class of cuts {differ} differs from the one computed from VB; "
                "using the computed class",
                stacklevel=3,
            )
    return regions


def _detected_regions(mill: MillData, cuts: pd.DataFrame, window_size: int):
    """Stable regions found in the signals; notes in `cuts` which signal decided each."""
    regions, deciders = detect_regions_with_sources(mill.signals, mill.signal_names, window_size)
    cuts["region_signal"] = deciders
    central = cuts.index[deciders == "central"].tolist()
    if central:
        warnings.warn(
            f"no clear cutting phase found in cuts {central}; using the central half of each",
            stacklevel=3,
        )
    return regions


def _window_table(cut_meta: pd.DataFrame, starts: np.ndarray) -> pd.DataFrame:
    """One row per window: its cut's identity, wear, class and cutting condition."""
    return pd.DataFrame(
        {
            "cut_no": cut_meta.index.to_numpy(),
            "case": cut_meta["case"].to_numpy(),
            "run": cut_meta["run"].to_numpy(),
            "VB": cut_meta["VB_filled"].to_numpy(),
            "tool_class": cut_meta["tool_class"].to_numpy(),
            "DOC": cut_meta["DOC"].to_numpy(),
            "feed": cut_meta["feed"].to_numpy(),
            "material": cut_meta["material"].to_numpy(),
            "start": starts,
        }
    )


def _split(y: np.ndarray, cuts: pd.DataFrame, rows: np.ndarray, cfg: TrainConfig) -> np.ndarray:
    """Each window's split: per window (the seed's, leaky), per tool, per tool fold or per cut."""
    if cfg.split == "window":
        present = np.bincount(y, minlength=3)
        if (present[present > 0] < 4).any():
            raise MillvaeError(
                "split=window: expected >= 4 windows of every class present; "
                f"got {present.tolist()}"
            )
        return split_windows(y)
    if cfg.split == "case":
        per_cut = split_cases(
            cuts["case"].to_numpy(), cuts["tool_class"].to_numpy(), cfg.split_seed
        )
    elif cfg.split == "casefold":
        per_cut = split_casefold(
            cuts["case"].to_numpy(), cuts["tool_class"].to_numpy(), cfg.folds, cfg.split_seed
        )
    else:
        per_cut = split_cuts(cuts["tool_class"].to_numpy(), cfg.split_seed)
    return per_cut[rows]


def prepare(cfg: TrainConfig, mill: MillData | None = None, data_file=None) -> Prepared:
    """Resolve the data source, load it and prepare scaled, split windows."""
    # before the data: labels=seed fails in a second where data=nasa may first fetch 72 MB
    labels_file = resolve_labels(cfg.labels) if cfg.labels else None
    if mill is None:
        data_file = resolve_data(cfg.data)
        mill = load_mill(data_file.path, cfg.signals)
    raw, windows, cuts, regions_from = prepare_from_mill(mill, cfg, labels_file)
    train = (windows["split"] == "train").to_numpy()
    if not (train & (windows["tool_class"] == HEALTHY).to_numpy()).any():
        # the model learns healthy cutting only: with none there is nothing to train on
        raise MillvaeError(
            f"split: expected healthy windows (VB < {cfg.healthy_max_vb:g} mm) in the training "
            f"split; found none (train holds {_class_counts(windows, 'train')} windows, "
            f"split={cfg.split})"
        )
    scaler = MinMaxScaler.fit(raw[train], mill.signal_names, cfg.window_size)
    return Prepared(
        x=scaler.transform(raw),
        windows=windows,
        scaler=scaler,
        signal_names=mill.signal_names,
        data_source="synthetic" if mill.synthetic else "real",
        data_path=str(data_file.path) if data_file is not None else "",
        data_sha256=data_file.sha256 if data_file is not None else "",
        regions_from=regions_from,
        dropped=dict(mill.dropped),
        cuts=cuts,
        labels_path=str(labels_file.path) if labels_file is not None else "",
        labels_sha256=labels_file.sha256 if labels_file is not None else "",
    )


def _class_counts(windows: pd.DataFrame, split: str) -> str:
    """'12 healthy / 0 degraded / 3 failed' for one split."""
    tc = windows.loc[windows["split"] == split, "tool_class"].to_numpy()
    n = np.bincount(tc.astype(np.int64), minlength=3)
    return " / ".join(f"{int(k)} {name}" for k, name in zip(n, CLASS_NAMES, strict=True))


def why_no_detection(prepared: Prepared, positive: str = "failed") -> str | None:
    """Which detection figures this data cannot give, and why, in one line; None when all.

    A split without both classes (``positive``: failed, or worn = degraded + failed) gives none of
    its own figures; a validation split without them also gives no threshold, hence no detector,
    no F1 and no cut-level test figures (as `evaluate.evaluate` skips them).
    """
    y = positive_labels(prepared.windows["tool_class"].to_numpy(), positive)
    split = prepared.windows["split"].to_numpy()
    pos = "failed" if positive == "failed" else "worn (degraded or failed)"
    neg = "healthy or degraded" if positive == "failed" else "healthy"
    missing = {
        "val": "no threshold, detector, validation figures, F1 or cut-level test figures",
        "test": "no test figures",
    }
    gaps = []
    for part, title in (("val", "validation"), ("test", "test")):
        yp = y[split == part]
        lacks = [what for what, present in ((pos, yp.any()), (neg, (~yp).any())) if not present]
        if lacks:
            gaps.append(f"{title} has no {' and no '.join(lacks)} window ({missing[part]})")
    if not gaps:
        return None
    if not y.any():
        gaps.append(f"the data holds no {pos} window at all")
    elif y.all():
        gaps.append(f"the data holds no {neg} window at all")
    return (
        f"detection metrics incomplete (positive={positive}): {'; '.join(gaps)} "
        f"(validation: {_class_counts(prepared.windows, 'val')}; "
        f"test: {_class_counts(prepared.windows, 'test')})"
    )
