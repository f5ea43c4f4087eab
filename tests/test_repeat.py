"""`repeat`: one configuration over several split seeds, children under one parent."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest

from millvae.config import make_config
from millvae.crossval import parse_seeds
from millvae.errors import MillvaeError
from millvae.repeat import run_repeat, summarize


def test_summary_is_mean_std_min_max():
    table = pd.DataFrame({"test_ap_kl": [0.2, 0.4, 0.9], "x": [np.nan, 1.0, np.nan]})
    s = summarize(table)
    assert s["mean_test_ap_kl"] == pytest.approx(0.5)
    assert s["std_test_ap_kl"] == pytest.approx(np.std([0.2, 0.4, 0.9], ddof=1))
    assert (s["min_test_ap_kl"], s["max_test_ap_kl"]) == (0.2, 0.9)
    assert s["std_x"] == 0.0 and s["mean_x"] == 1.0


def test_bad_seed_lists():
    case = make_config(split="case")
    assert parse_seeds("0, 1,2", case, default=None) == [0, 1, 2]
    assert parse_seeds("", case, default=[0, 1, 2]) == [0, 1, 2]
    for bad in ("1,1", "a,b", "-1", "all"):
        with pytest.raises(MillvaeError, match="split_seeds"):
            parse_seeds(bad, case, default=[0, 1, 2])
    with pytest.raises(MillvaeError, match="split_seeds"):
        parse_seeds("", case, default=None)  # baseline: no seeds means no repetition


def test_casefold_seeds_are_the_folds():
    cfg = make_config(split="casefold", folds=3)
    assert parse_seeds("", cfg, default=[0, 1, 2, 3]) == [0, 1, 2]
    assert parse_seeds("all", cfg, default=None) == [0, 1, 2]
    with pytest.raises(MillvaeError, match=r"split_seeds: expected folds 0\.\.2"):
        parse_seeds("0,3", cfg, default=None)


@pytest.mark.slow
def test_repeat_trains_one_child_per_seed(tracking, tiny_config):
    cfg = tiny_config(split="case")
    parent_id, table = run_repeat(cfg, [0, 1], verbose=0)
    assert list(table["split_seed"]) == [0, 1]
    parent = mlflow.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.params["split_seeds"] == "0,1"
    children = mlflow.search_runs(
        experiment_names=["millvae"],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
        output_format="list",
    )
    assert sorted(c.data.params["split_seed"] for c in children) == ["0", "1"]
    assert all(c.info.status == "FINISHED" for c in children)
    values = [c.data.metrics["test_ap_kl"] for c in children]
    assert parent.data.metrics["mean_test_ap_kl"] == pytest.approx(np.mean(values))


def test_repeat_refuses_the_window_split(tracking, synthetic_mat):
    with pytest.raises(MillvaeError, match="split=window"):
        run_repeat(make_config(data=str(synthetic_mat), split="window"), [0, 1])


@pytest.mark.slow
def test_repeat_over_every_fold_logs_the_pooled_figures(tracking, tiny_config):
    from millvae.metric_groups import flat

    cfg = tiny_config(split="casefold", folds=2)
    parent_id, table = run_repeat(cfg, [0, 1], verbose=0)
    assert list(table["split_seed"]) == [0, 1]
    parent = mlflow.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    m = flat(parent.data.metrics)
    for s in ("mse", "kl", "mse_cond", "kl_cond"):
        for key in ("pooled_test_ap", "pooled_test_cut_ap", "pooled_test_rocauc", "cv_val_ap"):
            assert 0 <= m[f"{key}_{s}"] <= 1, key
    assert m["pooled_test_ap_kl_lo"] <= m["pooled_test_ap_kl_hi"]
    assert m["pooled_test_tools"] == 8  # every failing tool of the synthetic data, once
    children = mlflow.search_runs(
        experiment_names=["millvae"],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
        output_format="list",
    )
    assert sorted(c.data.params["split_seed"] for c in children) == ["0", "1"]
    assert {c.data.params["folds"] for c in children} == {"2"}
    # a cross-validated run competes in `register` by its validation AP over the folds; the
    # detector registered is that of its best-validating fold
    from millvae.register import register_best

    assert parent.data.tags["data_source"] == "synthetic"
    reg = register_best(metric="cv_val_ap_kl_cond", allow_synthetic=True, protocol="casefold")
    best = max(children, key=lambda c: (c.data.metrics["val_ap_kl_cond"], -c.info.start_time))
    assert (reg.run_id, reg.fold_run_id) == (parent_id, best.info.run_id)
    assert reg.version_tags["fold"] == best.data.params["split_seed"]
