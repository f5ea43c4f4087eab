"""Creating the sqlite tracking store (millvae/tracking/store.py): safe when processes race."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from millvae.errors import MillvaeError
from millvae.tracking.store import prepare_store, sqlite_path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Each child imports everything first, says it is ready, and waits for the go file: the race is
# over creating the store, not over who finished importing MLflow first.
RACER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import mlflow
    from millvae.tracking.store import prepare_store
    uri, barrier = sys.argv[1], Path(sys.argv[2])
    (barrier / f"ready-{os.getpid()}").touch()
    while not (barrier / "go").exists():
        time.sleep(0.001)
    prepare_store(uri)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run() as run:
        mlflow.log_param("pid", os.getpid())
    print(run.info.run_id)
    """
)


@pytest.mark.slow
def test_processes_started_together_on_a_new_store_all_succeed(tmp_path):
    # without prepare_store this race failed 10 of 10 tries (2 and 4 processes): "table ...
    # already exists", "duplicate column name", alembic's "expected to match one row"
    n = 4
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, uri, str(tmp_path)],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    deadline = time.monotonic() + 300
    while len(list(tmp_path.glob("ready-*"))) < n and time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break  # one died importing: its stderr is reported below
        time.sleep(0.01)
    (tmp_path / "go").touch()
    outs = [p.communicate(timeout=300) for p in procs]
    errors = "\n".join(err[-2000:] for p, (_, err) in zip(procs, outs, strict=True) if p.returncode)
    assert [p.returncode for p in procs] == [0] * n, errors

    from mlflow.tracking import MlflowClient

    run_ids = {out.strip().splitlines()[-1] for out, _ in outs}
    runs = MlflowClient(tracking_uri=uri).search_runs(["0"])
    assert {r.info.run_id for r in runs} == run_ids and len(run_ids) == n
    assert (tmp_path / "new" / "mlflow.db.lock").is_file()


def test_an_existing_store_is_ready_again_at_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    prepare_store(uri)
    start = time.perf_counter()
    prepare_store(uri)  # what every later entry point of this process pays: a lock and a query
    assert time.perf_counter() - start < 0.5

    from mlflow.tracking import MlflowClient

    assert [e.name for e in MlflowClient(tracking_uri=uri).search_experiments()] == ["Default"]


def test_the_current_tracking_uri_is_used_without_an_argument(tracking, tmp_path):
    prepare_store()
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "mlflow.db.lock").is_file()


def test_other_stores_are_left_alone(tmp_path):
    prepare_store(f"file://{tmp_path / 'mlruns'}")
    prepare_store("http://127.0.0.1:9")  # nothing listens: no connection is attempted
    prepare_store("sqlite://")  # in memory: nothing on disk to race for
    assert not any(tmp_path.iterdir())


def test_sqlite_paths():
    assert sqlite_path("sqlite:////abs/m.db") == Path("/abs/m.db")
    assert sqlite_path("sqlite:///rel/m.db") == Path("rel/m.db").absolute()
    assert sqlite_path("sqlite:////abs/m.db?timeout=20") == Path("/abs/m.db")
    assert sqlite_path("sqlite:///:memory:") is None
    assert sqlite_path("postgresql://u@h/db") is None


@pytest.mark.bad_input
def test_a_file_that_is_not_a_database_is_one_line(tmp_path):
    db = tmp_path / "mlflow.db"
    db.write_text("these are notes, not an MLflow store\n" * 50)
    with pytest.raises(MillvaeError, match="expected an MLflow sqlite store") as got:
        prepare_store(f"sqlite:///{db}")
    assert "\n" not in str(got.value) and "not a database" in str(got.value)


def test_entry_points_started_together_on_a_new_store_all_answer_in_one_line(tmp_path):
    """`millvae register` x4 at once on a store that does not exist yet: each creates or waits
    for the store, then says the experiment is missing; none dies in MLflow's table creation."""
    import subprocess
    import sys

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'new.db'}"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "millvae", "register"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2, err[-2000:]
        assert "Traceback" not in err and "already exists" not in err, err[-2000:]
        assert err.strip().splitlines()[-1].startswith("millvae: error: experiment 'millvae'")
