"""What the search keeps in the MLflow store: the parent run (found, or created by the one
driver that takes the lock experiment), claims of trials as parent params
`millvae.claim.<trial>.<generation>`, the trials' runs (finished, dead), the summary, the end."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from millvae.errors import MillvaeError
from millvae.metric_groups import flat
from millvae.search.space import shard_indices

if TYPE_CHECKING:
    from millvae.tracking.search import SearchRecords

SEARCH_ID_TAG = "millvae.search_id"
PARENT_TAG = "millvae.search_parent"
TRIAL_TAG = "millvae.trial_index"
PID_TAG = "millvae.worker_pid"
HOST_TAG = "millvae.host"
DRIVER_TAG = "millvae.driver"  # host|pid of the driver whose worker ran a trial
CLAIM_TAG = "millvae.claim"  # the claim (a param of the parent run) a trial run was made under
CLAIM_PREFIX = "millvae.claim."  # parent-run params millvae.claim.<trial>.<generation>
LOCK_PREFIX = ".millvae-lock"  # (deleted) experiments .millvae-lock/<experiment>/<search>/<gen>
LOCK_HOLDER_TAG = "millvae.lock_holder"
# A driver that won the lock makes the parent run in two requests; a lock this old without a
# parent run belongs to a driver that died in between.
LOCK_TIMEOUT_S = 60.0


@dataclass
class Search:
    search_id: str
    experiment_id: str
    parent_id: str
    trials: list[dict]
    overrides: dict
    metric: str
    shard: int = 0
    n_shards: int = 1
    stale_minutes: float = 30.0
    driver_run_id: str = ""  # the run `mlflow run -e search` made for this process, if any
    driver: str = ""  # host|pid of this driver (DRIVER_TAG of the trials its workers run)

    def my_indices(self) -> list[int]:
        return shard_indices(len(self.trials), self.shard, self.n_shards)


def search_records() -> SearchRecords:
    # MLflow loads here, when a search opens the store: `millvae search --help` stays light
    from millvae.tracking.search import SearchRecords

    return SearchRecords()


def _children(client: SearchRecords, search: Search) -> list:
    runs = client.runs_tagged(search.experiment_id, {SEARCH_ID_TAG: search.search_id}, 50000)
    return [r for r in runs if TRIAL_TAG in r.data.tags]


def _parents(client: SearchRecords, experiment_id: str, search_id: str) -> list:
    runs = client.runs_tagged(experiment_id, {SEARCH_ID_TAG: search_id, PARENT_TAG: "true"}, 100)
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def open_parent(
    client: SearchRecords, experiment_id: str, search_id: str, description: dict
) -> str:
    """Find or create the search's parent run: of drivers and shards starting together, exactly
    one creates it (the one that takes `_take_lock`); the others wait for it."""
    deadline = time.monotonic() + 3 * LOCK_TIMEOUT_S
    waiting = False
    while not (found := _parents(client, experiment_id, search_id)):
        if time.monotonic() > deadline:
            raise MillvaeError(
                f"search_id {search_id!r}: expected its parent run to appear; none did in "
                f"{3 * LOCK_TIMEOUT_S:.0f} s"
            )
        if _take_lock(client, experiment_id, search_id):
            _create_parent(client, experiment_id, search_id, description)
            continue
        if not waiting:
            print(f"search {search_id}: another driver is creating the parent run; waiting")
            waiting = True
        time.sleep(0.5)
    parent = found[0]
    for k in ("n_iter", "seed", "search_space", "overrides"):
        old = parent.data.tags.get(f"millvae.search.{k}")
        if old is not None and old != description[k]:
            raise MillvaeError(
                f"search_id {search_id!r} was started with {k}={old}; got {description[k]} "
                "(use another search_id for another search)"
            )
    return parent.info.run_id


def _create_parent(
    client: SearchRecords, experiment_id: str, search_id: str, description: dict
) -> str:
    """The parent run (the run of `mlflow run -e search`, where there is one), tagged at once:
    drivers waiting for it read the description's tags as soon as they find it."""
    tags = {SEARCH_ID_TAG: search_id, "model_type": "search"}
    tags.update({f"millvae.search.{k}": v for k, v in description.items()})
    tags[PARENT_TAG] = "true"
    return client.create_parent(experiment_id, f"search-{search_id}", tags, description)


