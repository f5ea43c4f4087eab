"""`detector=combined`: trained, logged, served and registered like the β-VAE detector.

In a file after test_model.py on purpose: a training in this process sets the thread
configuration that test_model's fresh-process comparison assumes untouched (CI runs files in
alphabetical order)."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest

from millvae.metric_groups import flat


def _logged_detector(run):
    """The run's pyfunc detector, loaded."""
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], output_format="list"
    )
    (detector,) = [lm for lm in models if lm.name == "detector"]
    return mlflow.pyfunc.load_model(detector.model_uri)


def _request(p, pick):
    """Raw test windows `pick` of the prepared data as a request frame, with condition columns."""
    raw = p.scaler.inverse_transform(p.x[pick])
    cond = p.windows.iloc[pick][["DOC", "feed", "material"]].reset_index(drop=True)
    frame = pd.DataFrame(raw.reshape(-1, raw.shape[2]), columns=list(p.signal_names))
    for c in ("DOC", "feed", "material"):
        frame[c] = np.repeat(cond[c].to_numpy(dtype=float), raw.shape[1])
    return raw, frame


@pytest.mark.slow
def test_combined_detector_is_logged_and_serves_the_runs_scores(tracking, tiny_config):
    from millvae.train import train_run

    cfg = tiny_config(split="casefold", folds=4, split_seed=1, detector="combined")
    result = train_run(cfg, verbose=0)
    ev = result.evaluation
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["decision_score"] == "combined_cond"
    m = flat(run.data.metrics)
    for s in ("lat", "lat_cond", "pca", "pca_cond", "combined", "combined_cond", "kl_cond"):
        assert 0 <= m[f"test_ap_{s}"] <= 1 and f"threshold_{s}" in m
    # the combined score is the mean of the default parts' robust z-scores: the β-VAE's error
    # on the AC spindle current alone, its coding's distance and PCA's error
    assert cfg.combine_parts == ("mse_smcAC", "lat", "pca")
    np.testing.assert_allclose(
        ev.scores["combined_cond"],
        (ev.scores["mse_smcAC_cond"] + ev.scores["lat_cond"] + ev.scores["pca_cond"]) / 3,
    )
    loaded = _logged_detector(run)
    p = result.prepared
    pick = np.flatnonzero(p.mask("test"))[:30]
    _, frame = _request(p, pick)
    out = loaded.predict(frame)
    for col in ("lat", "lat_cond", "pca", "pca_cond", "combined_cond"):
        np.testing.assert_allclose(out[col], ev.scores[col].to_numpy()[pick], rtol=1e-4, atol=1e-4)
    assert (out["decision"] == "combined_cond").all()
    thr = ev.thresholds["combined_cond"]
    assert (out["is_anomaly"] == (out["combined_cond"] >= thr)).all()
    # no condition columns: the combined score against all healthy windows, said so per row
    plain = loaded.predict(frame[list(p.signal_names)])
    assert (plain["score_name"] == "combined").all()
    assert plain["warning"].str.contains("no condition columns").all()

    # registered like any detector, chosen by its validation figure, and served from the alias
    from millvae.register import register_best

    reg = register_best(metric="val_ap_combined_cond", allow_synthetic=True)
    assert reg.run_id == result.run_id
    served = mlflow.pyfunc.load_model("models:/millvae@champion").predict(frame)
    np.testing.assert_array_equal(served["combined_cond"], out["combined_cond"])


@pytest.mark.slow
def test_conditional_vae_reads_the_condition_and_its_detector_requires_it_and_combine_names_parts(
    tracking, tiny_config
):
    from millvae.data.conditions import ConditionScale
    from millvae.detector import score_raw
    from millvae.train import model_inputs, train_run

    cfg = tiny_config(
        split="casefold",
        folds=4,
        split_seed=2,
        conditional="true",
        detector="combined",
        combine="kl,pca",
    )
    result = train_run(cfg, verbose=0)
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name.startswith("cbvae_")
    model, p = result.model, result.prepared
    assert model.conditions == 3 and model.encoder.input_shape[-1] == len(p.signal_names) + 3
    assert model.decoder.input_shape[-1] == cfg.codings_size + 3
    # the decoder reads the condition: another condition changes the reconstruction
    x, scale = model_inputs(cfg, p)
    assert isinstance(scale, ConditionScale) and x.shape[2] == len(p.signal_names) + 3
    np.testing.assert_array_equal(x[..., : len(p.signal_names)], p.x)
    swapped = x.copy()
    swapped[..., -3:] = 1.0 - swapped[..., -3:]
    _, _, recon = model.forward(x[:50])
    _, _, other = model.forward(swapped[:50])
    assert recon.shape == p.x[:50].shape and np.abs(recon - other).max() > 1e-4

    # served: the run's scores, from raw signals and condition columns
    loaded = _logged_detector(run)
    pick = np.flatnonzero(p.mask("test"))[:20]
    raw, frame = _request(p, pick)
    out = loaded.predict(frame)
    ev = result.evaluation
    # `combine` names the parts: here KL and PCA, half each
    np.testing.assert_allclose(
        ev.scores["combined_cond"], (ev.scores["kl_cond"] + ev.scores["pca_cond"]) / 2
    )
    for col in ("mse", "kl", "lat", "combined_cond"):
        np.testing.assert_allclose(out[col], ev.scores[col].to_numpy()[pick], rtol=1e-4, atol=1e-4)
    # without the condition a conditional detector cannot score: one line, no guess
    config = loaded.unwrap_python_model().config
    keras_model = loaded.unwrap_python_model().keras_model
    with pytest.raises(Exception, match="conditional and reads them"):
        score_raw(keras_model, config, raw)
    with pytest.raises(Exception, match=r"(?i)missing inputs"):
        loaded.predict(frame[list(p.signal_names)])


def test_a_part_of_a_signal_the_data_lacks_fails_the_run_before_training(tracking, real5):
    # the copy of the real data here has no AE_spindle; signals=available learns it on reading
    from millvae.config import make_config
    from millvae.errors import MillvaeError
    from millvae.train import train_run

    cfg = make_config(
        data=str(real5), signals="available", detector="combined", combine="mse_AE_spindle,pca"
    )
    with pytest.raises(MillvaeError, match=r"combine: expected errors of the run's signals \("):
        train_run(cfg, verbose=0)
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FAILED" and "mse_AE_spindle" in run.data.tags["millvae.error"]
    assert "loss" not in run.data.metrics  # nothing trained


def test_combine_names_signal_errors_in_any_case_and_refuses_other_words():
    from millvae.config import make_config
    from millvae.errors import MillvaeError

    cfg = make_config(detector="combined", combine=" MSE_smcac, PCA ")
    assert cfg.combine_parts == ("mse_smcAC", "pca")
    for bad in ("mse_spindle", "mse_smcAC,mse_SMCAC", "smcAC"):
        with pytest.raises(MillvaeError, match="or mse_<signal>"):
            make_config(detector="combined", combine=bad)
