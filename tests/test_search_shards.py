"""One search spread over shard workers, as on a Kubernetes Indexed Job or a Slurm array.

The shard workers are real `python -m millvae search` processes started at the same time against a
real `mlflow server` on a throw-away PostgreSQL database (see tests/servers.py).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from .conftest import REPO
from .servers import mlflow_server, postgres_uri  # noqa: F401  (fixtures)
from .test_search import TINY_SPACE

pytestmark = pytest.mark.slow

SPACE_YAML = TINY_SPACE % 2  # patience 2: a trial stops after a few epochs
WORKER_TIMEOUT_S = 900
METRICS = ("best_val_loss", "val_ap_kl", "training_seconds")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """A small synthetic mill.mat (six cases): quick to prepare, both classes present."""
    from millvae.data.synthetic import write_synthetic_mat

    path = tmp_path_factory.mktemp("small-data") / "mill_small.mat"
    return write_synthetic_mat(path, seed=0, cases=[1, 5, 9, 13, 3, 11])


@pytest.fixture(scope="module")
def space_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("space") / "space.yaml"
    path.write_text(SPACE_YAML)
    return path


def expected_draws(n_iter: int, seed: int) -> list[dict]:
    """The trials the spec promises: the i-th draw of ParameterSampler(space, n_iter, seed)."""
    from scipy import stats
    from sklearn.model_selection import ParameterSampler

    space = {
        "beta": stats.uniform(0.5, 9.0),
        "codings_size": stats.randint(2, 6),
        "conv_layers": [1],
        "start_filter_no": stats.randint(4, 9),
        "dilations": ["1,2"],
        "kernel_size": [2],
        "earlystop_patience": [2],
    }
    return list(ParameterSampler(space, n_iter, random_state=seed))


def _env(tracking_uri: str, **extra: str) -> dict:
    env = os.environ.copy()
    for var in (
        "MLFLOW_RUN_ID",
        "MLFLOW_EXPERIMENT_ID",
        "MLFLOW_EXPERIMENT_NAME",
        "JOB_COMPLETION_INDEX",
        "SLURM_ARRAY_TASK_ID",
    ):
        env.pop(var, None)
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _search_cmd(data: Path, space: Path, search_id: str, experiment: str, *extra: str) -> list:
    return [
        sys.executable, "-m", "millvae", "search",
        "--seed", "7", "--workers", "1",
        "--space", str(space), "--search_id", search_id, "--experiment", experiment,
        "--data", str(data), "--epochs", "2", "--bootstrap", "0",
        *extra,
    ]  # fmt: skip


def _start(cmd: list, env: dict, cwd: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd)


def _wait_all(procs: list[subprocess.Popen], logs: list[Path]) -> list[int]:
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    codes = []
    for proc, log in zip(procs, logs, strict=True):
        try:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"search worker still running after {WORKER_TIMEOUT_S} s: {_tail(log)}")
    return codes


def _tail(log: Path, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:]


def _search_runs(client: MlflowClient, experiment: str, search_id: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment!r} was not created"
    runs, token = [], None
    while True:
        page = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`millvae.search_id` = '{search_id}'",
            max_results=1000,
            page_token=token,
        )
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _check_trials(runs: list, indices: list[int], n_iter: int) -> None:
    """One parent; exactly one FINISHED child per index, with its metrics; nothing RUNNING."""
    parents = [r for r in runs if r.data.tags.get("millvae.search_parent") == "true"]
    assert len(parents) == 1, [r.info.run_id for r in parents]
    parent_id = parents[0].info.run_id
    children = [r for r in runs if r.info.run_id != parent_id]
    assert all(r.data.tags.get("mlflow.parentRunId") == parent_id for r in children)
    running = [(r.info.run_id, r.data.tags.get("millvae.trial_index")) for r in runs
               if r.info.status == "RUNNING" and r.info.run_id != parent_id]  # fmt: skip
    assert not running, f"trials left RUNNING: {running}"
    by_index: dict[str, list] = {}
    for r in children:
        by_index.setdefault(r.data.tags.get("millvae.trial_index"), []).append(r)
    finished = {k: [r for r in v if r.info.status == "FINISHED"] for k, v in by_index.items()}
    assert sorted(k for k, v in finished.items() if v) == [str(i) for i in indices], {
        k: [r.info.status for r in v] for k, v in by_index.items()
    }
    draws = expected_draws(n_iter, 7)
    for i in indices:
        (run,) = finished[str(i)]  # exactly once
        for m in METRICS:
            assert m in run.data.metrics, f"trial {i} lacks metric {m}"
        assert math.isfinite(run.data.metrics["best_val_loss"])
        params = run.data.params
        want = draws[i]
        assert float(params["beta"]) == pytest.approx(want["beta"], rel=1e-4), (i, params)
        for name in ("codings_size", "start_filter_no"):
            assert int(float(params[name])) == int(want[name]), (i, name, params[name])
        assert params["epochs"] == "2" and params["dilations"] == "1,2"


def test_server_tracks_runs_in_postgres_and_serves_artifacts(mlflow_server, postgres_uri, tmp_path):  # noqa: F811
    import psycopg

    client = MlflowClient(tracking_uri=mlflow_server)
    exp_id = client.create_experiment("fixture-check")
    assert client.get_experiment(exp_id).artifact_location.startswith("mlflow-artifacts:")
    run = client.create_run(exp_id, tags={"millvae.search_id": "fixture"})
    client.log_param(run.info.run_id, "beta", "1.5")
    client.log_metric(run.info.run_id, "val_ap_kl", 0.25, step=1)
    client.log_text(run.info.run_id, "hello through the proxy\n", "notes/hello.txt")
    client.set_terminated(run.info.run_id, "FINISHED")

    got = MlflowClient(tracking_uri=mlflow_server).get_run(run.info.run_id)
    assert got.info.status == "FINISHED" and got.data.metrics["val_ap_kl"] == 0.25
    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id,
        artifact_path="notes/hello.txt",
        dst_path=str(tmp_path),
        tracking_uri=mlflow_server,
    )
    assert Path(local).read_text() == "hello through the proxy\n"
    # the run really lives in PostgreSQL, not in some local fallback store
    with psycopg.connect(postgres_uri) as conn, conn.cursor() as cur:
        cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (run.info.run_id,))
        assert cur.fetchall() == [("FINISHED",)]


def test_two_shards_run_one_search_once(mlflow_server, small_data, space_file, tmp_path):  # noqa: F811
    search_id, experiment, n_iter = "shards-2x4", "search-shards", 4
    procs, logs = [], []
    for k in (0, 1):
        log = tmp_path / f"shard{k}.log"
        cmd = _search_cmd(
            small_data, space_file, search_id, experiment,
            "--n_iter", str(n_iter), "--shard", str(k), "--n_shards", "2",
        )  # fmt: skip
        procs.append(_start(cmd, _env(mlflow_server), tmp_path, log))
        logs.append(log)
    codes = _wait_all(procs, logs)
    for code, log in zip(codes, logs, strict=True):
        assert code == 0, _tail(log)

    runs = _search_runs(MlflowClient(tracking_uri=mlflow_server), experiment, search_id)
    _check_trials(runs, indices=[0, 1, 2, 3], n_iter=n_iter)


@pytest.mark.parametrize(
    ("variable", "shard"), [("JOB_COMPLETION_INDEX", 1), ("SLURM_ARRAY_TASK_ID", 1)]
)
def test_scheduler_index_picks_the_shard(
    tracking, small_data, space_file, tmp_path, variable, shard
):
    search_id, experiment, n_iter = f"env-{variable.lower()}", "search-env", 2
    log = tmp_path / "worker.log"
    cmd = _search_cmd(
        small_data, space_file, search_id, experiment, "--n_iter", str(n_iter), "--n_shards", "2"
    )
    proc = _start(cmd, _env(tracking, **{variable: str(shard)}), tmp_path, log)
    (code,) = _wait_all([proc], [log])
    assert code == 0, _tail(log)

    runs = _search_runs(MlflowClient(tracking_uri=tracking), experiment, search_id)
    _check_trials(runs, indices=[shard], n_iter=n_iter)
    children = [r for r in runs if r.data.tags.get("millvae.search_parent") != "true"]
    assert {r.data.tags["millvae.trial_index"] for r in children} == {str(shard)}


def test_the_same_search_started_twice_on_the_server_runs_each_trial_once(
    mlflow_server,  # noqa: F811
    small_data,
    space_file,
    tmp_path,
):
    # no shards: two drivers of one whole search, started together (a job submitted twice); each
    # trial is claimed by one of them in the PostgreSQL store behind the server
    search_id, experiment, n_iter = "twice", "search-twice", 3
    procs, logs = [], []
    for k in (0, 1):
        log = tmp_path / f"driver{k}.log"
        cmd = _search_cmd(small_data, space_file, search_id, experiment, "--n_iter", str(n_iter))
        procs.append(_start(cmd, _env(mlflow_server), tmp_path, log))
        logs.append(log)
    codes = _wait_all(procs, logs)
    for code, log in zip(codes, logs, strict=True):
        assert code == 0, _tail(log)

    runs = _search_runs(MlflowClient(tracking_uri=mlflow_server), experiment, search_id)
    _check_trials(runs, indices=[0, 1, 2], n_iter=n_iter)
    children = [r for r in runs if r.data.tags.get("millvae.search_parent") != "true"]
    assert len(children) == n_iter, [(r.data.tags["millvae.trial_index"], r.info.status)
                                     for r in children]  # fmt: skip