def _lock_name(experiment_id: str, search_id: str, gen: int) -> str:
    return f"{LOCK_PREFIX}/{experiment_id}/{search_id}/{gen}"


def _take_lock(client: SearchRecords, experiment_id: str, search_id: str) -> bool:
    """Whether this driver may create the search's parent run.

    Experiment names are unique in every MLflow store, and a deleted experiment keeps its name:
    of drivers creating the lock experiment of one generation, exactly one succeeds. It is
    deleted at once (out of sight in the UI). A lock whose holder died before the parent run
    existed is taken over with the next generation.
    """
    gen, last = 0, None
    while (tags := client.experiment_tags(_lock_name(experiment_id, search_id, gen))) is not None:
        gen, last = gen + 1, tags
    if last is not None and _lock_holds(last.get(LOCK_HOLDER_TAG, "")):
        return False
    # False: another driver took this generation first
    return client.take_name(_lock_name(experiment_id, search_id, gen), {LOCK_HOLDER_TAG: _holder()})


def _lock_holds(value: str) -> bool:
    h = _Holder.parse(value)
    if h is None or time.time() - h.since > LOCK_TIMEOUT_S:
        return False
    return h.host != socket.gethostname() or h.alive()


@dataclass
class _Holder:
    """Who holds a claim or lock: host, pid, the process's start time (a reused pid is another
    process), when it claimed, and a nonce that tells two claims of one process apart."""

    host: str
    pid: int
    start: str
    since: float
    nonce: str

    @classmethod
    def parse(cls, value: str) -> _Holder | None:
        try:
            host, pid, start, t, nonce = value.split("|")
            return cls(host, int(pid), start, float(t), nonce)
        except ValueError:
            return None

    def alive(self) -> bool:
        """Whether the holding process (on this host) still runs: an earlier claim of this very
        process is over, as a process runs one trial at a time."""
        if self.pid == os.getpid() or not _alive(self.pid):
            return False
        return not self.start or _proc_start(self.pid) in ("", self.start)


def _holder() -> str:
    host, pid = socket.gethostname(), os.getpid()
    return f"{host}|{pid}|{_proc_start(pid)}|{time.time():.3f}|{uuid.uuid4().hex[:12]}"


def _proc_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux); '' where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def claim_trial(client: SearchRecords, search: Search, index: int) -> str | None:
    """Claim trial `index` for this process: the claim's key, or None where the trial is
    FINISHED or another live process holds it.

    A claim is a param `millvae.claim.<index>.<generation>` of the parent run, with this
    process's `_holder` value. Params are keyed (run, key) and a key logged again with another
    value is refused; the database stores (sqlite, PostgreSQL, a tracking server on either)
    enforce that with a unique key, so of processes claiming one generation exactly one wins;
    each reads back what was stored. MLflow's `file:` store checks and then writes, so two drivers
    of one search need a database store. A claim whose holder died, or ended its run without
    finishing it, is taken over with the next generation (a rerun, a retried trial).
    """
    me = _holder()
    while True:
        gen, last = _last_claim(client.params(search.parent_id), index)
        if last is not None:
            runs = _trial_runs(client, search, index)
            if any(r.info.status == "FINISHED" for r in runs):
                return None
            mine = [r for r in runs if r.data.tags.get(CLAIM_TAG) == _claim_key(index, gen)]
            if _claim_holds(client, search, last, mine):
                return None
            _end_dead_runs(client, mine)
        key = _claim_key(index, gen + 1)
        if not client.log_claim(search.parent_id, key, me):
            continue  # another process claimed this generation first: look again
        if client.params(search.parent_id).get(key) == me:
            return key


def _claim_key(index: int, gen: int) -> str:
    return f"{CLAIM_PREFIX}{index}.{gen}"


def _last_claim(params: Mapping[str, str], index: int) -> tuple[int, _Holder | None]:
    """The newest generation of trial `index`'s claims and its holder (-1, None: unclaimed)."""
    prefix = f"{CLAIM_PREFIX}{index}."
    gens = [int(k[len(prefix) :]) for k in params if k.startswith(prefix)]
    if not gens:
        return -1, None
    gen = max(gens)
    return gen, _Holder.parse(params[_claim_key(index, gen)]) or _Holder("", 0, "", 0.0, "")


