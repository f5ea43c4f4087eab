"""Anomaly scores of windows: reconstruction error (input space), KL from the prior (latent space),
and condition-aware versions relative to the healthy windows of the same cutting condition."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from millvae.config import COMBINE_DEFAULT
from millvae.data.conditions import CONDITION_COLUMNS

# MAD of a normal distribution is 0.6745 sigma; the factor turns a MAD into a sigma estimate
_MAD_TO_SIGMA = 1.4826
_EPS = 1e-12
# Windows per forward pass when scoring. Each window's scores do not depend on it; half the
# training batch keeps a layer's activations (1024 x 64 x 32 float32 = 8 MiB) nearer the
# caches: all 11,570 windows of the milling data scored 7-14 % faster than in batches of
# 1024 (one AMD EPYC core; seed default 2.08 -> 1.94 s, paper's best 2.70 -> 2.34 s).
SCORE_BATCH = 512


def window_scores(
    model,
    x: np.ndarray,
    signal_names: tuple[str, ...] | list[str],
    *,
    samples: int = 0,
    seed: int = 0,
    batch_size: int = SCORE_BATCH,
) -> pd.DataFrame:
    """Per-window scores of scaled windows x [n, window, signal] (`window_outputs`' first half)."""
    scores, _ = window_outputs(
        model, x, signal_names, samples=samples, seed=seed, batch_size=batch_size
    )
    return scores


def window_outputs(
    model,
    x: np.ndarray,
    signal_names: tuple[str, ...] | list[str],
    *,
    samples: int = 0,
    seed: int = 0,
    batch_size: int = SCORE_BATCH,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Per-window scores of scaled windows x [n, window, signal] and their coding means.

    `mse` is the reconstruction error over time and signals, decoding the mean coding
    (deterministic) or, with `samples` = K > 0, averaging K sampled reconstructions (seeded).
    `kl` is the KL divergence of the window's coding from the N(0, I) prior; `mse_<signal>` is the
    error per signal. A conditional model's x carries its condition channels after the signals
    (`ConditionScale.append`); the errors are the signals' only.
    """
    x = np.asarray(x, dtype=np.float32)
    n_signals = len(signal_names)
    if len(x) == 0:
        cols = ["mse", "kl", *[f"mse_{s}" for s in signal_names]]
        coding = np.empty((0, int(model.codings_size)), np.float32)
        return pd.DataFrame({c: np.empty(0) for c in cols}), coding
    sampled = bool(samples and samples > 0)
    if sampled:
        mean, log_var = model.encode(x, batch_size=batch_size)
    else:
        mean, log_var, recon = model.forward(x, batch_size=batch_size)
    coding = mean
    mean, log_var = mean.astype(np.float64), log_var.astype(np.float64)
    kl = -0.5 * np.sum(1.0 + log_var - np.exp(log_var) - mean**2, axis=1)
    signals = x[:, :, :n_signals].astype(np.float64)
    if sampled:
        rng = np.random.default_rng(seed)
        recon = np.zeros(signals.shape, dtype=np.float64)
        std = np.exp(0.5 * log_var)
        condition = x[:, 0, n_signals:]  # empty unless the model is conditional
        for _ in range(samples):
            z = (mean + std * rng.standard_normal(mean.shape)).astype(np.float32)
            recon += model.decode(np.concatenate([z, condition], axis=1), batch_size=batch_size)
        recon /= samples
    err = (signals - recon) ** 2
    out = {"mse": err.mean(axis=(1, 2)), "kl": kl}
    per_signal = err.mean(axis=1)
    for j, s in enumerate(signal_names):
        out[f"mse_{s}"] = per_signal[:, j]
    return pd.DataFrame(out), coding


def condition_keys(conditions: pd.DataFrame) -> np.ndarray:
    """'DOC|feed|material' strings, e.g. '0.75|0.25|1' (JSON-friendly dictionary keys)."""
    cols = [conditions[c].to_numpy(dtype=float) for c in CONDITION_COLUMNS]
    return np.array([f"{d:g}|{f:g}|{int(m)}" for d, f, m in zip(*cols, strict=True)], dtype=object)


@dataclass
class ConditionNormalizer:
    """Robust z-score of log(score) within each cutting condition, fitted on healthy windows only.

    One global threshold mixes conditions whose normal score levels differ (a heavy cut with a new
    tool can reconstruct worse than a light cut with a worn one); scoring each window against the
    healthy windows of its own condition removes that. Conditions never seen healthy fall back to
    the statistics of all healthy windows.
    """

    stats: dict[str, dict[str, tuple[float, float]]]  # score -> condition key ('*' = all) -> (c, s)

    @classmethod
    def fit(
        cls, scores: pd.DataFrame, conditions: pd.DataFrame, names: list[str] | tuple[str, ...]
    ):
        keys = condition_keys(conditions)
        stats: dict[str, dict[str, tuple[float, float]]] = {}
        for name in names:
            v = np.log(np.maximum(scores[name].to_numpy(dtype=float), _EPS))
            per = {"*": _center_scale(v)}
            for k in np.unique(keys):
                per[str(k)] = _center_scale(v[keys == k])
            stats[name] = per
        return cls(stats)

    def transform(self, scores: pd.DataFrame, conditions: pd.DataFrame | None) -> pd.DataFrame:
        """`<name>_cond` columns; NaN where no condition is known."""
        out = {}
        n = len(scores)
        keys = condition_keys(conditions) if conditions is not None else None
        for name, per in self.stats.items():
            v = np.log(np.maximum(scores[name].to_numpy(dtype=float), _EPS))
            if keys is None:
                out[f"{name}_cond"] = np.full(n, np.nan)
                continue
            center = np.array([per.get(k, per["*"])[0] for k in keys], dtype=float)
            scale = np.array([per.get(k, per["*"])[1] for k in keys], dtype=float)
            out[f"{name}_cond"] = (v - center) / scale
        return pd.DataFrame(out, index=scores.index)

    def transform_global(self, scores: pd.DataFrame, names) -> pd.DataFrame:
        """`<name>_z` columns: each score against all healthy windows (no condition needed)."""
        out = {}
        for name in names:
            c, sc = self.stats[name]["*"]
            v = np.log(np.maximum(scores[name].to_numpy(dtype=float), _EPS))
            out[f"{name}_z"] = (v - c) / sc
        return pd.DataFrame(out, index=scores.index)

    def to_dict(self) -> dict:
        return {n: {k: list(cs) for k, cs in per.items()} for n, per in self.stats.items()}

    @classmethod
    def from_dict(cls, d: dict) -> ConditionNormalizer:
        return cls(
            {n: {k: (float(c), float(s)) for k, (c, s) in per.items()} for n, per in d.items()}
        )


def _center_scale(v: np.ndarray) -> tuple[float, float]:
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return 0.0, 1.0
    center = float(np.median(v))
    scale = float(np.median(np.abs(v - center)) * _MAD_TO_SIGMA)
    if not np.isfinite(scale) or scale < 1e-6:
        scale = float(np.std(v)) if np.std(v) > 1e-6 else 1.0
    return center, scale


def fit_latent(codings: np.ndarray) -> dict:
    """Mean and precision (inverse covariance, slightly regularised) of healthy coding means."""
    z = np.asarray(codings, dtype=np.float64)
    cov = np.atleast_2d(np.cov(z.T)) + 1e-6 * np.eye(z.shape[1])
    return {"mean": z.mean(axis=0).tolist(), "precision": np.linalg.inv(cov).tolist()}


def latent_distance(latent: dict, codings: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance of each coding mean from the healthy codings (`lat`)."""
    d = np.asarray(codings, dtype=np.float64) - np.asarray(latent["mean"])
    return np.einsum("ij,jk,ik->i", d, np.asarray(latent["precision"]), d)


def latent_scores(codings: np.ndarray, fit: np.ndarray) -> tuple[np.ndarray, dict]:
    """`lat` of every window from its coding mean, against the coding means of the windows `fit`
    (a mask: the healthy training windows), and the fitted reference the detector keeps."""
    latent = fit_latent(codings[fit])
    return latent_distance(latent, codings), latent


# The scores a combined detector may average (`combine`, `millvae.config.COMBINABLE`), each a
# robust z-score of the window's score within its condition: the β-VAE's reconstruction error and
# KL, its coding's distance from the healthy codings, and PCA's reconstruction error (what a
# linear model of healthy windows cannot explain).
# `COMBINED_PARTS`, the default parts, were chosen on the validation folds of the real data
# (docs/detection.md); `millvae.config` holds both lists, as `combine` is a run's parameter.
COMBINED_PARTS = COMBINE_DEFAULT


def combined_scores(
    normalizer: ConditionNormalizer,
    scores: pd.DataFrame,
    conditions,
    parts: tuple[str, ...] | list[str] = COMBINED_PARTS,
):
    """`combined_cond`: the mean of the parts' per-condition z-scores (NaN without conditions),
    and `combined`: the same against all healthy windows (the fallback when a request carries no
    condition)."""
    names = list(parts)
    weights = np.full(len(names), 1.0 / len(names))
    glob = normalizer.transform_global(scores, names).to_numpy(dtype=float)
    out = pd.DataFrame({"combined": glob @ weights}, index=scores.index)
    if conditions is None:
        out["combined_cond"] = np.nan
    else:
        cond = normalizer.transform(scores, conditions)
        out["combined_cond"] = cond[[f"{n}_cond" for n in names]].to_numpy(dtype=float) @ weights
    return out
