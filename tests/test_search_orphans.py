"""Workers end with their driver: kill -9 of the driver alone leaves no worker, no RUNNING run."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import mlflow
import pytest

from .test_search import (
    _children,
    _finish,
    _finished_once,
    _group_gone,
    _search_proc,
    _training,
    small_mat,  # noqa: F401  (fixture)
)

pytestmark = pytest.mark.slow


def _group_pids(pgid: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "-g", str(pgid)], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()} - {pgid}


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False


def _parent(search_id: str):
    (parent,) = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.`millvae.search_id` = '{search_id}' "
        "and tags.`millvae.search_parent` = 'true'",
        output_format="list",
    )
    return parent


def test_kill_9_of_the_driver_alone_ends_its_workers_and_their_runs(
    tracking,
    small_mat,  # noqa: F811
    tmp_path,
):
    proc = _search_proc(tmp_path, small_mat, "orphan", 2, 2, 50, 40)
    try:
        training = _training(proc, "orphan", n=2)
        workers = {int(r.data.tags["millvae.worker_pid"]) for r in training}
        assert workers <= _group_pids(proc.pid), (workers, _group_pids(proc.pid))
        os.kill(proc.pid, signal.SIGKILL)  # the driver only: its workers get no signal from it
        proc.wait()
        t0 = time.time()
        while any(map(_running, workers)) and time.time() - t0 < 10:
            time.sleep(0.1)
        left = [p for p in workers if _running(p)]
        assert not left, f"workers {left} outlived their driver by 10 s"
        _group_gone(proc)  # nothing else of the search either (the queues' helpers)
    finally:
        if proc.poll() is None or _group_pids(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    statuses = sorted(r.info.status for r in _children("orphan"))
    assert statuses == ["KILLED", "KILLED"], statuses
    assert all("driver died" in r.data.tags["millvae.error"] for r in _children("orphan"))
    assert _parent("orphan").info.status == "KILLED"

    again = _search_proc(tmp_path, small_mat, "orphan", 2, 2, 50, 40)
    out = _finish(again, 900)
    assert again.returncode == 0, out[-3000:]
    runs = _finished_once("orphan", 2)
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED", "KILLED", "KILLED"]
    assert _parent("orphan").info.status == "FINISHED"
