"""The random search: sampler trials, failures isolated, resume after SIGKILL, 4 workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
from scipy import stats
from sklearn.model_selection import ParameterSampler

from millvae.errors import MillvaeError
from millvae.search import main
from millvae.search.space import DEFAULT_SPACE, load_space, sample_trials, space_from_spec
from millvae.search.trial import trial_cost
from millvae.search.workers import WorkerPool

TINY_SPACE = """
beta: {uniform: [0.5, 9.0]}
codings_size: {randint: [2, 6]}
conv_layers: [1]
start_filter_no: {randint: [4, 9]}
dilations: ["1,2"]
kernel_size: [2]
earlystop_patience: [%d]
"""


@pytest.fixture(scope="module")
def small_mat(tmp_path_factory):
    from millvae.data.synthetic import write_synthetic_mat

    path = tmp_path_factory.mktemp("search") / "small.mat"
    return write_synthetic_mat(path, seed=0, cases=[1, 5, 9, 13, 3, 11])


def _space(tmp_path, patience=2, extra=""):
    p = tmp_path / "space.yaml"
    p.write_text(TINY_SPACE % patience + extra)
    return str(p)


def _children(search_id):
    runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.`millvae.search_id` = '{search_id}'",
        output_format="list",
    )
    return [r for r in runs if "millvae.trial_index" in r.data.tags]


def _finished_once(search_id, n):
    runs = _children(search_id)
    fin = sorted(
        int(r.data.tags["millvae.trial_index"]) for r in runs if r.info.status == "FINISHED"
    )
    assert fin == list(range(n)), fin
    assert not [r for r in runs if r.info.status == "RUNNING"]
    return runs


def test_trial_i_is_the_ith_parameter_sampler_draw():
    trials = sample_trials(DEFAULT_SPACE, 20, 135)
    assert trials == sample_trials(DEFAULT_SPACE, 20, 135)
    ref = list(ParameterSampler(space_from_spec(DEFAULT_SPACE), 20, random_state=135))
    for t, r in zip(trials, ref, strict=True):
        assert t["conv_layers"] == r["conv_layers"] and t["dilations"] == r["dilations"]
        assert t["beta"] == pytest.approx(r["beta"], abs=1e-6)
    assert all(0.5 <= t["beta"] <= 9.5 and 5 <= t["codings_size"] <= 39 for t in trials)
    assert all(16 <= t["start_filter_no"] <= 127 and 2 <= t["kernel_size"] <= 8 for t in trials)
    assert all(30 <= t["earlystop_patience"] <= 49 for t in trials)
    assert {t["final_activation"] for t in trials} == {"sigmoid", "selu"}
    assert isinstance(
        space_from_spec({"beta": {"uniform": [1, 2]}})["beta"].dist, type(stats.uniform)
    )


def test_space_errors(tmp_path):
    with pytest.raises(MillvaeError, match="unknown parameter 'bogus'"):
        space_from_spec({"bogus": [1]})
    with pytest.raises(MillvaeError, match="expected uniform, loguniform or randint"):
        space_from_spec({"beta": {"normal": [0, 1]}})
    with pytest.raises(MillvaeError, match="no such file"):
        load_space(str(tmp_path / "nope.yaml"))
    with pytest.raises(MillvaeError, match="both searched and fixed: beta"):
        main(["--n_iter", "1", "--beta", "2"])


@pytest.mark.slow
def test_failed_trials_do_not_stop_the_search_and_resume_skips_finished(
    tracking, small_mat, tmp_path, capsys
):
    # every value is valid on its own (the space passes its check), but learning_rate 0.002 with
    # lr_max 0.0015 is not: those trials must be rejected before training and recorded FAILED
    space = _space(tmp_path, extra="learning_rate: [0.001, 0.002]\nlr_max: [0.0015, 0.02]\n")
    argv = [
        "--n_iter",
        "4",
        "--seed",
        "4",
        "--workers",
        "0",
        "--space",
        space,
        "--data",
        str(small_mat),
        "--epochs",
        "2",
        "--bootstrap",
        "0",
        "--search_id",
        "f1",
    ]
    assert main(argv) == 0
    runs = _children("f1")
    bad = {int(r.data.tags["millvae.trial_index"]) for r in runs if r.info.status == "FAILED"}
    good = {int(r.data.tags["millvae.trial_index"]) for r in runs if r.info.status == "FINISHED"}
    trials = sample_trials(load_space(space), 4, 4)
    assert bad == {i for i, t in enumerate(trials) if t["learning_rate"] > t["lr_max"]} and bad
    assert good == set(range(4)) - bad
    for r in runs:
        if r.info.status == "FAILED":
            assert "lr_max" in r.data.tags["millvae.error"]
    n_before = len(runs)
    assert main(argv) == 0  # resume: finished trials are skipped, failed ones retried
    runs = _children("f1")
    assert len(runs) == n_before + len(bad)
    parent = mlflow.search_runs(
        search_all_experiments=True,
        filter_string="tags.`millvae.search_id` = 'f1' and tags.`millvae.search_parent` = 'true'",
        output_format="list",
    )
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert parent[0].data.metrics["n_failed"] == len(bad)
    assert parent[0].data.tags["best_run_id"] in {r.info.run_id for r in runs}
    assert all(r.data.tags["mlflow.parentRunId"] == parent[0].info.run_id for r in runs)


def _search_proc(tmp_path, small_mat, search_id, workers, n_iter, patience, epochs, env=None):
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if "MLFLOW_TRACKING_URI" not in (env or {}) and uri.startswith("sqlite:"):
        # The store's tables first: a test that reads the store while the search creates it runs
        # MLflow's migrations in two processes at once, and one of them fails.
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    env = {**os.environ, **(env or {})}
    cmd = [
        sys.executable,
        "-m",
        "millvae",
        "search",
        "--n_iter",
        str(n_iter),
        "--seed",
        "11",
        "--workers",
        str(workers),
        "--space",
        _space(tmp_path, patience),
        "--data",
        str(small_mat),
        "--epochs",
        str(epochs),
        "--bootstrap",
        "0",
        "--search_id",
        search_id,
    ]
    # output to a file: an unread pipe fills up with TensorFlow chatter and blocks the search
    log = open(tmp_path / f"{search_id}-{time.time_ns()}.log", "w+")
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    proc.log = log
    return proc


def _finish(proc, timeout):
    proc.wait(timeout=timeout)
    proc.log.seek(0)
    return proc.log.read()


def _training(proc, search_id, n=1, timeout=480):
    """Wait until n trials of the search are RUNNING with a logged loss; those runs."""
    deadline = time.time() + timeout
    client = mlflow.MlflowClient()
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the search ended before training: {_finish(proc, 1)[-3000:]}")
        running = [r for r in _children(search_id) if r.info.status == "RUNNING"]
        training = [r for r in running if client.get_metric_history(r.info.run_id, "loss")]
        if len(training) >= n:
            return training
        time.sleep(0.5)
    pytest.fail(f"{n} trial(s) did not start training in time")


def _group_gone(proc, seconds=15):
    """Fail unless nothing is left in the search's process group within `seconds`."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    left = subprocess.run(
        ["ps", "-o", "pid,stat,cmd", "-g", str(proc.pid)], capture_output=True, text=True
    ).stdout
    pytest.fail(f"processes outlived the search driver:\n{left}")


