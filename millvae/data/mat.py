"""Read a `mill.mat` (the UC Berkeley milling MATLAB struct) into a cuts table and signals."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io

from millvae import META_FIELDS, SIGNAL_NAMES
from millvae.errors import MillvaeError

# The DAQ of the original experiment records volts within about ±10 V; anything far beyond that is
# garbage (record 17 of the real file holds values around 1e29).
ABSURD_ABS_VALUE = 100.0


@dataclass
class MillData:
    """Good cuts of a milling file.

    `cuts` is indexed by `cut_no` (the record's 0-based position in the file) with columns case,
    run, VB, time, DOC, feed, material; `signals[i]` is the [sample, signal] array of cut i.
    """

    cuts: pd.DataFrame
    signals: np.ndarray
    signal_names: tuple[str, ...]
    dropped: dict[int, str] = field(default_factory=dict)
    synthetic: bool = False
    n_records: int = 0

    @property
    def n_samples(self) -> int:
        return int(self.signals.shape[1])


def _kind_problem(value: object) -> str | None:
    """Why a field's value cannot be numbers ("is text", ...), or None when it can."""
    arr = np.asarray(value)
    if arr.dtype.kind in "US":
        return "is text"
    if arr.dtype.kind in "OV":  # scipy loads MATLAB cells and structs as object/record arrays
        return "is a MATLAB cell or struct"
    if arr.dtype.kind == "c":
        return "holds complex numbers"
    if arr.dtype.kind not in "biuf":
        return f"holds {arr.dtype} values"
    return None


def _signal_length(value: object) -> tuple[int, str | None]:
    """(samples, problem) of one signal field: a real numeric vector has no problem."""
    kind = _kind_problem(value)
    arr = np.asarray(value)
    if kind is not None:
        return -1, f"{kind}, expected {'real ' if arr.dtype.kind == 'c' else ''}numbers"
    if sum(d > 1 for d in arr.shape) > 1:  # [n, 1], [1, n] and [n] are vectors; [n, 2] is not
        return -1, f"has shape {'x'.join(map(str, arr.shape))}, expected a vector of samples"
    return int(arr.size), None


def _record_problem(
    rec: np.void, signals: Sequence[str], lengths: Sequence[int], expected_len: int | None
) -> str | None:
    """The first reason a record cannot be used, in words; None for a good record."""
    for s in signals:
        _, problem = _signal_length(rec[s])
        if problem:
            return f"signal {s!r} {problem}"
    wrong = [(s, n) for s, n in zip(signals, lengths, strict=True) if n != expected_len]
    if wrong:
        n_first = wrong[0][1]
        if len(wrong) == len(signals) and all(n == n_first for _, n in wrong):
            return f"{n_first} samples, expected {expected_len}"
        return f"signal {wrong[0][0]!r} has {n_first} samples, expected {expected_len}"
    values = np.stack([np.asarray(rec[s], dtype=np.float64).ravel() for s in signals])
    if not np.isfinite(values).all():
        return "non-finite values"
    if np.abs(values).max() > ABSURD_ABS_VALUE:
        return f"absurd values (|x| up to {np.abs(values).max():.3g})"
    for f in META_FIELDS:
        kind = _kind_problem(rec[f])
        if kind is not None:
            return f"metadata {f!r} {kind}, expected a number"
        if np.asarray(rec[f]).size > 1:
            return f"metadata {f!r} has {np.asarray(rec[f]).size} values, expected one number"
    if not all(np.isfinite(_scalar(rec[f])) for f in META_FIELDS if f != "VB"):
        return "missing metadata"
    return None


def _scalar(value: np.ndarray) -> float:
    arr = np.asarray(value, dtype=np.float64).ravel()
    return float(arr[0]) if arr.size else float("nan")


def parse_signals(spec: str | Sequence[str] | None, present: Sequence[str]) -> tuple[str, ...]:
    """Resolve the `signals` parameter against the signal fields a file has.

    `all` (or None) means the six signals of the original data set; `available` means every known
    signal the file has, in the file's order; otherwise a comma-separated list of names.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        wanted = list(SIGNAL_NAMES)
    elif isinstance(spec, str) and spec.strip().lower() == "available":
        wanted = [s for s in present if s in SIGNAL_NAMES]
    elif isinstance(spec, str):
        wanted = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        wanted = list(spec)
    missing = [s for s in wanted if s not in present]
    if missing:
        raise MillvaeError(
            f"signals: the file lacks {', '.join(missing)}; it has {', '.join(present) or 'none'} "
            f"(pass e.g. signals={','.join(present)} or signals=available)"
        )
    if not wanted or len(set(wanted)) != len(wanted):
        raise MillvaeError(f"signals: expected distinct signal names; got {spec!r}")
    return tuple(wanted)


def load_mill(path: str | Path, signals: str | Sequence[str] | None = None) -> MillData:
    """Load `path`, drop corrupted records (with a warning naming them) and stack the signals."""
    path = Path(path)
    mat = _read_mat(path)
    mill = _mill_struct(mat, path)
    present = [n for n in mill.dtype.names if n not in META_FIELDS]
    wanted = parse_signals(signals, present)
    records = mill.ravel()
    if records.size == 0:
        raise MillvaeError(f"data: expected at least one cut in 'mill'; {path.name} has none")
    # Every known signal is checked, not only the wanted ones, so the same records are dropped
    # whichever signals a run uses (the split counts then do not depend on `signals`).
    known = [s for s in present if s in SIGNAL_NAMES or s in wanted]
    expected_len, dropped = _screen(records, known)
    keep = [i for i in range(records.size) if i not in dropped]
    if not keep:
        raise MillvaeError(
            f"data: expected at least one good record in {path.name}; every one of its "
            f"{records.size} is corrupted (record 0: {dropped[0]})"
        )
    meta = {f: [_scalar(records[i][f]) for i in keep] for f in META_FIELDS}
    cuts = pd.DataFrame(meta, index=pd.Index(keep, name="cut_no"))
    for col in ("case", "run", "material"):
        cuts[col] = cuts[col].astype(np.int64)
    sig = np.empty((len(keep), expected_len, len(wanted)), dtype=np.float32)
    for row, i in enumerate(keep):
        for j, s in enumerate(wanted):
            sig[row, :, j] = np.asarray(records[i][s]).ravel()
    return MillData(
        cuts=cuts,
        signals=sig,
        signal_names=wanted,
        dropped=dropped,
        synthetic="millvae_synthetic" in mat,
        n_records=int(records.size),
    )


def _read_mat(path: Path) -> dict:
    """The MATLAB file's variables, or a one-line error saying what the file is instead."""
    if not path.is_file():
        raise MillvaeError(f"data: expected a mill.mat file; got {str(path)!r} (no such file)")
    try:
        return scipy.io.loadmat(str(path), squeeze_me=False)
    except NotImplementedError as exc:
        raise MillvaeError(
            f"data: expected a MATLAB v5 mill.mat; {path} is a v7.3/HDF5 file ({exc})"
        ) from None
    except Exception as exc:  # scipy raises ValueError/TypeError/OSError for non-MAT content
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MillvaeError(
            f"data: expected a MATLAB .mat file; {path} is not one ({reason})"
        ) from None


def _mill_struct(mat: dict, path: Path) -> np.ndarray:
    """The `mill` struct array, checked to carry every metadata field."""
    if "mill" not in mat:
        keys = [k for k in mat if not k.startswith("__")]
        raise MillvaeError(
            f"data: expected a variable 'mill' in {path.name}; found {', '.join(keys) or 'none'}"
        )
    mill = mat["mill"]
    names = mill.dtype.names or ()
    missing_meta = [f for f in META_FIELDS if f not in names]
    if missing_meta:
        raise MillvaeError(
            f"data: 'mill' lacks the fields {', '.join(missing_meta)}; it has {', '.join(names)}"
        )
    return mill


def _screen(records: np.ndarray, known: Sequence[str]) -> tuple[int | None, dict[int, str]]:
    """(the length most records have, {record: why it is dropped}); warns naming the dropped."""
    lengths = np.array([[_signal_length(r[s])[0] for s in known] for r in records])
    usable = lengths[(lengths >= 0).all(axis=1)]
    expected_len = Counter(usable.ravel().tolist()).most_common(1)[0][0] if usable.size else None
    dropped: dict[int, str] = {}
    for i, rec in enumerate(records):
        problem = _record_problem(rec, known, lengths[i].tolist(), expected_len)
        if problem:
            dropped[i] = problem
    if dropped:
        detail = "; ".join(f"{i} ({why})" for i, why in dropped.items())
        warnings.warn(f"dropped corrupted records {sorted(dropped)}: {detail}", stacklevel=3)
    return expected_len, dropped
