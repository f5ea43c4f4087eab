"""Cheap non-deep detectors to read every β-VAE beside: PCA reconstruction error on flattened
windows, an Isolation Forest on simple per-window features, and time in use (no model)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest


def window_features(x: np.ndarray) -> np.ndarray:
    """Per-signal mean, standard deviation, RMS and peak-to-peak of each window [n, window, s]."""
    x = np.asarray(x, dtype=np.float64)
    return np.concatenate(
        [x.mean(axis=1), x.std(axis=1), np.sqrt((x**2).mean(axis=1)), np.ptp(x, axis=1)], axis=1
    )


def fit_pca(x_fit: np.ndarray, variance: float, seed: int) -> dict:
    """Mean and components explaining `variance` of the flattened windows x_fit (JSON-able)."""
    flat_fit = x_fit.reshape(len(x_fit), -1)
    pca = PCA(n_components=variance, svd_solver="full", random_state=seed).fit(flat_fit)
    return {"mean": pca.mean_.tolist(), "components": pca.components_.tolist()}


def pca_error(pca: dict, x: np.ndarray) -> np.ndarray:
    """Mean squared error of each window's projection onto the components (NumPy only, so the
    served detector computes exactly what the run evaluated)."""
    mean = np.asarray(pca["mean"], dtype=np.float64)
    comp = np.asarray(pca["components"], dtype=np.float64)
    flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1) - mean
    recon = (flat @ comp.T) @ comp
    return ((flat - recon) ** 2).mean(axis=1)


def pca_scores(x_fit: np.ndarray, x: np.ndarray, variance: float, seed: int):
    """Mean squared reconstruction error with the components explaining `variance` of x_fit."""
    pca = fit_pca(x_fit, variance, seed)
    return pca_error(pca, x), len(pca["components"])


def iforest_scores(x_fit: np.ndarray, x: np.ndarray, n_estimators: int, seed: int) -> np.ndarray:
    """Isolation Forest anomaly score (larger = more anomalous, in (0, 1])."""
    forest = IsolationForest(n_estimators=n_estimators, random_state=seed, n_jobs=1)
    forest.fit(window_features(x_fit))
    return -forest.score_samples(window_features(x))


def time_in_use(windows: pd.DataFrame) -> np.ndarray:
    """The trivial score: a window's cut number within its tool (the `run` column), as a float."""
    return windows["run"].to_numpy(dtype=float)
