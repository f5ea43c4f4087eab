"""Real Keras training logged to a real MLflow sqlite store, in process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
import scipy.io

from millvae.config import PARAM_NAMES, make_config
from millvae.errors import MillvaeError
from millvae.metric_groups import flat
from millvae.train import EPOCH_METRICS, train_run

TINY = {
    "codings_size": 4,
    "start_filter_no": 8,
    "dilations": "1,2",
    "epochs": 3,
    "earlystop_patience": 10,
    "batch_size": 256,
}

pytestmark = pytest.mark.slow


def _cfg(data, **kw):
    return make_config(data=str(data), **{**TINY, **kw})


def test_a_run_records_params_epochs_artifacts_and_a_loadable_model(
    tracking, synthetic_mat, tmp_path
):
    result = train_run(_cfg(synthetic_mat), verbose=0)
    client = mlflow.MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    # the model, split, data source and capped epochs: two runs in a list can be told apart
    assert run.info.run_name == (
        "bvae_beta-1.25_cod-4_lay-1_fil-8_ker-2_dil-1-2_sigmoid_window_synthetic_ep3"
    )
    assert client.get_experiment(run.info.experiment_id).name == "millvae"
    assert set(run.data.params) == set(PARAM_NAMES)
    assert run.data.params["dilations"] == "1,2" and run.data.params["beta"] == "1.25"
    for key in EPOCH_METRICS:
        for name in (key, f"val_{key}"):
            steps = [m.step for m in client.get_metric_history(result.run_id, name)]
            assert steps == [1, 2, 3], name
    logged = run.data.metrics
    m = flat(logged)
    assert len(m) == len(logged)  # every figure under one name
    # end-of-run figures grouped on the run page; curves and headline figures in the first section
    assert logged["data/n_train_slim"] > 0 and "detail/threshold_kl" in logged
    assert "by_condition/test_ap_kl_steel" in logged and "interval/test_ap_kl_lo" in logged
    sections = {k.split("/")[0] for k in logged if "/" in k}
    assert sections == {"data", "detail", "by_condition", "interval"}
    first = [k for k in logged if "/" not in k]
    assert {"val_ap_kl", "test_ap_kl_cond", "test_cut_ap_kl", "best_val_loss"} <= set(first)
    assert len(first) <= 40, sorted(first)
    assert set(result.evaluation.metrics) <= set(m)
    assert m["epochs_trained"] == 3 and m["param_count"] > 1000
    assert m["n_train_slim"] > 0 and m["n_test"] > 0 and m["training_seconds"] > 0
    val_hist = {x.step: x.value for x in client.get_metric_history(result.run_id, "val_loss")}
    assert m["best_val_loss"] == pytest.approx(val_hist[m["best_epoch"]])
    assert m["best_val_loss"] <= min(val_hist.values()) + 0.0002 * 3
    tags = run.data.tags
    assert tags["data_source"] == "synthetic" and len(tags["data_sha256"]) == 64
    assert tags["signals_used"] == "smcAC,smcDC,vib_table,vib_spindle,AE_table,AE_spindle"
    # the Dataset column of `mlflow ui`: the file, where it lies, its digest
    (used,) = run.inputs.dataset_inputs
    assert used.dataset.name == f"{synthetic_mat.name} (synthetic)"
    assert used.dataset.digest == tags["data_sha256"][:36]
    assert str(synthetic_mat) in used.dataset.source
    arts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"history.csv", "scaler.json", "plots", "data"} <= arts
    cuts = pd.read_csv(client.download_artifacts(result.run_id, "data/cuts.csv"))
    assert len(cuts) == m["n_cuts"] and set(cuts["split"]) <= {"train", "val", "test", "mixed"}
    plots = {a.path for a in client.list_artifacts(result.run_id, "plots")}
    assert plots == {
        "plots/loss_curves.png",
        "plots/pr_roc_curves.png",
        "plots/score_distributions_test.png",
        f"plots/case_trends_{tags['decision_score']}.png",
        "plots/reconstruction_examples.png",
    }
    # detection metrics of every score, thresholds from validation, the detector model
    for s in ("mse", "kl", "mse_cond", "kl_cond"):
        for k in ("val_ap", "test_ap", "test_rocauc", "test_prauc", "test_f1", "threshold"):
            assert f"{k}_{s}" in m, f"{k}_{s}"
    assert m["test_ap_kl_lo"] <= m["test_ap_kl"] <= m["test_ap_kl_hi"]
    assert tags["decision_score"] in ("mse", "kl", "mse_cond", "kl_cond")
    assert tags["protocol"].startswith("seed protocol")
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], output_format="list"
    )
    assert {lm.name for lm in models if lm.source_run_id == result.run_id} == {"model", "detector"}
    scaler = json.loads(open(client.download_artifacts(result.run_id, "scaler.json")).read())
    assert scaler["window_size"] == 64 and len(scaler["min"]) == 6

    # the logged model loads in a fresh process and reconstructs exactly like the trained one
    x = result.prepared.get("test")[:16]
    np.save(tmp_path / "x.npy", x)
    want = np.asarray(result.model(x, training=False))
    code = (
        "import sys, numpy as np, mlflow\n"
        f"m = mlflow.tensorflow.load_model('runs:/{result.run_id}/model')\n"
        f"x = np.load(r'{tmp_path / 'x.npy'}')\n"
        f"np.save(r'{tmp_path / 'y.npy'}', np.asarray(m(x, training=False)))\n"
        f"info = mlflow.models.get_model_info('runs:/{result.run_id}/model')\n"
        "print(info.signature.inputs.to_dict(), info.metadata['data_source'])\n"
        # the serving check MLflow's log_model would run (skipped at logging time, see train.py)
        f"pm = mlflow.pyfunc.load_model('runs:/{result.run_id}/model')\n"
        "print('example', np.asarray(pm.predict(pm.input_example)).shape)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, rtol=1e-5, atol=1e-6)
    assert "synthetic" in out.stdout and "(-1, 64, 6)" in out.stdout
    assert "example (2, 64, 6)" in out.stdout


def test_onecycle_schedule_is_followed_and_logged_per_epoch(tracking, synthetic_mat):
    from millvae.data.prepare import prepare
    from millvae.train import learning_rate

    cfg = _cfg(synthetic_mat, epochs=4, lr_schedule="onecycle", lr_max=0.005, lr_cycle_epochs=2)
    prepared = prepare(cfg)
    n_train = len(prepared.get("train", slim=True))
    sched = learning_rate(cfg, n_train)
    steps = -(-n_train // cfg.batch_size)
    assert sched.total_steps == 2 * steps and sched.warmup_steps == round(0.3 * 2 * steps)
    result = train_run(cfg, prepared=prepared, verbose=0)
    lr = [
        m.value
        for m in sorted(
            mlflow.MlflowClient().get_metric_history(result.run_id, "learning_rate"),
            key=lambda m: m.step,
        )
    ]
    # the rate after each epoch is the schedule's at that epoch's last step
    want = [float(sched(steps * e)) for e in range(1, 5)]
    np.testing.assert_allclose(lr, want, rtol=1e-5)
    assert lr[-1] == pytest.approx(cfg.learning_rate / 10, rel=1e-5)  # the cycle has ended
    # the constant default is a plain float: the seed's Adam, untouched
    assert learning_rate(_cfg(synthetic_mat), n_train) == 0.001


def test_same_seed_same_metrics_other_seed_other_metrics(tracking, synthetic_mat):
    from millvae.data.prepare import prepare

    cfg = _cfg(synthetic_mat, epochs=2)
    prepared = prepare(cfg)
    a = train_run(cfg, prepared=prepared, verbose=0).history
    b = train_run(cfg, prepared=prepared, verbose=0).history
    c = train_run(_cfg(synthetic_mat, epochs=2, seed=7), prepared=prepared, verbose=0).history
    np.testing.assert_array_equal(a["val_loss"], b["val_loss"])
    np.testing.assert_array_equal(a["loss"], b["loss"])
    assert not np.array_equal(a["loss"], c["loss"])


def test_a_failure_inside_the_run_marks_it_failed_and_keeps_what_was_logged(tracking, tmp_path):
    bad = tmp_path / "nomill.mat"
    scipy.io.savemat(bad, {"other": np.zeros(4)})
    with pytest.raises(MillvaeError, match="expected a variable 'mill'"):
        train_run(_cfg(bad), verbose=0)
    runs = mlflow.search_runs(experiment_names=["millvae"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FAILED"
    assert "expected a variable 'mill'" in run.data.tags["millvae.error"]
    assert run.data.params["codings_size"] == "4"  # logged before the failure, still there


def test_continuing_a_run_whose_params_mlflow_run_logged_differently(
    tracking, synthetic_mat, monkeypatch
):
    """`mlflow run -P beta=1.250` logs '1.250'; re-logging '1.25' would crash the run."""
    exp = mlflow.set_experiment("millvae")
    client = mlflow.MlflowClient()
    run = client.create_run(exp.experiment_id)
    client.log_param(run.info.run_id, "beta", "1.250")
    client.log_param(run.info.run_id, "dilations", "[1, 2]")
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    result = train_run(_cfg(synthetic_mat, epochs=1, beta="1.250", dilations="[1, 2]"), verbose=0)
    assert result.run_id == run.info.run_id
    done = client.get_run(run.info.run_id)
    assert done.info.status == "FINISHED"
    assert done.data.params["beta"] == "1.250" and done.data.params["codings_size"] == "4"


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc (Linux)")
def test_repeated_fits_do_not_grow_the_process(synthetic_mat):
    # Keras' own Adam left ~20 MiB per fit of this architecture in the process (~80 MiB for the
    # paper's on real data), also after clear_session and gc; a search worker fits hundreds.
    script = f"""
