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
    if not path.is_file():
        raise MillvaeError(f"data: expected a mill.mat file; got {str(path)!r} (no such file)")
    try:
        mat = scipy.io.loadmat(str(path), squeeze_me=False)
    except NotImplementedError as exc:
        raise MillvaeError(
            f"data: expected a MATLAB v5 mill.mat; {path} is a v7.3/HDF5 file ({exc})"
        ) from None
    except Exception as exc:  # scipy raises ValueError/TypeError/OSError for non-MAT content
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MillvaeError(
            f"data: expected a MATLAB .mat file; {path} is not one ({reason})"
        ) from None
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
    present = [n for n in names if n not in META_FIELDS]
    wanted = parse_signals(signals, present)
    records = mill.ravel()
    if records.size == 0:
        raise MillvaeError(f"data: expected at least one cut in 'mill'; {path.name} has none")

    known = [s for s in present if s in SIGNAL_NAMES]
    lengths = np.array([[np.asarray(r[s]).size for s in known] for r in records])
    expected_len = Counter(lengths.ravel().tolist()).most_common(1)[0][0]
    dropped: dict[int, str] = {}
    for i, rec in enumerate(records):
        if (lengths[i] != expected_len).any():
            dropped[i] = f"{int(lengths[i].max())} samples, expected {expected_len}"
            continue
        values = np.stack([np.asarray(rec[s], dtype=np.float64).ravel() for s in known])
        if not np.isfinite(values).all():
            dropped[i] = "non-finite values"
        elif np.abs(values).max() > ABSURD_ABS_VALUE:
            dropped[i] = f"absurd values (|x| up to {np.abs(values).max():.3g})"
        elif not all(np.isfinite(_scalar(rec[f])) for f in META_FIELDS if f != "VB"):
            dropped[i] = "missing metadata"
    if dropped:
        detail = "; ".join(f"{i} ({why})" for i, why in dropped.items())
        warnings.warn(f"dropped corrupted records {sorted(dropped)}: {detail}", stacklevel=2)
    keep = [i for i in range(records.size) if i not in dropped]
    if not keep:
        raise MillvaeError(f"data: every record of {path.name} is corrupted")

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