def _claim_holds(client: SearchRecords, search: Search, holder: _Holder, runs: list) -> bool:
    """Whether a claim still holds: its run (if made yet) is RUNNING and its process lives; a
    process on another host is judged by its progress (the `stale_minutes` rule)."""
    if any(r.info.status != "RUNNING" for r in runs):
        return False
    if holder.host == socket.gethostname():
        return holder.alive()
    if runs:
        return not _stale(client, runs[0], search.stale_minutes)
    return time.time() - holder.since < search.stale_minutes * 60


def _end_dead_runs(client: SearchRecords, runs: list) -> None:
    why = "worker died (process gone or no heartbeat)"
    for run in runs:
        if run.info.status == "RUNNING":
            # the fold in progress of a cross-validated trial, nested under the trial's run
            for child in client.children(run):
                if child.info.status == "RUNNING":
                    client.end(child.info.run_id, "KILLED", why)
            client.end(run.info.run_id, "KILLED", why)


def _trial_runs(client: SearchRecords, search: Search, index: int) -> list:
    tags = {SEARCH_ID_TAG: search.search_id, TRIAL_TAG: str(index)}
    return client.runs_tagged(search.experiment_id, tags, 1000)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an exited child its parent has not waited for yet is a zombie: dead all the same
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (OSError, IndexError):
        return True


def reap_dead_trials(client: SearchRecords, search: Search) -> int:
    """Trials left RUNNING by a worker that died (SIGKILL, OOM, lost machine) become KILLED."""
    host = socket.gethostname()
    reaped = 0
    for run in _children(client, search):
        if run.info.status != "RUNNING":
            continue
        tags = run.data.tags
        pid = int(tags.get(PID_TAG, "0") or 0)
        if tags.get(HOST_TAG) == host:
            dead = pid <= 0 or not _alive(pid) or pid == os.getpid()
        else:
            dead = _stale(client, run, search.stale_minutes)
        if dead:
            _end_dead_runs(client, [run])
            reaped += 1
    return reaped


def _stale(client: SearchRecords, run, minutes: float) -> bool:
    """Whether a run of another host showed no progress (a logged loss) for `minutes`."""
    return time.time() * 1000 - client.last_loss_ms(run) > minutes * 60_000


def pending_trials(client: SearchRecords, search: Search) -> list[int]:
    finished = set()
    for run in _children(client, search):
        if run.info.status == "FINISHED":
            finished.add(int(run.data.tags.get(TRIAL_TAG, -1)))
    return [i for i in search.my_indices() if i not in finished]


def end_parent(client: SearchRecords, search: Search, status: str) -> None:
    """End the parent run `status` (a driver stopped or killed) unless trials of another
    driver still run in it (a shard, a second start); `mlflow run` ends a parent it made."""
    if search.parent_id == search.driver_run_id:
        return
    try:
        if client.status(search.parent_id) != "RUNNING":
            return
        others = [
            r
            for r in _children(client, search)
            if r.info.status == "RUNNING" and r.data.tags.get(DRIVER_TAG) != search.driver
        ]
        if not others:
            client.end(search.parent_id, status)
    except Exception as exc:  # the store may be what failed; the next start sets it right
        print(f"search: could not mark the parent run {status}: {exc}", file=sys.stderr)


def _reopen_parent(client: SearchRecords, search: Search) -> None:
    """A parent ended KILLED or FAILED runs again while a resumed search runs in it."""
    if search.parent_id != search.driver_run_id:
        if client.status(search.parent_id) != "RUNNING":
            client.reopen(search.parent_id)


