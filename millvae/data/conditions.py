"""The cutting condition of a window (depth of cut, feed, material) as input of a conditional β-VAE.

A conditional model (`conditional=true`) reads each window's condition as extra channels after the
signals, constant over the window, and its decoder gets it beside the coding: the coding is then
free to describe the cut rather than which of the eight conditions it was made under. Each value
is min-max scaled over the training windows, as the signals are; the detector keeps the scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from millvae.errors import MillvaeError

CONDITION_COLUMNS = ("DOC", "feed", "material")


@dataclass(frozen=True)
class ConditionScale:
    """Per condition column, the (low, high) of the training windows; a value maps to
    (v - low) / (high - low), or 0 where every training window had the same value."""

    bounds: dict[str, tuple[float, float]]

    @classmethod
    def fit(cls, conditions: pd.DataFrame) -> ConditionScale:
        if len(conditions) == 0:
            raise MillvaeError("conditional: expected training windows; found none")
        values = _values(conditions)
        return cls(
            {
                c: (float(values[:, j].min()), float(values[:, j].max()))
                for j, c in enumerate(CONDITION_COLUMNS)
            }
        )

    def transform(self, conditions: pd.DataFrame) -> np.ndarray:
        """Scaled conditions [n, 3], float32."""
        values = _values(conditions)
        out = np.zeros_like(values)
        for j, c in enumerate(CONDITION_COLUMNS):
            low, high = self.bounds[c]
            if high > low:
                out[:, j] = (values[:, j] - low) / (high - low)
        return out.astype(np.float32)

    def append(self, x: np.ndarray, conditions: pd.DataFrame) -> np.ndarray:
        """Windows x [n, window, signal] with each window's scaled condition as 3 more channels."""
        c = self.transform(conditions)
        if len(c) != len(x):
            raise MillvaeError(
                f"conditions: expected one row per window ({len(x)}); got {len(c)} rows"
            )
        channels = np.broadcast_to(c[:, None, :], (len(x), x.shape[1], c.shape[1]))
        return np.concatenate([np.asarray(x, dtype=np.float32), channels], axis=2)

    def to_dict(self) -> dict[str, list[float]]:
        return {c: list(b) for c, b in self.bounds.items()}

    @classmethod
    def from_dict(cls, d: dict) -> ConditionScale:
        return cls({c: (float(d[c][0]), float(d[c][1])) for c in CONDITION_COLUMNS})


def _values(conditions: pd.DataFrame) -> np.ndarray:
    return conditions[list(CONDITION_COLUMNS)].to_numpy(dtype=np.float64)
