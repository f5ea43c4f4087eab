"""Where each end-of-run figure sits on a run page: MLflow groups metric charts by the prefix
before `/`, and a run logged some 160 single-value metrics in one section of bar charts.

Per-epoch curves and the headline detection figures (`val_ap_*`, `test_ap_*`, `test_cut_ap_*`,
`*_rocauc_*`, `best_val_loss`, ...) keep their names and the first section; the rest go under
`data/` (window and cut counts), `by_condition/` (test figures per material, depth of cut and
feed), `interval/` (bootstrap bounds), `detail/` (thresholds, precision, recall, F1, PR-AUC) and,
on a repeat's parent, `spread/` (std, min, max over split seeds; the means stay).
The part after the prefix is the figure's full name, so `flat` gives every figure back under its
one name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_CONDITION = re.compile(r"^test_(ap|prauc)_\w+_(castiron|steel|doc[\d.]+|feed[\d.]+)$")
_INTERVAL = re.compile(r"^\w+_(lo|hi)$")
_DETAIL = re.compile(
    r"^(threshold_|(val|test)_(precision|recall|f1|prauc|positive_rate|n_positive)"
    r"|test_(cutshare_ap|cut_rocauc)_|pooled_test_(f1|cut_rocauc|n_positive|n_windows|tools)|pooled_folds)"
)
_SPREAD = re.compile(r"^(std|min|max)_")


def group(name: str) -> str:
    """The logged name of figure `name` (unchanged for curves and headline figures)."""
    if "/" in name:
        return name
    if name.startswith("n_"):
        return f"data/{name}"
    if _CONDITION.match(name):
        return f"by_condition/{name}"
    if _INTERVAL.match(name):
        return f"interval/{name}"
    if _DETAIL.match(name):
        return f"detail/{name}"
    if _SPREAD.match(name):
        return f"spread/{name}"
    return name


def grouped(metrics: Mapping[str, float]) -> dict[str, float]:
    """`metrics` under their logged names."""
    return {group(k): v for k, v in metrics.items()}


def flat(metrics: Mapping[str, float]) -> dict[str, float]:
    """A run's logged metrics under the figures' own names (`data/n_train` -> `n_train`)."""
    return {k.rsplit("/", 1)[-1]: v for k, v in metrics.items()}
