"""Data preparation as pure functions on arrays: wear, tool class, windows, splits, scaling."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from millvae.errors import MillvaeError

CLASS_NAMES = ("healthy", "degraded", "failed")
HEALTHY, DEGRADED, FAILED = 0, 1, 2
SPLITS = ("window", "case", "cut")
LABEL_COLUMNS = ("cut_no", "window_start", "window_end")


def interpolate_flank_wear(cuts: pd.DataFrame) -> pd.Series:
    """Fill missing VB linearly within each case in run order.

    A case's first cut with no measurement is taken as a new tool (VB = 0): every case starts with a
    fresh insert. After the last measurement the last value is held.
    """
    vb = cuts["VB"].astype(float).copy()
    for _, group in cuts.groupby("case", sort=False):
        order = group.sort_values("run")
        runs = order["run"].to_numpy(dtype=float)
        values = order["VB"].to_numpy(dtype=float).copy()
        if np.isnan(values[0]):
            values[0] = 0.0
        known = ~np.isnan(values)
        vb.loc[order.index] = np.interp(runs, runs[known], values[known])
    return vb


def tool_class(vb: np.ndarray | pd.Series, healthy_max: float = 0.2, failed_min: float = 0.7):
    """0 healthy (VB < healthy_max), 1 degraded, 2 failed (VB >= failed_min)."""
    vb = np.asarray(vb, dtype=float)
    return np.where(vb < healthy_max, HEALTHY, np.where(vb < failed_min, DEGRADED, FAILED))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _whole_numbers(col: pd.Series) -> bool:
    """Every value a finite whole number (bools are not numbers here: True/False are no samples)."""
    if pd.api.types.is_bool_dtype(col) or not pd.api.types.is_numeric_dtype(col):
        return False
    values = col.to_numpy(dtype=np.float64)
    return bool(np.isfinite(values).all() and (values == np.round(values)).all())


def read_labels(path: str | Path) -> pd.DataFrame:
    """Read a labels CSV in the seed's format; returns it indexed by cut_no."""
    path = Path(path)
    if not path.is_file():
        why = "a directory" if path.is_dir() else "no such file"
        raise MillvaeError(f"labels: expected a CSV file; got {str(path)!r} ({why})")
    try:
        df = pd.read_csv(path)
    except UnicodeDecodeError as exc:
        raise MillvaeError(
            f"labels: expected a CSV text file; {path.name} is not UTF-8 text "
            f"(byte 0x{exc.object[exc.start]:02x} at position {exc.start})"
        ) from None
    except pd.errors.EmptyDataError:
        raise MillvaeError(
            f"labels: expected a CSV file with a header row; {path.name} is empty"
        ) from None
    except Exception as exc:
        # pandas' tokenizer messages end in a newline; the user gets one line
        raise MillvaeError(
            f"labels: expected a CSV file; could not parse {path.name} ({_first_line(exc)})"
        ) from None
    missing = [c for c in LABEL_COLUMNS if c not in df.columns]
    if missing:
        raise MillvaeError(
            f"labels: expected columns {', '.join(LABEL_COLUMNS)}; {path.name} lacks "
            f"{', '.join(missing)} (has {', '.join(map(str, df.columns))})"
        )
    if df.empty:
        raise MillvaeError(f"labels: expected one row per cut; {path.name} has only its header")
    for c in (*LABEL_COLUMNS, *(["case"] if "case" in df.columns else [])):
        if not _whole_numbers(df[c]):
            bad = df[c][~df[c].map(_is_whole)].iloc[:1].tolist()
            shown = f"; got {bad[0]!r}" if bad else ""
            raise MillvaeError(
                f"labels: expected whole numbers in column {c!r} of {path.name}{shown}"
            )
    df[list(LABEL_COLUMNS)] = df[list(LABEL_COLUMNS)].astype(np.int64)
    if (df["cut_no"] < 0).any():
        raise MillvaeError(
            f"labels: expected cut_no >= 0 (the record's position in the file) in {path.name}; "
            f"got {int(df['cut_no'].min())}"
        )
    if df["cut_no"].duplicated().any():
        dup = int(df.loc[df["cut_no"].duplicated(), "cut_no"].iloc[0])
        raise MillvaeError(
            f"labels: expected one row per cut_no in {path.name}; cut_no {dup} appears twice"
        )
    return df.set_index("cut_no")


def _is_whole(value: object) -> bool:
    if isinstance(value, bool | np.bool_):
        return False
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return bool(np.isfinite(f) and f == round(f))