@pytest.mark.slow
def test_a_search_killed_mid_trial_resumes_with_every_trial_finished_once(
    tracking, small_mat, tmp_path
):
    proc = _search_proc(tmp_path, small_mat, "k1", 1, 2, 50, 40)
    try:
        _training(proc, "k1")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its worker, no cleanup possible
        proc.wait()
    assert [r.info.status for r in _children("k1")] == ["RUNNING"]
    again = _search_proc(tmp_path, small_mat, "k1", 1, 2, 50, 40)
    out = _finish(again, 600)
    assert again.returncode == 0, out[-3000:]
    assert "marked KILLED" in out
    runs = _finished_once("k1", 2)
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED", "KILLED"]


@pytest.mark.slow
def test_a_worker_killed_mid_trial_has_its_trial_retried_in_the_same_search(
    tracking, small_mat, tmp_path
):
    proc = _search_proc(tmp_path, small_mat, "kw", 2, 3, 50, 40)
    try:
        victim = _training(proc, "kw")[0]
        os.kill(int(victim.data.tags["millvae.worker_pid"]), signal.SIGKILL)  # the worker only
        out = _finish(proc, 600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    assert "died, trial queued again" in out
    runs = _finished_once("kw", 3)
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert [r.info.run_id for r in killed] == [victim.info.run_id]
    assert len(runs) == 4  # three FINISHED, one KILLED: the retry is a new run of the same trial


@pytest.mark.slow
def test_sigterm_to_the_driver_ends_the_trials_in_progress_killed_and_every_process(
    tracking, small_mat, tmp_path
):
    proc = _search_proc(tmp_path, small_mat, "st", 2, 2, 50, 400)
    try:
        _training(proc, "st", n=2)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)  # a scheduler stopping the job: the driver only
        out = _finish(proc, 120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130 and "millvae: interrupted" in out, out[-3000:]
    assert time.time() - t0 < 30  # not the 30 s grace of a search that ends normally
    _group_gone(proc)
    statuses = sorted(r.info.status for r in _children("st"))
    assert statuses == ["KILLED", "KILLED"], statuses
    (parent,) = mlflow.search_runs(
        search_all_experiments=True,
        filter_string="tags.`millvae.search_id` = 'st' and tags.`millvae.search_parent` = 'true'",
        output_format="list",
    )
    assert parent.info.status == "KILLED"  # not left RUNNING


@pytest.mark.slow
def test_four_workers_on_the_default_sqlite_store(tracking, small_mat, tmp_path):
    proc = _search_proc(tmp_path, small_mat, "w4", 4, 8, 2, 2)
    out = _finish(proc, 900)
    assert proc.returncode == 0, out[-3000:]
    assert "database is locked" not in out
    runs = _finished_once("w4", 8)
    assert len(runs) == 8
    for r in runs:
        assert "val_ap_kl" in r.data.metrics and "best_val_loss" in r.data.metrics
        hist = mlflow.MlflowClient().get_metric_history(r.info.run_id, "val_loss")
        assert [m.step for m in hist] == list(range(1, len(hist) + 1)) and hist
    assert len({r.data.tags["millvae.worker_pid"] for r in runs}) > 1


@pytest.mark.slow
def test_a_worker_whose_memory_grew_hands_over_to_a_fresh_one(tracking, small_mat, tmp_path):
    # any growth at all retires a worker after its second trial (the first sets the baseline):
    # 4 trials on one worker slot take two workers, two trials each
    proc = _search_proc(tmp_path, small_mat, "r1", 1, 4, 2, 1, env={"MILLVAE_RECYCLE_MIB": "-1e9"})
    out = _finish(proc, 900)
    assert proc.returncode == 0, out[-3000:]
    runs = _finished_once("r1", 4)
    pids = [
        r.data.tags["millvae.worker_pid"] for r in sorted(runs, key=lambda r: r.info.start_time)
    ]
    assert len(set(pids)) == 2 and pids[0] == pids[1] and pids[2] == pids[3], pids
    assert all(r.data.metrics["worker_rss_mib"] > 0 for r in runs)
    # one worker slot shows the dispatch order: the largest trials first, ties in index order
    trials = sample_trials(load_space(_space(tmp_path, 2)), 4, 11)
    costs = [trial_cost({**t, "epochs": 1}) for t in trials]
    assert len(set(costs)) > 1, costs  # otherwise the order says nothing
    started = [
        int(r.data.tags["millvae.trial_index"])
        for r in sorted(runs, key=lambda r: r.info.start_time)
    ]
    assert started == sorted(range(4), key=lambda i: (-costs[i], i)), (started, costs)


@pytest.mark.slow
def test_retiring_workers_with_forked_workers_finish_every_trial_once(
    tracking, small_mat, tmp_path
):
    # two worker slots (on Linux the second is forked from the first): each retires after its
    # second trial and a fresh one takes its place, the first without waiting for its fork
    proc = _search_proc(tmp_path, small_mat, "r2", 2, 6, 2, 1, env={"MILLVAE_RECYCLE_MIB": "-1e9"})
    out = _finish(proc, 900)
    assert proc.returncode == 0, out[-3000:]
    runs = _finished_once("r2", 6)
    assert len(runs) == 6
    assert len({r.data.tags["millvae.worker_pid"] for r in runs}) >= 3


def test_workers_started_before_the_driver_fails_do_not_outlive_it(small_mat, tmp_path):
    # the workers start importing before the driver opens the store; a store that cannot be
    # opened must end the command with a one-line error and take the workers with it
    (tmp_path / "a-file").write_text("not a directory")
    bad_store = f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}"
    t0 = time.time()
    proc = _search_proc(
        tmp_path, small_mat, "gone", 2, 4, 2, 1, env={"MLFLOW_TRACKING_URI": bad_store}
    )
    out = _finish(proc, 300)
    assert proc.returncode != 0, out[-3000:]
    assert "millvae: error:" in out
    assert time.time() - t0 < 120
    _group_gone(proc)  # the queues' helper processes exit once the driver is gone


