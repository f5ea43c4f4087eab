"""The end-to-end path as a user runs it: `mlflow run . --env-manager local -P ...` subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from millvae.config import PARAM_NAMES

from .conftest import REPO

pytestmark = pytest.mark.slow


def _mlflow_run(tmp_path, *params: str, experiment: str = "millvae"):
    env = os.environ.copy()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "run",
        str(REPO),
        "--env-manager",
        "local",
        "--experiment-name",
        experiment,
    ]
    for p in params:
        cmd += ["-P", p]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)


def test_mlflow_run_trains_and_tracks_a_model(tracking, synthetic_mat, tmp_path):
    out = _mlflow_run(
        tmp_path,
        f"data={synthetic_mat}",
        "epochs=3",
        "beta=1.250",
        "codings_size=4",
        "start_filter_no=8",
        "dilations=1,2",
        "earlystop_patience=20",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Epoch 3/3" in out.stdout + out.stderr  # per-epoch progress is visible
    runs = mlflow.search_runs(experiment_names=["millvae"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    client = mlflow.MlflowClient()
    assert run.info.status == "FINISHED"
    assert run.data.params["beta"] == "1.250"  # as mlflow run logged it, not re-logged
    assert set(PARAM_NAMES) <= set(run.data.params)
    assert run.info.run_name.startswith("bvae_beta-1.25_cod-4")
    assert run.data.tags["data_source"] == "synthetic"
    hist = client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in hist] == [1, 2, 3]
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"history.csv", "scaler.json", "plots"} <= arts

    code = (
        "import numpy as np, mlflow\n"
        f"m = mlflow.tensorflow.load_model('runs:/{run.info.run_id}/model')\n"
        "y = np.asarray(m(np.full((3, 64, 6), 0.5, dtype='float32'), training=False))\n"
        "assert y.shape == (3, 64, 6) and np.isfinite(y).all(), y.shape\n"
        "print('loaded-ok')\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert loaded.returncode == 0 and "loaded-ok" in loaded.stdout, loaded.stderr[-2000:]


def test_mlflow_run_with_a_bad_parameter_fails_fast_and_leaves_no_running_run(tracking, tmp_path):
    out = _mlflow_run(tmp_path, "beta=-2", "data=synthetic")
    assert out.returncode != 0
    assert "millvae: error: beta: expected a number >= 0; got -2" in out.stderr
    runs = mlflow.search_runs(experiment_names=["millvae"], output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]


def test_mlflow_run_repeat_makes_one_child_per_seed_and_trains_none_into_the_parent(
    tracking, synthetic_mat, tmp_path
):
    cmd_params = [
        f"data={synthetic_mat}",
        # no split_seeds: under split=casefold that is every fold
        "split=casefold",
        "folds=3",
        "epochs=2",
        "codings_size=4",
        "start_filter_no=8",
        "dilations=1,2",
        "bootstrap=10",
    ]
    env_entry = ["-e", "repeat"]
    env = os.environ.copy()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local"]
    cmd += ["--experiment-name", "millvae", *env_entry]
    for p in cmd_params:
        cmd += ["-P", p]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = mlflow.search_runs(experiment_names=["millvae"], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.data.tags.get("mlflow.runName") for r in runs]
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(c.data.params["split_seed"] for c in children) == ["0", "1", "2"]
    assert len(runs) == 4
    assert parent.data.tags["model_type"] == "repeat"
    # the parent holds the summary, not a training of its own
    assert (
        "best_val_loss" not in parent.data.metrics and "mean_best_val_loss" in parent.data.metrics
    )
    assert all(c.data.tags["model_type"] == "beta_vae" for c in children)
    assert all(r.info.status == "FINISHED" for r in runs)
    # the pooled out-of-fold figures over all 8 failing tools of the synthetic data
    assert 0 <= parent.data.metrics["pooled_test_ap_kl_cond"] <= 1
    assert parent.data.metrics["detail/pooled_test_tools"] == 8


def test_mlflow_run_refuses_a_configuration_beyond_memory_before_loading_data(tracking, tmp_path):
    out = _mlflow_run(tmp_path, "kernel_size=64", "dilations=1,2,4,8,16,32,64", "batch_size=65536")
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()
    assert any(line.startswith("millvae: error: memory: expected a configuration") for line in last)
    assert "Traceback" not in out.stderr
    runs = mlflow.search_runs(experiment_names=["millvae"], output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "data_source" not in runs[0].data.tags  # refused before any data was read


def test_readme_command_one_files_a_labelled_run_in_millvae_and_says_which_data_first(
    tracking, tmp_path, monkeypatch
):
    readme = (REPO / "README.md").read_text()
    first = next(line for line in readme.splitlines() if "mlflow run ." in line)
    assert "--experiment-name millvae" in first, first
    monkeypatch.delenv("MILLVAE_OFFLINE")  # the download is tried, against a dead loopback port
    out = _mlflow_run(tmp_path, "beta=1.25", "epochs=1", "bootstrap=10")
    assert out.returncode == 0, out.stderr[-3000:]
    ours = [line for line in out.stderr.splitlines() if line.startswith("millvae:")]
    assert ours[0].startswith("millvae: data=auto: no real data yet"), ours[:3]
    assert "fetching the UC Berkeley milling data once from NASA" in ours[0]
    assert "downloading http://127.0.0.1:9/" in out.stderr  # where from, before it is tried
    assert any("using the SYNTHETIC simulator" in line for line in ours[:4]), ours[:4]
    (run,) = mlflow.search_runs(experiment_names=["millvae"], output_format="list")
    assert run.info.run_name.endswith("_window_synthetic_ep1")
    assert run.data.tags["millvae.synthetic_data"].startswith("true")
