"""A search over split=casefold: every trial trains every fold and is ranked on validation folds;
`register` takes the best trial's best-validating fold detector."""

from __future__ import annotations

import socket
import subprocess
import sys

import mlflow
import pytest

from millvae.errors import MillvaeError
from millvae.metric_groups import flat
from millvae.register import paired_test_ap_metric, register_best
from millvae.search import main
from millvae.search.store import Search, reap_dead_trials, search_records

SPACE = """
beta: {uniform: [0.5, 4.0]}
codings_size: [4]
start_filter_no: [8]
dilations: ["1,2"]
earlystop_patience: [2]
"""


def _args(tmp_path, data, *extra: str) -> list[str]:
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    return [
        "--space", str(space), "--data", str(data), "--epochs", "2", "--bootstrap", "20",
        "--workers", "0", "--seed", "3", *extra,
    ]  # fmt: skip


def _runs(where: str) -> list:
    return mlflow.search_runs(
        search_all_experiments=True, filter_string=where, output_format="list"
    )


@pytest.mark.slow
def test_a_casefold_search_trains_every_fold_per_trial_and_ranks_on_validation_folds(
    tracking, synthetic_mat, tmp_path
):
    argv = _args(tmp_path, synthetic_mat, "--n_iter", "2", "--split", "casefold", "--folds", "2")
    assert main([*argv, "--search_id", "cv", "--metric", "val_ap_mse_cond"]) == 0
    trials = [
        r for r in _runs("tags.`millvae.search_id` = 'cv'") if "millvae.trial_index" in r.data.tags
    ]
    assert sorted(r.info.status for r in trials) == ["FINISHED", "FINISHED"]
    for trial in trials:
        m = flat(trial.data.metrics)
        assert 0 <= m["cv_val_ap_mse_cond"] <= 1 and 0 <= m["pooled_test_ap_mse_cond"] <= 1
        assert trial.data.params["split_seeds"] == "0,1" and "split_seed" not in trial.data.params
        assert trial.data.tags["data_source"] == "synthetic"
        folds = _runs(f"tags.`mlflow.parentRunId` = '{trial.info.run_id}'")
        assert sorted(f.data.params["split_seed"] for f in folds) == ["0", "1"]
        assert all(f.info.status == "FINISHED" for f in folds)
        # the folds are not trials: the search counts, resumes and ranks the trials only
        assert not any("millvae.search_id" in f.data.tags for f in folds)
        fold_val = [flat(f.data.metrics)["val_ap_mse_cond"] for f in folds]
        assert m["cv_val_ap_mse_cond"] == pytest.approx(sum(fold_val) / 2)
    (parent,) = _runs("tags.`millvae.search_id` = 'cv' and tags.`millvae.search_parent` = 'true'")
    best = max(trials, key=lambda r: r.data.metrics["cv_val_ap_mse_cond"])
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert parent.data.metrics["best_cv_val_ap_mse_cond"] == best.data.metrics["cv_val_ap_mse_cond"]
    summary = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/summary.csv")
    assert "pooled_test_ap_mse_cond" in summary.splitlines()[0]

    with pytest.raises(MillvaeError, match="synthetic"):
        register_best(metric="cv_val_ap_mse_cond", search_id="cv")
    reg = register_best(metric="cv_val_ap_mse_cond", search_id="cv", allow_synthetic=True)
    assert reg.run_id == best.info.run_id and reg.test_ap_metric == "pooled_test_ap_mse_cond"
    folds = _runs(f"tags.`mlflow.parentRunId` = '{best.info.run_id}'")
    top = max(folds, key=lambda f: (f.data.metrics["val_ap_mse_cond"], -f.info.start_time))
    assert reg.fold_run_id == top.info.run_id and reg.version_tags["fold_run_id"] == top.info.run_id
    version = mlflow.MlflowClient().get_model_version("millvae", reg.version)
    assert version.run_id == top.info.run_id
    assert "detector of its fold" in reg.summary()

    again = main([*argv, "--search_id", "cv", "--metric", "val_ap_mse_cond"])
    assert again == 0  # resumed: nothing left to train, no trial or fold trained twice
    assert len(_runs(f"tags.`mlflow.parentRunId` = '{best.info.run_id}'")) == 2


def test_objectives_that_do_not_fit_the_trials_are_refused(tracking, synthetic_mat, tmp_path):
    argv = _args(tmp_path, synthetic_mat, "--n_iter", "1")
    with pytest.raises(
        MillvaeError, match=r"ranked by the validation AP over the folds, cv_val_ap"
    ):
        main([*argv, "--split", "casefold", "--metric", "val_f1_kl"])
    with pytest.raises(MillvaeError, match="trials that train every fold"):
        main([*argv, "--split", "case", "--metric", "cv_val_ap_kl"])
    with pytest.raises(MillvaeError, match="validation metrics only"):
        main([*argv, "--split", "casefold", "--metric", "pooled_test_ap_kl"])
    space = tmp_path / "split.yaml"
    space.write_text('beta: [1.0]\nsplit: ["case", "casefold"]\n')
    with pytest.raises(MillvaeError, match="split and split_seed are fixed for a whole search"):
        main(["--n_iter", "1", "--space", str(space), "--data", str(synthetic_mat)])
    assert not _runs("attributes.status = 'RUNNING'")
    assert paired_test_ap_metric("cv_val_ap_kl") == "pooled_test_ap_kl"


def test_a_dead_workers_cross_validated_trial_ends_killed_with_its_fold(tracking):
    client = mlflow.MlflowClient()
    exp = client.create_experiment("reap")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid no live process has
    tags = {
        "millvae.search_id": "dead",
        "millvae.trial_index": "0",
        "millvae.worker_pid": str(gone.pid),
        "millvae.host": socket.gethostname(),
    }
    trial = client.create_run(exp, tags=tags)
    fold = client.create_run(exp, tags={"mlflow.parentRunId": trial.info.run_id})
    client.log_metric(fold.info.run_id, "loss", 1.0)
    records = search_records()
    # another host judges a trial by its heartbeat: a fold's loss is the trial's
    loss_ms = client.get_metric_history(fold.info.run_id, "loss")[0].timestamp
    assert records.last_loss_ms(client.get_run(trial.info.run_id)) == loss_ms
    search = Search("dead", exp, "no-parent", [{}], {}, "cv_val_ap_kl")
    assert reap_dead_trials(records, search) == 1
    for run in (trial, fold):
        ended = client.get_run(run.info.run_id)
        assert ended.info.status == "KILLED" and "worker died" in ended.data.tags["millvae.error"]
