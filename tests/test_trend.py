"""`smoothing`: condition-aware scores averaged over a tool's cuts, trained, logged and served.

After test_model.py on purpose (a training in this process sets the thread configuration that
test_model's fresh-process comparison assumes untouched)."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest

from millvae.detect.trend import add_smoothed, cut_ewma, smooth_windows
from millvae.errors import MillvaeError
from millvae.metric_groups import flat


def test_cut_ewma_weighs_earlier_cuts_and_starts_where_told():
    got = cut_ewma(np.array([1.0, 3.0, np.nan, 5.0]), 0.5)
    np.testing.assert_allclose(got, [1.0, 2.0, 2.0, 3.5])
    np.testing.assert_allclose(cut_ewma(np.array([4.0]), 0.75, start=0.0), [1.0])
    assert np.isnan(cut_ewma(np.array([np.nan]), 0.5)).all()


def test_windows_are_smoothed_within_their_tool_in_run_order_causally():
    # two tools; tool 2's cuts come out of order in the table and are put in run order
    tools = np.array([1, 1, 1, 1, 2, 2, 2, 2])
    runs = np.array([1, 1, 2, 2, 2, 2, 1, 1])
    cuts = np.array([10, 10, 11, 11, 21, 21, 20, 20])
    s = np.array([0.0, 2.0, 4.0, 4.0, 8.0, 8.0, 100.0, 100.0])
    got = smooth_windows(s, tools, runs, cuts, 0.5)
    # tool 1: cut means 1, 4 -> 1, 2.5; tool 2 (run 1 first): 100, 8 -> 100, 54
    np.testing.assert_allclose(got, [1, 1, 2.5, 2.5, 54, 54, 100, 100])
    # a later cut never changes an earlier cut's smoothed score
    s2 = s.copy()
    s2[2:4] = 1000.0
    np.testing.assert_allclose(smooth_windows(s2, tools, runs, cuts, 0.5)[:2], got[:2])


def test_add_smoothed_adds_the_condition_aware_scores_only_and_nothing_at_zero():
    windows = pd.DataFrame({"case": [1, 1], "run": [1, 2], "cut_no": [5, 6]})
    scores = pd.DataFrame({"kl": [1.0, 2.0], "kl_cond": [1.0, 3.0]})
    same, names = add_smoothed(scores, windows, ["kl", "kl_cond"], 0.0)
    assert names == ("kl", "kl_cond") and same is scores
    out, names = add_smoothed(scores, windows, ["kl", "kl_cond"], 0.5)
    assert names == ("kl", "kl_cond", "kl_cond_smooth")
    np.testing.assert_allclose(out["kl_cond_smooth"], [1.0, 2.0])


@pytest.mark.parametrize("value", ["1", "-0.1", "nan", "often"])
def test_smoothing_outside_zero_to_one_is_refused(value):
    from millvae.config import make_config

    with pytest.raises(MillvaeError, match=r"^smoothing: expected"):
        make_config(data="synthetic", smoothing=value)


def test_baseline_folds_pool_the_smoothed_baselines(tracking, synthetic_mat):
    from millvae.baseline import run_baseline_folds
    from millvae.config import make_config

    cfg = make_config(data=str(synthetic_mat), split="casefold", smoothing=0.5, bootstrap=0)
    rid = run_baseline_folds(cfg, list(range(cfg.folds)), 0.95, 20)
    m = flat(mlflow.get_run(rid).data.metrics)
    for s in ("pca_cond_smooth", "iforest_cond_smooth"):
        assert 0 <= m[f"pooled_test_ap_{s}"] <= 1 and 0 <= m[f"cv_val_ap_{s}"] <= 1
    assert "pooled_test_ap_time_in_use_smooth" not in m  # not condition-aware: not smoothed


def _request(p, pick):
    raw = p.scaler.inverse_transform(p.x[pick])
    w = p.windows.iloc[pick].reset_index(drop=True)
    frame = pd.DataFrame(raw.reshape(-1, raw.shape[2]), columns=list(p.signal_names))
    for c in ("DOC", "feed", "material"):
        frame[c] = np.repeat(w[c].to_numpy(dtype=float), raw.shape[1])
    frame["cut"] = np.repeat(w["cut_no"].to_numpy(dtype=int), raw.shape[1])
    return frame


@pytest.mark.slow
def test_a_smoothed_combined_detector_is_chosen_logged_and_served(tracking, tiny_config):
    from millvae.train import train_run

    cfg = tiny_config(split="casefold", split_seed=1, detector="combined", smoothing=0.7)
    result = train_run(cfg, verbose=0)
    ev, p = result.evaluation, result.prepared
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["decision_score"] == "combined_cond_smooth"
    m = flat(run.data.metrics)
    for s in ("combined_cond_smooth", "pca_cond_smooth", "mse_cond_smooth"):
        assert 0 <= m[f"val_ap_{s}"] <= 1 and f"threshold_{s}" in m
    assert "combined_smooth" not in ev.scores  # raw scores are not smoothed

    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], output_format="list"
    )
    (detector,) = [lm for lm in models if lm.name == "detector"]
    loaded = mlflow.pyfunc.load_model(detector.model_uri)
    # one test tool's cuts in time order, as a shop would send them
    tool = p.windows.loc[p.mask("test"), "case"].iloc[0]
    mine = p.windows.reset_index(drop=True)
    mine = mine[(mine["case"] == tool)].sort_values(["run"], kind="stable")
    first_cuts = mine["cut_no"].drop_duplicates().to_numpy()[:4]  # whole cuts: their means
    pick = mine.index.to_numpy()[mine["cut_no"].isin(first_cuts).to_numpy()]
    frame = _request(p, pick)
    out = loaded.predict(frame)
    want = ev.scores["combined_cond_smooth"].to_numpy()[pick]
    # the request starts the tool's history at its first cut, as training did
    np.testing.assert_allclose(out["combined_cond_smooth"], want, rtol=1e-4, atol=1e-4)
    assert (out["score_name"] == "combined_cond_smooth").all()
    thr = ev.thresholds["combined_cond_smooth"]
    assert (out["is_anomaly"] == (out["combined_cond_smooth"] >= thr)).all()

    # a later request continues from the smoothed score of the tool's last cut
    cuts = frame["cut"].unique()
    head = frame[frame["cut"].isin(cuts[:2])]
    tail = frame[~frame["cut"].isin(cuts[:2])].copy()
    if len(tail):
        start = loaded.predict(head)["combined_cond_smooth"].iloc[-1]
        tail["smooth_start"] = start
        np.testing.assert_allclose(
            loaded.predict(tail)["combined_cond_smooth"],
            out["combined_cond_smooth"].to_numpy()[len(head) // cfg.window_size :],
            rtol=1e-4,
            atol=1e-4,
        )

    # without cuts: per window, said so; without conditions: the raw score, said so
    plain = loaded.predict(frame.drop(columns="cut"))
    assert (plain["score_name"] == "combined_cond").all()
    assert plain["warning"].str.contains("no cut column").all()
    raw = loaded.predict(frame.drop(columns=["cut", "DOC", "feed", "material"]))
    assert (raw["score_name"] == "combined").all()

    # bad history columns: one line each
    per_window_start = (np.arange(len(frame)) // cfg.window_size) * 1.0
    varying = frame.copy()
    varying.loc[1, "cut"] = 10**6
    for bad, why in (
        (varying, "expected cut constant within each window"),
        (frame.drop(columns="cut").assign(smooth_start=1.0), "expected a cut column"),
        (frame.assign(smooth_start=per_window_start), "one smooth_start"),
    ):
        with pytest.raises(mlflow.exceptions.MlflowException, match=why):
            loaded.predict(bad)

    # registered by its validation figure, the smoothed figures on the version
    from millvae.register import register_best

    reg = register_best(metric="val_ap_combined_cond_smooth", allow_synthetic=True)
    assert reg.run_id == result.run_id and reg.test_ap_metric == "test_ap_combined_cond_smooth"
    assert "test_ap_combined_cond_smooth" in reg.version_tags
    served = mlflow.pyfunc.load_model("models:/millvae@champion").predict(frame)
    np.testing.assert_array_equal(served["combined_cond_smooth"], out["combined_cond_smooth"])
