"""Cheap non-deep detectors to read every β-VAE beside: PCA reconstruction error on flattened
windows, an Isolation Forest on simple per-window features."""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest


def window_features(x: np.ndarray) -> np.ndarray:
    """Per-signal mean, standard deviation, RMS and peak-to-peak of each window [n, window, s]."""
    x = np.asarray(x, dtype=np.float64)
    return np.concatenate(
        [x.mean(axis=1), x.std(axis=1), np.sqrt((x**2).mean(axis=1)), np.ptp(x, axis=1)], axis=1
    )


def pca_scores(x_fit: np.ndarray, x: np.ndarray, variance: float, seed: int):
    """Mean squared reconstruction error with the components explaining `variance` of x_fit."""
    flat_fit = x_fit.reshape(len(x_fit), -1)
    pca = PCA(n_components=variance, svd_solver="full", random_state=seed).fit(flat_fit)
    flat = x.reshape(len(x), -1)
    recon = pca.inverse_transform(pca.transform(flat))
    return ((flat - recon) ** 2).mean(axis=1), int(pca.n_components_)


def iforest_scores(x_fit: np.ndarray, x: np.ndarray, n_estimators: int, seed: int) -> np.ndarray:
    """Isolation Forest anomaly score (larger = more anomalous, in (0, 1])."""
    forest = IsolationForest(n_estimators=n_estimators, random_state=seed, n_jobs=1)
    forest.fit(window_features(x_fit))
    return -forest.score_samples(window_features(x))