def regions_from_labels(
    labels: pd.DataFrame,
    cut_nos: Sequence[int],
    n_samples: int,
    cut_case: Sequence[int] | None = None,
) -> np.ndarray:
    """The [start, end) stable region of each cut from a labels table.

    With ``cut_case`` (each cut's case in the data) and a ``case`` column in the labels, every
    used row must name the cut's case: labels made for another file would pick wrong regions.
    """
    absent = [c for c in cut_nos if c not in labels.index]
    if absent:
        raise MillvaeError(
            f"labels: expected a row for every cut of the data; missing cut_no {absent[:5]}"
            + (" ..." if len(absent) > 5 else "")
        )
    if cut_case is not None and "case" in labels.columns:
        theirs = labels.loc[list(cut_nos), "case"].to_numpy(dtype=np.int64)
        ours = np.asarray(cut_case, dtype=np.int64)
        wrong = np.flatnonzero(theirs != ours)
        if wrong.size:
            k = int(wrong[0])
            raise MillvaeError(
                f"labels: expected each cut_no's case to match the data; cut {cut_nos[k]} is "
                f"case {ours[k]} in the data but case {theirs[k]} in the labels "
                f"({wrong.size} cuts differ: labels for another file?)"
            )
    reg = labels.loc[list(cut_nos), ["window_start", "window_end"]].to_numpy(dtype=np.int64)
    bad = (reg[:, 0] < 0) | (reg[:, 1] > n_samples) | (reg[:, 1] <= reg[:, 0])
    if bad.any():
        c = int(np.asarray(cut_nos)[bad][0])
        raise MillvaeError(
            f"labels: expected 0 <= window_start < window_end <= {n_samples}; cut {c} has "
            f"{labels.loc[c, 'window_start']}..{labels.loc[c, 'window_end']}"
        )
    return reg


