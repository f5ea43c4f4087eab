"""One search started twice at once: one parent run, each trial claimed by exactly one process.

Real processes racing on a real sqlite store: they line up on a file barrier, then all call the
same function at once (see RACER).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import ViewType

from millvae.search.store import PARENT_TAG, SEARCH_ID_TAG

from .conftest import REPO
from .test_search import _children, _finish, _search_proc, small_mat  # noqa: F401  (fixture)

# Waits for tmp/go, then opens the parent of search "race" (argv[2] == "parent") or claims trial
# 0 of it (argv[2] == "claim", argv[3] the parent run id); prints what it got as JSON. With
# argv[4] == "hold" it stays alive until tmp/release exists (a live holder).
RACER = """
import json, os, sys, time
from pathlib import Path
from mlflow import MlflowClient
from millvae.search import store as S

tmp, what = Path(sys.argv[1]), sys.argv[2]
client = MlflowClient()
exp_id = client.get_experiment_by_name("race").experiment_id
records = S.search_records()
(tmp / f"ready-{os.getpid()}").touch()
while not (tmp / "go").exists():
    time.sleep(0.001)
if what == "parent":
    desc = {"n_iter": "3", "seed": "1", "search_space": "{}", "overrides": "{}",
            "metric": "val_ap_kl", "search_id": "race"}
    got = S.open_parent(records, exp_id, "race", desc)
else:
    search = S.Search("race", exp_id, sys.argv[3], [{}], {}, "val_ap_kl")
    got = S.claim_trial(records, search, 0)
print(json.dumps(got), flush=True)
if len(sys.argv) > 4:
    while not (tmp / "release").exists():
        time.sleep(0.05)
"""


def _race(base: Path, n: int, *args: str) -> tuple[list[subprocess.Popen], Path]:
    """n racers started, lined up at their barrier and released at once; and the barrier's
    folder (touch its `release` to let a holding racer go)."""
    tmp = Path(tempfile.mkdtemp(dir=base))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(tmp), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(n)
    ]
    deadline = time.time() + 180
    while len(list(tmp.glob("ready-*"))) < n:
        bad = [p for p in procs if p.poll() is not None]
        if bad:
            pytest.fail(f"a racer ended early: {bad[0].stderr.read()[-2000:]}")
        if time.time() > deadline:
            pytest.fail("the racers did not get ready in time")
        time.sleep(0.05)
    (tmp / "go").touch()
    return procs, tmp


def _answers(procs: list[subprocess.Popen]) -> list:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=180)
        assert p.returncode == 0, stderr[-3000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


@pytest.fixture
def race_experiment(tracking) -> str:
    return MlflowClient().create_experiment("race")


def test_drivers_starting_together_make_one_parent_run(race_experiment, tmp_path):
    procs, _ = _race(tmp_path, 6, "parent")
    ids = _answers(procs)
    assert len(set(ids)) == 1, ids
    made = MlflowClient().search_runs([race_experiment], run_view_type=ViewType.ALL)
    # exactly one run was ever created: no loser made one and deleted it again
    assert [r.info.run_id for r in made] == ids[:1]
    assert made[0].data.tags[PARENT_TAG] == "true" and made[0].data.tags[SEARCH_ID_TAG] == "race"
    assert made[0].data.params["n_iter"] == "3"
    # the lock that decided it is out of sight, and the next start finds the parent
    assert sorted(e.name for e in MlflowClient().search_experiments()) == ["Default", "race"]
    assert _answers(_race(tmp_path, 1, "parent")[0]) == ids[:1]


def test_a_trial_is_claimed_once_and_a_dead_holders_claim_is_taken_over(race_experiment, tmp_path):
    parent = MlflowClient().create_run(race_experiment, tags={PARENT_TAG: "true"}).info.run_id
    got = _answers(_race(tmp_path, 6, "claim", parent)[0])
    assert sorted(got, key=str) == [None] * 5 + ["millvae.claim.0.0"], got
    assert list(MlflowClient().get_run(parent).data.params) == ["millvae.claim.0.0"]

    # its holder is gone (and made no run): the next claim takes generation 1, and holds it
    (holder,), barrier = _race(tmp_path, 1, "claim", parent, "hold")
    try:
        assert json.loads(holder.stdout.readline()) == "millvae.claim.0.1"
        assert _answers(_race(tmp_path, 2, "claim", parent)[0]) == [None, None]
    finally:
        (barrier / "release").touch()
        holder.communicate(timeout=60)
    assert _answers(_race(tmp_path, 1, "claim", parent)[0]) == ["millvae.claim.0.2"]


def _count_finished(search_id: str) -> dict[int, int]:
    counts: dict[int, int] = {}
    for r in _children(search_id):
        if r.info.status == "FINISHED":
            i = int(r.data.tags["millvae.trial_index"])
            counts[i] = counts.get(i, 0) + 1
    return counts


@pytest.mark.slow
def test_the_same_search_started_twice_at_once_runs_each_trial_once(
    tracking,
    small_mat,  # noqa: F811
    tmp_path,
):
    procs = [_search_proc(tmp_path, small_mat, "twice", 1, 3, 2, 2) for _ in range(2)]
    try:
        outs = [_finish(p, 900) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert _count_finished("twice") == {0: 1, 1: 1, 2: 1}
    # each driver queued the trials not yet finished; each went to one, the other was told so
    pattern = r"search: (\d)/(\d) ended \((\d) finished, 0 failed(?:, (\d) left)?"
    ends = [re.findall(pattern, o)[-1:] for o in outs]
    assert all(ends), outs[0][-2000:]
    counts = [[int(x or 0) for x in e[0]] for e in ends]
    assert all(n == total and ran + left == total for n, total, ran, left in counts), counts
    assert sum(ran for _, _, ran, _ in counts) == 3, counts
    runs = _children("twice")
    assert len(runs) == 3, [(r.data.tags["millvae.trial_index"], r.info.status) for r in runs]
    parents = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.`{SEARCH_ID_TAG}` = 'twice' and tags.`{PARENT_TAG}` = 'true'",
        output_format="list",
    )
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parents[0].info.run_id}
