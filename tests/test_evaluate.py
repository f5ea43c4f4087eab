"""Detection evaluation: selection reads validation only; condition-aware scores; baseline."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest

from millvae.config import make_config
from millvae.detect.evaluate import add_condition_scores, evaluate


def _toy(seed: int = 0, n_cuts: int = 40, per_cut: int = 10):
    rng = np.random.default_rng(seed)
    cut = np.repeat(np.arange(n_cuts), per_cut)
    cls = np.repeat(rng.choice([0, 1, 2], size=n_cuts, p=[0.4, 0.4, 0.2]), per_cut)
    cls[:per_cut] = 2  # at least one failed cut in each split
    cls[per_cut * 20 : per_cut * 21] = 2
    split = np.where(cut < 20, "val", "test")
    doc = np.repeat(rng.choice([0.75, 1.5], size=n_cuts), per_cut)
    windows = pd.DataFrame(
        {
            "cut_no": cut,
            "case": cut // 5,
            "tool_class": cls,
            "split": split,
            "DOC": doc,
            "feed": 0.5,
            "material": 1,
        }
    )
    score = rng.gamma(2.0, 1.0, len(cut)) * (1 + doc) + 3.0 * cls
    return windows, pd.DataFrame({"a": score, "b": rng.random(len(cut))})


def test_thresholds_and_decision_never_read_test_labels():
    windows, scores = _toy()
    base = evaluate(scores, windows, ["a", "b"], n_boot=50)
    # scramble the test split completely: labels and scores
    w2, s2 = windows.copy(), scores.copy()
    test = (w2["split"] == "test").to_numpy()
    rng = np.random.default_rng(5)
    w2.loc[test, "tool_class"] = rng.permutation(w2.loc[test, "tool_class"].to_numpy())
    s2.loc[test, "a"] = rng.permutation(s2.loc[test, "a"].to_numpy())
    other = evaluate(s2, w2, ["a", "b"], n_boot=50)
    assert other.thresholds == base.thresholds
    assert other.decision_score == base.decision_score == "a"
    # ... while what is reported on test did change, so the test above can fail
    assert other.metrics["test_ap_a"] != base.metrics["test_ap_a"]
    assert {k: v for k, v in other.metrics.items() if k.startswith("val_")} == {
        k: v for k, v in base.metrics.items() if k.startswith("val_")
    }


def test_metric_names_and_intervals():
    windows, scores = _toy()
    ev = evaluate(scores, windows, ["a"], n_boot=200)
    m = ev.metrics
    for key in (
        "val_ap_a",
        "test_ap_a",
        "test_rocauc_a",
        "test_prauc_a",
        "threshold_a",
        "test_f1_a",
        "test_precision_a",
        "test_recall_a",
        "test_cut_ap_a",
        "test_cut_rocauc_a",
        "test_cutshare_ap_a",
        "test_ap_a_doc0.75",
        "test_ap_a_doc1.5",
    ):
        assert key in m, key
    assert m["test_ap_a_lo"] <= m["test_ap_a"] <= m["test_ap_a_hi"]
    assert 0 < m["test_positive_rate"] < 1


def test_condition_aware_scores_remove_condition_offsets():
    windows, _ = _toy(n_cuts=60)
    windows["split"] = np.where(windows["cut_no"] < 40, "train", "test")
    rng = np.random.default_rng(2)
    # healthy level depends on the condition; worn adds the same amount in both conditions
    level = np.where(windows["DOC"] == 1.5, 10.0, 1.0)
    raw = level * np.exp(0.1 * rng.standard_normal(len(windows))) * (1 + windows["tool_class"])
    scores = pd.DataFrame({"s": raw})
    out, norm = add_condition_scores(scores, windows, ["s"])
    healthy_test = (windows["split"] == "test") & (windows["tool_class"] == 0)
    by_doc = out.loc[healthy_test].groupby(windows.loc[healthy_test, "DOC"])["s_cond"].median()
    assert abs(by_doc.iloc[0] - by_doc.iloc[1]) < 0.5  # offsets gone on unseen healthy windows
    assert set(norm.to_dict()["s"]) >= {"*", "0.75|0.5|1", "1.5|0.5|1"}


def test_validation_windows_are_normalised_like_test_windows_never_by_themselves():
    windows, _ = _toy(n_cuts=60)
    windows["split"] = np.select(
        [windows["cut_no"] < 30, windows["cut_no"] < 45], ["train", "val"], "test"
    )
    rng = np.random.default_rng(3)
    scores = pd.DataFrame({"s": np.exp(rng.standard_normal(len(windows)))})
    _, norm = add_condition_scores(scores, windows, ["s"])
    # the validation windows' own scores, healthy or not, do not move the statistics
    moved = scores.copy()
    moved.loc[(windows["split"] != "train").to_numpy(), "s"] *= 50.0
    _, again = add_condition_scores(moved, windows, ["s"])
    assert again.to_dict() == norm.to_dict()
    moved.loc[(windows["split"] == "train").to_numpy(), "s"] *= 2.0
    _, other = add_condition_scores(moved, windows, ["s"])
    assert other.to_dict() != norm.to_dict()


@pytest.mark.slow
def test_baseline_entry_logs_the_same_metrics(tracking, synthetic_mat):
    from millvae.baseline import run_baseline

    cfg = make_config(data=str(synthetic_mat), split="case", bootstrap=100)
    run_id, _ = run_baseline(cfg, 0.95, 50)
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["model_type"] == "baseline"
    assert run.data.tags["data_source"] == "synthetic"
    for s in ("pca", "iforest", "pca_cond", "iforest_cond"):
        assert 0 <= run.data.metrics[f"test_ap_{s}"] <= 1
        assert f"detail/threshold_{s}" in run.data.metrics
    # PCA on healthy windows must find the simulator's worn tools far better than chance
    assert run.data.metrics["test_rocauc_pca"] > 0.7
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "plots")}
    assert "plots/pr_roc_curves.png" in arts
