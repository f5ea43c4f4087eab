"""`split=casefold`: tool folds, the pooled out-of-fold figures, the trivial baseline and the
combined (VAE + PCA) detector, on real MLflow runs."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from millvae.baseline import main as baseline_main
from millvae.config import make_config
from millvae.data.windows import FAILED, casefold_assignment, split_casefold
from millvae.detect.pooled import FoldScores, pooled_metrics
from millvae.errors import MillvaeError
from millvae.metric_groups import flat

# the real data's failing tools and their failed cuts (labels_with_tool_class.csv)
REAL_FAILED = {5: 1, 9: 1, 10: 1, 11: 1, 13: 5, 14: 2, 15: 1}


def _cuts(failed: dict[int, int], n_cases: int = 16, per_case: int = 8):
    case = np.repeat(np.arange(1, n_cases + 1), per_case)
    cls = np.zeros(len(case), dtype=int)
    for c, k in failed.items():
        rows = np.flatnonzero(case == c)
        cls[rows[-k:]] = FAILED
        cls[rows[-k - 2 : -k]] = 1
    return case, cls


@pytest.mark.parametrize("folds", [2, 3, 4, 7])
def test_every_failing_tool_is_tested_in_exactly_one_fold(folds):
    case, cls = _cuts(REAL_FAILED)
    tested = []
    for k in range(folds):
        split = split_casefold(case, cls, folds, k)
        test_tools = set(case[split == "test"])
        val_tools = set(case[split == "val"])
        assert test_tools and val_tools and not test_tools & val_tools
        # validation holds every other failing tool; tools that never fail train
        assert test_tools | val_tools == set(REAL_FAILED)
        assert set(case[split == "train"]) == set(range(1, 17)) - set(REAL_FAILED)
        tested += sorted(test_tools)
    assert sorted(tested) == sorted(REAL_FAILED)
    # the same folds on every call: fold k is fold k in every run of a repeat
    assert casefold_assignment(case, cls, folds) == casefold_assignment(case, cls, folds)


def test_folds_are_balanced_by_failed_cuts():
    case, cls = _cuts(REAL_FAILED)
    assign = casefold_assignment(case, cls, 4)
    load = [sum(REAL_FAILED[c] for c, k in assign.items() if k == f) for f in range(4)]
    # case 13 (5 failed cuts) alone; the other six tools' seven failed cuts spread 3/2/2
    assert sorted(load) == [2, 2, 3, 5]


def test_a_fold_count_that_leaves_a_fold_without_failing_tools_is_refused():
    case, cls = _cuts(REAL_FAILED)
    with pytest.raises(MillvaeError, match=r"at least folds=8 tools that reach failure.*found 7"):
        split_casefold(case, cls, 8, 0)
    every = {c: 1 for c in range(1, 17)}
    with pytest.raises(MillvaeError, match="never fail"):
        split_casefold(*_cuts(every), 4, 0)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"split": "casefold", "split_seed": 4}, r"split_seed: expected a fold 0\.\.3 .* got 4"),
        ({"split": "casefold", "folds": 1}, "folds: expected"),
        ({"folds": 10_000}, "folds: expected"),
        ({"folds": "two"}, "folds"),
        ({"detector": "forest"}, "detector: expected"),
    ],
)
def test_bad_fold_parameters_are_one_line_errors(params, message):
    with pytest.raises(MillvaeError, match=message) as err:
        make_config(**params)
    assert "\n" not in str(err.value)


def _fold(k: int, cases, y, s, thr: float, val_ap: float) -> FoldScores:
    n = len(s)
    windows = pd.DataFrame(
        {"case": cases, "cut_no": np.arange(n) // 2 + 100 * k, "tool_class": np.where(y, 2, 0)}
    )
    return FoldScores(k, windows, pd.DataFrame({"x": s}), {"x": thr}, {"val_ap_x": val_ap})


def test_pooled_figures_are_the_figures_of_all_out_of_fold_windows():
    rng = np.random.default_rng(0)
    folds, ys, ss = [], [], []
    for k in range(3):
        y = rng.random(40) < 0.2
        y[:2] = True
        s = rng.normal(size=40) + 1.5 * y + k  # each fold's scale differs: pooling sees it
        cases = np.repeat([10 * k + 1, 10 * k + 2], 20)
        folds.append(_fold(k, cases, y, s, thr=1.0 + k, val_ap=0.1 * (k + 1)))
        ys.append(y)
        ss.append(s)
    y, s = np.concatenate(ys), np.concatenate(ss)
    m = pooled_metrics(folds, ["x"], n_boot=200, seed=1)
    assert m["pooled_test_ap_x"] == pytest.approx(average_precision_score(y, s))
    assert m["pooled_test_rocauc_x"] == pytest.approx(roc_auc_score(y, s))
    assert m["pooled_test_ap_x_lo"] <= m["pooled_test_ap_x"] <= m["pooled_test_ap_x_hi"]
    assert m["cv_val_ap_x"] == pytest.approx(0.2)
    assert m["pooled_test_tools"] == 6 and m["pooled_folds"] == 3
    # each window flagged at its own fold's threshold
    flags = np.concatenate([ss[k] >= 1.0 + k for k in range(3)])
    tp = (flags & y).sum()
    assert m["pooled_test_f1_x"] == pytest.approx(2 * tp / (flags.sum() + y.sum()))
    # cut level: a cut is positive when any window is, scored by its mean
    cut = pd.DataFrame({"c": np.concatenate([f.windows["cut_no"] for f in folds]), "y": y, "s": s})
    g = cut.groupby("c")
    assert m["pooled_test_cut_ap_x"] == pytest.approx(
        average_precision_score(g["y"].any(), g["s"].mean())
    )


@pytest.mark.slow
def test_baseline_pools_every_fold_under_one_parent(tracking, synthetic_mat, capsys):
    rc = baseline_main(
        [
            "--data", str(synthetic_mat), "--split", "casefold", "--folds", "3",
            "--split_seeds", "all", "--bootstrap", "50", "--n_estimators", "20",
        ]
    )  # fmt: skip
    assert rc == 0
    runs = mlflow.search_runs(experiment_names=["millvae"], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 4
    parent = parents[0]
    assert all(r.info.status == "FINISHED" for r in runs)
    children = [r for r in runs if r is not parent]
    assert sorted(r.data.params["split_seed"] for r in children) == ["0", "1", "2"]
    assert {r.data.tags["protocol"] for r in children} == {
        "leak-free: tool folds, this fold's failing tools tested, the others validate"
    }
    m = flat(parent.data.metrics)  # intervals sit under interval/ on the run page
    for score in ("pca", "pca_cond", "iforest_cond", "time_in_use"):
        for key in ("pooled_test_ap", "pooled_test_cut_ap", "pooled_test_rocauc"):
            assert 0 <= m[f"{key}_{score}"] <= 1
        assert m[f"pooled_test_ap_{score}_lo"] <= m[f"pooled_test_ap_{score}_hi"]
    # the synthetic data has 8 failing tools, all tested once across the folds
    assert m["pooled_test_tools"] == 8
    oof = mlflow.artifacts.download_artifacts(
        run_id=parent.info.run_id, artifact_path="pooled/oof_scores.csv"
    )
    table = pd.read_csv(oof)
    assert sorted(table["fold"].unique()) == [0, 1, 2]
    assert table.groupby("case")["fold"].nunique().max() == 1
    assert "pooled out-of-fold test figures over 3 folds" in capsys.readouterr().out