import gc, json, keras
from millvae.config import make_config
from millvae.data.prepare import prepare
from millvae.train import fit, preload
preload()  # a search worker's garbage-collector settings
cfg = make_config(data={str(synthetic_mat)!r}, codings_size=4, start_filter_no=8, conv_layers=2,
                  dilations="1,2,4,8", kernel_size=3, epochs=1, batch_size=512)
prepared = prepare(cfg)
rss = []
for _ in range(6):
    fit(cfg, prepared, verbose=0)
    keras.backend.clear_session()
    gc.collect()
    rss.append(int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20)
print(json.dumps(rss))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    # after the second fit everything that is allocated once is in place
    assert rss[-1] - rss[1] < 30, f"resident MiB after each fit: {[round(r) for r in rss]}"


def test_each_epoch_of_the_repeated_training_pipeline_is_one_fresh_permutation():
    # fit reads `steps_per_epoch` batches per epoch from one repeated dataset; epochs must not
    # straddle, lose or repeat windows, and each must be shuffled anew (the last batch is short)
    from millvae.pipeline import training_batches

    x = np.arange(10 * 2 * 1, dtype=np.float32).reshape(10, 2, 1)
    it = iter(training_batches(x, batch_size=4, seed=3))
    epochs = []
    for _ in range(3):
        batches = [next(it).numpy() for _ in range(3)]  # ceil(10 / 4)
        assert [len(b) for b in batches] == [4, 4, 2]
        epochs.append(np.concatenate(batches)[:, 0, 0] // 2)
    for order in epochs:
        assert sorted(order.tolist()) == list(range(10))
    assert len({tuple(o.tolist()) for o in epochs}) == 3
    again = iter(training_batches(x, batch_size=4, seed=3))
    assert np.array_equal(
        np.concatenate([next(again).numpy() for _ in range(3)])[:, 0, 0] // 2, epochs[0]
    )


@pytest.mark.slow
def test_a_three_epoch_fit_has_finite_validation_loss_and_scores(tracking, synthetic_mat):
    """Issue 22: with epochs=3, 3 of 4 search trials failed on an inf/NaN validation loss, the
    BatchNorm moving statistics still near their initial values and weights long gone."""
    cfg = make_config(
        data=str(synthetic_mat),
        split="case",
        epochs=3,
        conv_layers=3,
        start_filter_no=17,
        kernel_size=2,
        dilations="1,2,4,8",
        final_activation="selu",
        codings_size=26,
        beta=0.8,
        bootstrap=10,
    )
    result = train_run(cfg, verbose=0)
    assert np.isfinite(result.history["val_loss"]).all(), result.history["val_loss"].tolist()
    # validated on the moving statistics, the loss is of the training loss' size, not 1e8
    assert result.history["val_loss"].iloc[-1] < 3 * result.history["loss"].iloc[-1]
    scores = result.evaluation.scores.select_dtypes("number")
    assert np.isfinite(scores.to_numpy()).all()


@pytest.mark.slow
@pytest.mark.realdata
def test_a_file_without_failures_says_why_it_has_no_detection_metrics(tracking, fixture2):
    cfg = make_config(data=str(fixture2), signals="available", **{**TINY, "epochs": 1})
    with pytest.warns(UserWarning, match="detection metrics incomplete") as said:
        result = train_run(cfg, verbose=0)
    run = mlflow.get_run(result.run_id)
    why = run.data.tags["millvae.no_detection"]
    assert why.startswith("detection metrics incomplete (positive=failed): validation has no fail")
    assert str(said[0].message) == why
    assert not any(k.startswith("test_ap_") for k in flat(run.data.metrics))
    assert run.info.status == "FINISHED"
