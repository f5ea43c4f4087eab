"""`millvae register` against a throw-away sqlite store with hand-made runs (no training here)."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from millvae.errors import MillvaeError
from millvae.register import higher_is_better, main, paired_test_ap_metric, register_best


class LengthModel(mlflow.pyfunc.PythonModel):
    """Stands in for the real detector: answers with the number of input rows."""

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return pd.DataFrame({"n": [len(model_input)]})


def make_run(
    experiment: str,
    name: str,
    metrics: dict[str, float],
    *,
    data_source: str = "real",
    status: str = "FINISHED",
    search_id: str | None = None,
    detector: str | None = "logged",
    tmp_path=None,
    split: str | None = None,
) -> str:
    """One run as the training code leaves it: metrics, tags and (optionally) a `detector` model."""
    exp_id = mlflow.set_experiment(experiment).experiment_id
    run = mlflow.start_run(experiment_id=exp_id, run_name=name)
    tags = {"data_source": data_source}
    if search_id:
        tags["millvae.search_id"] = search_id
    mlflow.set_tags(tags)
    if split is not None:
        mlflow.log_param("split", split)
    mlflow.log_metrics(metrics)
    if detector == "logged":  # MLflow 3: a LoggedModel whose source run is this run
        mlflow.pyfunc.log_model(name="detector", python_model=LengthModel(), pip_requirements=[])
    elif detector == "artifact":  # MLflow 2 layout: the model directory among the run's artifacts
        path = tmp_path / f"detector-{name}"
        mlflow.pyfunc.save_model(path, python_model=LengthModel(), pip_requirements=[])
        mlflow.log_artifacts(str(path), "detector")
    mlflow.end_run(status=status)
    return run.info.run_id


@pytest.fixture
def store(tracking) -> dict[str, str]:
    """Experiment `millvae`: the best validation run differs from the best test run."""
    main_metrics = {"val_rocauc_kl": 0.8, "test_rocauc_kl": 0.7, "val_f1_kl": 0.5}
    return {
        # best real FINISHED run by val_ap_kl, but only second on test
        "A": make_run(
            "millvae",
            "A",
            {
                "val_ap_kl": 0.60,
                "test_ap_kl": 0.40,
                "val_loss": 0.30,
                "test_prauc_kl_cond": 0.33,
                "test_ap_kl_doc0.75": 0.9,
                "test_ap_kl_lo": 0.2,
                "test_cut_ap_kl": 0.5,
                **main_metrics,
            },
            search_id="s1",
        ),
        # best on test: must not be what selection picks
        "B": make_run(
            "millvae",
            "B",
            {"val_ap_kl": 0.50, "test_ap_kl": 0.70, "val_loss": 0.20},
            search_id="s2",
        ),
        "failed": make_run(
            "millvae", "failed", {"val_ap_kl": 0.90, "test_ap_kl": 0.90}, status="FAILED"
        ),
        "synthetic": make_run(
            "millvae", "synthetic", {"val_ap_kl": 0.95, "test_ap_kl": 0.1}, data_source="synthetic"
        ),
        # no val_ap_kl, but the lowest val_loss
        "E": make_run("millvae", "E", {"val_loss": 0.10, "test_ap_kl": 0.99}),
    }


def test_metric_direction_and_test_ap_name():
    assert higher_is_better("val_ap_kl") and higher_is_better("val_rocauc_mse_cond")
    assert not higher_is_better("val_loss") and not higher_is_better("val_kl_loss")
    assert paired_test_ap_metric("val_rocauc_mse_cond") == "test_ap_mse_cond"
    assert paired_test_ap_metric("val_cut_ap_kl") == "test_ap_kl"
    assert paired_test_ap_metric("val_loss") is None
    with pytest.raises(
        MillvaeError, match="selection uses validation metrics only; got test_ap_kl"
    ):
        higher_is_better("test_ap_kl")
    with pytest.raises(MillvaeError, match="must be a validation metric"):
        higher_is_better("ap_kl")
    with pytest.raises(MillvaeError, match="higher or lower val_mse_mean"):
        higher_is_better("val_mse_mean")


def test_best_validation_run_registered_once_with_alias_and_tags(store, capsys):
    client = MlflowClient()
    assert main([]) == 0  # all defaults: experiment millvae, val_ap_kl, model millvae, @champion
    out = capsys.readouterr().out
    assert "version 1 (new version)" in out and store["A"] in out
    assert "val_ap_kl = 0.6000" in out and "test_ap_kl = 0.4000" in out
    assert "2 considered" in out and "1 synthetic" in out and "1 not FINISHED" in out
    assert "1 without val_ap_kl" in out

    champion = client.get_model_version_by_alias("millvae", "champion")
    assert str(champion.version) == "1" and champion.run_id == store["A"]
    tags = champion.tags
    assert tags["run_id"] == store["A"] and tags["data_source"] == "real"
    assert tags["selection_metric"] == "val_ap_kl" and float(tags["selection_value"]) == 0.6
    assert float(tags["test_ap_kl"]) == 0.4 and float(tags["test_prauc_kl_cond"]) == 0.33
    assert {"val_rocauc_kl", "test_rocauc_kl", "val_f1_kl"} <= tags.keys()
    # per-condition, interval and cut-level metrics stay on the run, not on the version
    assert not {"test_ap_kl_doc0.75", "test_ap_kl_lo", "test_cut_ap_kl", "val_loss"} & tags.keys()
    # the registered detector is the run's pyfunc and loads through the alias
    loaded = mlflow.pyfunc.load_model("models:/millvae@champion")
    assert loaded.predict(pd.DataFrame({"x": [1, 2, 3]}))["n"].tolist() == [3]

    again = register_best()
    assert (again.version, again.created, again.run_id) == ("1", False, store["A"])
    assert len(client.search_model_versions("name='millvae'")) == 1

    # synthetic runs only when allowed: then the synthetic run wins and the alias moves
    synth = register_best(allow_synthetic="yes")
    assert synth.run_id == store["synthetic"] and synth.version == "2" and synth.created
    assert synth.previous_alias_version == "1" and synth.skipped_synthetic == 0
    assert client.get_model_version_by_alias("millvae", "champion").tags["data_source"] == (
        "synthetic"
    )
    back = register_best(allow_synthetic="false")
    assert back.version == "1" and not back.created
    assert str(client.get_model_version_by_alias("millvae", "champion").version) == "1"
    assert len(client.search_model_versions("name='millvae'")) == 2


def test_loss_metric_search_id_alias_and_model_name(store):
    client = MlflowClient()
    low = register_best(metric="val_loss", model_name="by-loss", alias="staging")
    assert low.run_id == store["E"] and not low.higher_is_better and low.test_ap is None
    assert client.get_model_version_by_alias("by-loss", "staging").run_id == store["E"]

    only_s2 = register_best(search_id="s2", model_name="search")
    assert only_s2.run_id == store["B"] and only_s2.considered == 1
    assert client.get_model_version_by_alias("search", "champion").run_id == store["B"]


def test_runs_artifact_detector_is_the_fallback(tracking, tmp_path):
    run_id = make_run("old", "old", {"val_ap_kl": 0.5}, detector="artifact", tmp_path=tmp_path)
    result = register_best(experiment="old")
    assert result.model_uri == f"runs:/{run_id}/detector"
    assert MlflowClient().get_model_version_by_alias("millvae", "champion").run_id == run_id


def test_errors(tracking, tmp_path):
    make_run("failed_only", "f", {"val_ap_kl": 0.5}, status="FAILED", detector=None)
    make_run("synthetic_only", "s", {"val_ap_kl": 0.5}, data_source="synthetic", detector=None)
    make_run("no_detector", "n", {"val_ap_kl": 0.5, "val_rocauc_kl": 0.7}, detector=None)
    make_run("metric_in_failed", "ok", {"val_rocauc_kl": 0.7}, detector=None)
    make_run("metric_in_failed", "bad", {"val_ap_kl": 0.7}, status="FAILED", detector=None)
    mlflow.set_experiment("empty")

    def fails(match: str, **kwargs) -> str:
        with pytest.raises(MillvaeError, match=match) as info:
            register_best(**kwargs)
        message = str(info.value)
        assert "\n" not in message
        return message

    msg = fails("experiment 'nope' not found", experiment="nope")
    assert "'failed_only'" in msg  # lists what exists
    fails("selection uses validation metrics only; got test_ap_kl", metric="test_ap_kl")
    fails(r"'empty' has no runs", experiment="empty")
    fails(r"no FINISHED runs \(1 FAILED\)", experiment="failed_only")
    msg = fails("unknown metric val_ap_nosuch", experiment="no_detector", metric="val_ap_nosuch")
    assert "val_ap_kl" in msg and "val_rocauc_kl" in msg
    msg = fails("none of the 1 FINISHED runs .* has val_ap_kl", experiment="metric_in_failed")
    assert "val_rocauc_kl" in msg
    fails(
        "all 1 FINISHED runs .* synthetic data .* allow_synthetic=true", experiment="synthetic_only"
    )
    fails("has a 'detector' model", experiment="no_detector")
    fails("no runs", experiment="no_detector", search_id="other-search")
    fails("alias 'latest' is reserved", experiment="no_detector", alias="latest")
    fails("allow_synthetic must be one of", allow_synthetic="maybe")
    with pytest.raises(MillvaeError, match="millvae register: unrecognized arguments"):
        main(["--bogus", "1"])
    # nothing got registered on the way
    assert MlflowClient().search_registered_models() == []


def test_by_default_only_leak_free_runs_compete(tracking, capsys):
    """A leaky split=window run with a better validation figure must not win over leak-free ones."""
    leaky = make_run("millvae", "leaky", {"val_ap_kl": 0.95}, split="window")
    fair = make_run("millvae", "fair", {"val_ap_kl": 0.55}, split="case")
    result = register_best()
    assert result.run_id == fair and result.protocol == "leak-free"
    assert result.skipped_protocol == 1
    assert result.version_tags["split"] == "case"
    assert "protocol: leak-free (split=case/casefold/cut)" in result.summary()
    assert "1 of another protocol" in result.summary()
    seed = register_best(protocol="window", model_name="millvae-seed")
    assert seed.run_id == leaky and seed.skipped_protocol == 1


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["--protocol", "leaky"],
            "protocol: expected one of leak-free, case, casefold, cut, window, any",
        ),
        ([], "pass protocol=window to compare those"),
        (["--protocol", "cut"], "protocol: expected runs with split=cut (cut)"),
        (["--metric", "test_ap_kl"], "selection uses validation metrics only"),
        (["--alias", "v3"], "reserved by MLflow"),
        (["--allow_synthetic", "maybe"], "allow_synthetic must be one of"),
        (["--experiment", "nope"], "experiment 'nope' not found"),
        (["--model_name", "a/b"], "model_name must be non-empty"),
    ],
)
def test_register_refuses_in_one_line(tracking, capsys, argv, expected):
    from millvae.cli import main as cli_main

    make_run("millvae", "only-window", {"val_ap_kl": 0.9}, split="window")
    capsys.readouterr()
    assert cli_main(["register", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


@pytest.mark.slow
def test_mlflow_run_register_leaves_a_labelled_record_not_a_stray_run(tracking, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from .conftest import REPO

    chosen = make_run("millvae", "fair", {"val_ap_kl": 0.55}, split="case")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local"]
    cmd += ["--experiment-name", "millvae", "-e", "register"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = mlflow.search_runs(experiment_names=["millvae"], output_format="list")
    record = [r for r in runs if r.info.run_id != chosen]
    assert len(record) == 1
    tags = record[0].data.tags
    assert tags["model_type"] == "register" and tags["millvae.selected_run_id"] == chosen
    assert record[0].info.run_name == "register_millvae_v1"
    assert tags["millvae.protocol"] == "leak-free"
    assert mlflow.search_runs(experiment_names=["Default"], output_format="list") == []