def summarize(search: Search, top: int = 10) -> dict:
    """Log the summary on the parent; end it FINISHED once every trial has ended."""
    import pandas as pd

    from millvae.register import paired_test_ap_metric

    client = search_records()
    # the chosen trial's test figure is shown beside its validation figure, never used
    beside = paired_test_ap_metric(search.metric) or "test_ap_kl"
    rows = []
    for run in _children(client, search):
        m, p = flat(run.data.metrics), run.data.params
        rows.append(
            {
                "trial_index": int(run.data.tags.get(TRIAL_TAG, -1)),
                "status": run.info.status,
                "run_id": run.info.run_id,
                search.metric: m.get(search.metric),
                beside: m.get(beside),
                "best_val_loss": m.get("best_val_loss"),
                "epochs_trained": m.get("epochs_trained"),
                **{k: p.get(k) for k in sorted(search.trials[0]) if search.trials},
            }
        )
    table = pd.DataFrame(rows)
    total = len(search.trials)
    finished = table[table["status"] == "FINISHED"] if len(table) else table
    n_finished = finished["trial_index"].nunique() if len(finished) else 0
    ended_idx = set(finished["trial_index"]) if len(finished) else set()
    failed_only = set()
    if len(table):
        failed_only = set(table.loc[table["status"].isin(["FAILED", "KILLED"]), "trial_index"])
        failed_only -= ended_idx
    stats = {"n_trials": total, "n_finished": n_finished, "n_failed": len(failed_only)}
    pid = search.parent_id
    for k, v in stats.items():
        client.record_metric(pid, k, v)
    if n_finished:
        ranked = finished.dropna(subset=[search.metric]).sort_values(
            search.metric, ascending="loss" in search.metric
        )
        if len(ranked):
            best = ranked.iloc[0]
            client.tag(
                pid, {"best_run_id": best["run_id"], "best_trial_index": str(best["trial_index"])}
            )
            client.record_metric(pid, f"best_{search.metric}", float(best[search.metric]))
            stats["best_run_id"] = best["run_id"]
        client.log_tables(
            pid,
            {"summary.csv": ranked.head(top), "all_trials.csv": table.sort_values("trial_index")},
        )
        print(
            ranked.head(top)[["trial_index", search.metric, beside, "run_id"]].to_string(
                index=False
            )
        )
    if n_finished + len(failed_only) >= total and search.driver_run_id != pid:
        client.end(pid, "FINISHED" if n_finished else "FAILED")
    stats["finished_indices"] = sorted(int(i) for i in ended_idx)
    return stats


def open_search(
    exp_name: str,
    search_id: str,
    spec: dict,
    n_iter: int,
    seed: int,
    overrides: dict,
    metric: str,
    trials: list[dict],
    shard: int,
    n_shards: int,
    stale: float,
) -> Search:
    """The experiment and the search's parent run, found or created."""
    from millvae.tracking.store import prepare_store

    prepare_store()  # shards started together on a new sqlite store: one creates it
    client = search_records()
    driver_run = os.environ.get("MLFLOW_RUN_ID", "")
    experiment_id = _search_experiment(client, exp_name, driver_run)
    description = {
        "n_iter": str(n_iter),
        "seed": str(seed),
        "search_space": json.dumps(spec, sort_keys=True),
        "overrides": json.dumps(overrides, sort_keys=True),
        "metric": metric,
        "search_id": search_id,
    }
    parent = open_parent(client, experiment_id, search_id, description)
    # trials must never continue the driver's run (mlflow.start_run reads MLFLOW_RUN_ID)
    os.environ.pop("MLFLOW_RUN_ID", None)
    if driver_run and driver_run != parent:  # the search's parent is older than this run
        client.tag(
            driver_run, {"millvae.search_parent_run": parent, SEARCH_ID_TAG + "_driver": search_id}
        )
    search = Search(
        search_id,
        experiment_id,
        parent,
        trials,
        overrides,
        metric,
        shard,
        n_shards,
        stale,
        driver_run_id=driver_run,
        driver=f"{socket.gethostname()}|{os.getpid()}",
    )
    return search


def _search_experiment(client: SearchRecords, exp_name: str, driver_run: str) -> str:
    """The experiment of the search: that of the run `mlflow run -e search` made (the parent
    and its children belong together), else `exp_name`, created if need be."""
    experiment_id, name = client.search_experiment(exp_name, driver_run)
    if name != exp_name:
        print(
            f"millvae: note: `mlflow run` created this run in experiment {name!r}; the search "
            f"goes there (pass --experiment-name {exp_name} to `mlflow run` to file it there)",
            file=sys.stderr,
        )
    return experiment_id