def test_trial_cost_grows_with_the_model_and_is_zero_for_invalid_trials():
    base = {"conv_layers": 1, "start_filter_no": 16, "kernel_size": 2, "dilations": "1,2"}
    c = trial_cost(base)
    assert c > 0
    assert trial_cost({**base, "start_filter_no": 64}) > c
    assert trial_cost({**base, "kernel_size": 8}) > c
    assert trial_cost({**base, "dilations": "1,2,4,8"}) > c
    assert trial_cost({**base, "conv_layers": 3}) > c
    assert trial_cost({**base, "epochs": 20}) > trial_cost({**base, "epochs": 10})
    assert trial_cost({**base, "conv_layers": 9}) == 0.0  # rejected before training anyway


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers are forked on Linux")
def test_forked_workers_of_an_unused_pool_end_with_it():
    # the first worker forks the others after its imports; a driver that fails after that must
    # not leave them waiting for a job for ever
    pool = WorkerPool(2)
    try:
        msg = pool.results.get(timeout=120)
        assert msg["status"] == "STARTED" and len(msg["pids"]) == 1, msg
        forked = msg["pids"][0]
        os.kill(forked, 0)  # running, waiting for its job
        assert pool.procs[0].pid != forked
    finally:
        pool.close()
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with open(f"/proc/{forked}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in "ZX":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"forked worker {forked} outlived its pool")
    assert not pool.procs[0].is_alive()
