"""Which split seeds a repeated run covers; the pooled out-of-fold figures it logs on its parent.

Shared by `repeat` (one β-VAE per fold) and `baseline` (PCA, Isolation Forest and time in use per
fold), so that every detector of the README's table is pooled the same way.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from millvae import tracking
from millvae.detect.pooled import FoldScores, pooled_metrics, pooled_table
from millvae.errors import MillvaeError


def parse_seeds(text: str, cfg, default: list[int] | None) -> list[int]:
    """`split_seeds`: comma-separated integers, or empty / 'all' = every fold under
    split=casefold (else `default`)."""
    text = str(text).replace(" ", "")
    if text.lower() in ("", "all"):
        if cfg.split == "casefold":
            return list(range(cfg.folds))
        if text.lower() == "all" or default is None:
            raise MillvaeError(
                f"split_seeds: 'all' means every fold of split=casefold; got split={cfg.split}: "
                "give the seeds, e.g. 0,1,2"
            )
        return list(default)
    try:
        seeds = [int(t) for t in text.split(",") if t]
    except ValueError:
        raise MillvaeError(
            f"split_seeds: expected comma-separated integers; got {text!r}"
        ) from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise MillvaeError(f"split_seeds: expected distinct integers >= 0; got {text!r}")
    if cfg.split == "casefold" and max(seeds) >= cfg.folds:
        raise MillvaeError(
            f"split_seeds: expected folds 0..{cfg.folds - 1} under split=casefold with "
            f"folds={cfg.folds}; got {text!r}"
        )
    return seeds


def each_fold(cfg, seeds: list[int]) -> Iterator[tuple]:
    """(seed, the config at that split seed, its prepared data) for each seed; the data file is
    resolved and read once, the split made per seed."""
    from millvae.data.mat import load_mill
    from millvae.data.prepare import prepare
    from millvae.data.sources import resolve_data

    data_file = resolve_data(cfg.data)
    mill = load_mill(data_file.path, cfg.signals)
    for seed in seeds:
        child = dataclasses.replace(cfg, split_seed=seed)
        yield seed, child, prepare(child, mill=mill, data_file=data_file)


def tag_data(prepared) -> None:
    """The active (parent) run's data source, as its folds have it: `register` leaves a parent
    trained on synthetic data out unless asked, exactly as it does a single run."""
    tags = {"data_source": prepared.data_source}
    if prepared.data_source == "synthetic":
        tags["millvae.synthetic_data"] = "true: trained on the SYNTHETIC milling simulator"
    tracking.set_tags(tags)


def covers_every_fold(cfg, seeds: list[int]) -> bool:
    return cfg.split == "casefold" and sorted(seeds) == list(range(cfg.folds))


def record_pooled(folds: list[FoldScores], score_names, cfg, label: str) -> dict[str, float]:
    """Log the pooled figures and the out-of-fold scores (`pooled/oof_scores.csv`) on the active
    (parent) run; print the headline per score."""
    stats = pooled_metrics(
        folds, score_names, positive=cfg.positive, n_boot=cfg.bootstrap, seed=cfg.seed
    )
    tracking.log_metrics(stats)
    with tempfile.TemporaryDirectory() as tmp:
        pooled_table(folds, score_names).to_csv(Path(tmp) / "oof_scores.csv", index=False)
        summary_table(stats, score_names).to_csv(Path(tmp) / "pooled.csv", index=False)
        tracking.log_files(Path(tmp), {"oof_scores.csv": "pooled", "pooled.csv": "pooled"})
    print(f"millvae {label}: pooled out-of-fold test figures over {len(folds)} folds")
    for name in score_names:
        k = f"pooled_test_ap_{name}"
        if k in stats:
            print(
                f"  {name}: AP {stats[k]:.3f} [{stats.get(k + '_lo', float('nan')):.3f}, "
                f"{stats.get(k + '_hi', float('nan')):.3f}], cut AP "
                f"{stats.get(f'pooled_test_cut_ap_{name}', float('nan')):.3f}, ROC-AUC "
                f"{stats.get(f'pooled_test_rocauc_{name}', float('nan')):.3f}, "
                f"validation AP {stats.get(f'cv_val_ap_{name}', float('nan')):.3f}"
            )
    return stats


def summary_table(stats: dict[str, float], score_names) -> pd.DataFrame:
    """One row per score: validation AP (mean over folds) and the pooled test figures."""
    cols = (
        "cv_val_ap",
        "pooled_test_ap",
        "pooled_test_cut_ap",
        "pooled_test_rocauc",
        "pooled_test_cut_rocauc",
        "pooled_test_f1",
    )
    rows = []
    for name in score_names:
        row = {"score": name}
        for c in cols:
            row[c] = stats.get(f"{c}_{name}")
        for c in ("pooled_test_ap", "pooled_test_cut_ap", "pooled_test_rocauc"):
            row[f"{c}_lo"] = stats.get(f"{c}_{name}_lo")
            row[f"{c}_hi"] = stats.get(f"{c}_{name}_hi")
        rows.append(row)
    return pd.DataFrame(rows)