def window_starts(
    regions: np.ndarray, window_size: int, stride: int
) -> tuple[np.ndarray, np.ndarray]:
    """(cut row, start sample) of every window that fits inside each cut's region, in cut order."""
    regions = np.asarray(regions, dtype=np.int64)
    length = regions[:, 1] - regions[:, 0]
    counts = np.where(length >= window_size, (length - window_size) // stride + 1, 0)
    rows = np.repeat(np.arange(len(regions)), counts)
    # position of each window within its cut: a running index that restarts at every cut
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    starts = regions[rows, 0] + offsets * stride
    return rows, starts


def cut_windows(signals: np.ndarray, rows: np.ndarray, starts: np.ndarray, window_size: int):
    """Gather windows [n, window, signal] from [cut, sample, signal] without a Python loop."""
    idx = starts[:, None] + np.arange(window_size)[None, :]
    return signals[rows[:, None], idx, :]


@dataclass
class MinMaxScaler:
    """Per-signal min-max scaling to [0, 1] (on the data it was fitted on)."""

    min: np.ndarray
    max: np.ndarray
    signal_names: tuple[str, ...]
    window_size: int

    @classmethod
    def fit(cls, windows: np.ndarray, signal_names: Sequence[str], window_size: int):
        # per-signal reductions over contiguous slices are ~10x faster than axis=0 on the flat view
        n = windows.shape[-1]
        return cls(
            np.array([windows[..., j].min() for j in range(n)], dtype=np.float32),
            np.array([windows[..., j].max() for j in range(n)], dtype=np.float32),
            tuple(signal_names),
            int(window_size),
        )

    def transform(self, windows: np.ndarray) -> np.ndarray:
        span = self.max - self.min
        span = np.where(span > 0, span, 1.0).astype(np.float32)
        return ((windows - self.min) / span).astype(np.float32, copy=False)

    def inverse_transform(self, scaled: np.ndarray) -> np.ndarray:
        span = self.max - self.min
        span = np.where(span > 0, span, 1.0).astype(np.float32)
        return (np.asarray(scaled, dtype=np.float32) * span + self.min).astype(np.float32)

    def to_dict(self) -> dict:
        return {
            "signal_names": list(self.signal_names),
            "min": [float(v) for v in self.min],
            "max": [float(v) for v in self.max],
            "window_size": self.window_size,
        }

    @classmethod
    def from_dict(cls, d: dict) -> MinMaxScaler:
        return cls(
            np.asarray(d["min"], dtype=np.float32),
            np.asarray(d["max"], dtype=np.float32),
            tuple(d["signal_names"]),
            int(d["window_size"]),
        )


def split_windows(y: np.ndarray, random_states: tuple[int, int] = (15, 10)) -> np.ndarray:
    """The seed's protocol: a stratified random split of windows (leaks cuts across splits).

    Returns an array of split names per window: train / val / test.
    """
    idx = np.arange(len(y))
    train, rest = train_test_split(idx, test_size=0.33, random_state=random_states[0], stratify=y)
    val, test = train_test_split(
        rest, test_size=0.5, random_state=random_states[1], stratify=y[rest]
    )
    out = np.empty(len(y), dtype=object)
    out[train], out[val], out[test] = "train", "val", "test"
    return out


def split_cases(cut_case: np.ndarray, cut_class: np.ndarray, split_seed: int) -> np.ndarray:
    """Leak-free protocol: whole cases (tools) to one split.

    Tools that reach failure are divided between validation and test (seeded), so thresholds and
    model selection see failures while test judges other tools; tools that never fail train.
    """
    cases = np.unique(cut_case)
    failing = np.array([c for c in cases if (cut_class[cut_case == c] == FAILED).any()])
    if len(failing) < 2:
        raise MillvaeError(
            "split=case: expected at least 2 tools (cases) that reach failure; "
            f"found {len(failing)} ({', '.join(map(str, failing)) or 'none'}); use split=window"
        )
    if len(failing) == len(cases):
        raise MillvaeError(
            "split=case: expected some tools that never fail to train on; found none"
        )
    rng = np.random.default_rng(split_seed)
    shuffled = rng.permutation(failing)
    n_val = (len(shuffled) + 1) // 2
    assign = {c: "train" for c in cases}
    assign.update({c: "val" for c in shuffled[:n_val]})
    assign.update({c: "test" for c in shuffled[n_val:]})
    return np.array([assign[c] for c in cut_case], dtype=object)


def casefold_assignment(cut_case: np.ndarray, cut_class: np.ndarray, folds: int) -> dict:
    """Failing tool -> its test fold (0..folds-1), the same for every fold of one data set.

    Tools are placed largest first (by failed cuts, then case number) into the fold holding the
    fewest failed cuts so far, so that one tool with many failures (case 13 holds 5 of the 12) does
    not leave another fold with almost none; no random state, so fold k is fold k everywhere.
    """
    cases = np.unique(cut_case)
    failed = {c: int((cut_class[cut_case == c] == FAILED).sum()) for c in cases}
    failing = [c for c in cases if failed[c] > 0]
    if len(failing) < folds:
        raise MillvaeError(
            f"split=casefold: expected at least folds={folds} tools that reach failure, one per "
            f"test fold; found {len(failing)} ({', '.join(map(str, failing)) or 'none'}): "
            f"lower folds to <= {max(len(failing), 2)}"
        )
    if len(failing) == len(cases):
        raise MillvaeError(
            "split=casefold: expected some tools that never fail to train on; found none"
        )
    load = [0] * folds
    size = [0] * folds
    assign = {}
    for c in sorted(failing, key=lambda c: (-failed[c], c)):
        k = min(range(folds), key=lambda k: (load[k], size[k], k))
        assign[c] = k
        load[k] += failed[c]
        size[k] += 1
    return assign


def split_casefold(
    cut_case: np.ndarray, cut_class: np.ndarray, folds: int, fold: int
) -> np.ndarray:
    """Leak-free cross-validation over tools: fold `fold` tests its failing tools; every other
    failing tool validates (thresholds and selection see failures); tools that never fail train."""
    if not 0 <= fold < folds:
        raise MillvaeError(f"split=casefold: expected a fold 0..{folds - 1}; got {fold}")
    assign = casefold_assignment(cut_case, cut_class, folds)
    out = np.full(len(cut_case), "train", dtype=object)
    for c, k in assign.items():
        out[cut_case == c] = "test" if k == fold else "val"
    return out


def split_cuts(cut_class: np.ndarray, split_seed: int) -> np.ndarray:
    """Whole cuts to one split, stratified by tool class (0.33 held out, then halved)."""
    idx = np.arange(len(cut_class))
    try:
        train, rest = train_test_split(
            idx, test_size=0.33, random_state=split_seed, stratify=cut_class
        )
        val, test = train_test_split(
            rest, test_size=0.5, random_state=split_seed + 1, stratify=cut_class[rest]
        )
    except ValueError as exc:
        counts = np.bincount(cut_class, minlength=3).tolist()
        raise MillvaeError(
            f"split=cut: expected enough cuts of every class to stratify; have {counts} ({exc})"
        ) from None
    out = np.empty(len(cut_class), dtype=object)
    out[train], out[val], out[test] = "train", "val", "test"
    return out
