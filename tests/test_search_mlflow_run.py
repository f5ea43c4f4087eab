"""`mlflow run . -e search`: the run `mlflow run` makes is the parent, each trial its child."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from millvae.search.store import PARENT_TAG, SEARCH_ID_TAG, TRIAL_TAG

from .conftest import REPO
from .test_search import TINY_SPACE, small_mat  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


def _mlflow_run_search(tmp_path: Path, experiment: str, *params: str):
    env = os.environ.copy()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local"]
    cmd += ["--experiment-name", experiment, "-e", "search"]
    for p in params:
        cmd += ["-P", p]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)


@pytest.mark.parametrize("experiment", ["millvae", "elsewhere"])
def test_mlflow_run_search_makes_its_run_the_parent_of_every_trial(
    tracking,
    small_mat,  # noqa: F811
    tmp_path,
    experiment,
):
    # "elsewhere": `mlflow run` files its run in another experiment than the search's default
    space = tmp_path / "space.yaml"
    space.write_text(TINY_SPACE % 2)
    out = _mlflow_run_search(
        tmp_path, experiment, "n_iter=2", "workers=1", "seed=11", f"space={space}",
        "search_id=mr", f"data={small_mat}", "epochs=2", "bootstrap=0",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    drivers = [r for r in runs if r.data.tags.get("mlflow.project.entryPoint") == "search"]
    assert len(drivers) == 1, [r.data.tags for r in runs]
    parent = drivers[0]
    assert parent.data.tags[PARENT_TAG] == "true" and parent.data.tags[SEARCH_ID_TAG] == "mr"
    assert parent.info.status == "FINISHED" and parent.info.run_name == "search-mr"
    assert parent.data.metrics["n_finished"] == 2
    # nothing was trained into the parent
    assert "loss" not in parent.data.metrics and "best_val_loss" not in parent.data.metrics
    assert "beta" not in parent.data.params and "model" not in {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }
    children = [r for r in runs if r.info.run_id != parent.info.run_id]
    assert sorted(r.data.tags[TRIAL_TAG] for r in children) == ["0", "1"], len(children)
    for r in children:
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.info.status == "FINISHED" and "best_val_loss" in r.data.metrics
        assert "mlflow.project.entryPoint" not in r.data.tags  # a run of its own, not the driver's
    # the whole tree lives in the experiment `mlflow run` chose, none in a second one
    assert sorted(e.name for e in client.search_experiments()) == sorted({"Default", experiment})
