"""The `search` entry point: a random search whose trials are `ParameterSampler` draws.

One parent run per search and one child run per trial, trained by the same `train_run` as
`main`. Trial i is always the i-th draw of `ParameterSampler(space, n_iter, random_state=seed)`,
so running the same search again skips FINISHED trials and redoes the rest; shard k of n runs
the trials i ≡ k (mod n) against a shared tracking server. Workers are processes that import
TensorFlow once, keep prepared data in memory and split the machine's cores between them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NoReturn

from millvae.config import PARAM_HELP, PARAM_NAMES, PREP_PARAMS, TrainConfig
from millvae.errors import ArgParser, MillvaeError

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
# After its driver died, a worker has this long to end its trial run KILLED before it just exits.
ORPHAN_GRACE_S = 20.0
# A worker whose resident memory grew by this much since its first trial hands over to a new one.
RECYCLE_MIB = 1024
# The seed's random search (plus the final activation, which the paper also searched).
DEFAULT_SPACE = {
    "beta": {"uniform": [0.5, 9.0]},
    "codings_size": {"randint": [5, 40]},
    "conv_layers": [1, 2, 3],
    "start_filter_no": {"randint": [16, 128]},
    "dilations": ["1,2,4,8", "1,2,4", "1,2"],
    "kernel_size": {"randint": [2, 9]},
    "earlystop_patience": {"randint": [30, 50]},
    "final_activation": ["sigmoid", "selu"],
}
_DISTRIBUTIONS = ("uniform", "loguniform", "randint")
# parameters TrainConfig holds as integers: a continuous distribution over one always fails
_INT_PARAMS = {name: type(value) is int for name, value in asdict(TrainConfig()).items()}


def space_from_spec(spec: Mapping) -> dict:
    """Turn a JSON/YAML space ({name: list | {uniform: [loc, scale]} | {loguniform: [low, high]}
    | {randint: [low, high]}}) into what `ParameterSampler` takes."""
    out = {}
    for name, value in spec.items():
        if name not in PARAM_NAMES:
            raise MillvaeError(f"space: unknown parameter {name!r}; expected some of {PARAM_NAMES}")
        if isinstance(value, list):
            if not value:
                raise MillvaeError(f"space: {name}: expected a non-empty list of choices")
            out[name] = value
        elif isinstance(value, Mapping) and len(value) == 1:
            ((kind, args),) = value.items()
            out[name] = _distribution(name, kind, args)
        else:
            raise MillvaeError(
                f"space: {name}: expected a list of choices or {{uniform|loguniform|randint: "
                f"[a, b]}}; got {value!r}"
            )
    return out


def _numbers(name: str, kind: str, args) -> tuple[float, float]:
    """The two numbers of `{kind: [a, b]}` (YAML reads 1e-3 as a string: numeric strings count)."""
    bad = MillvaeError(f"space: {name}: expected {kind}: [a, b] with two numbers; got {args!r}")
    if not isinstance(args, list | tuple) or len(args) != 2:
        raise bad
    if any(isinstance(x, bool) for x in args):  # float(True) is 1.0: a typo, not a bound
        raise bad
    try:
        a, b = float(args[0]), float(args[1])
    except (TypeError, ValueError):
        raise bad from None
    if not (math.isfinite(a) and math.isfinite(b)):
        raise bad
    return a, b


def _distribution(name: str, kind, args):
    """The frozen scipy distribution of `{kind: args}`, its parameters checked here: scipy's own
    complaint about a negative scale is a long traceback from deep inside the sampler."""
    from scipy import stats

    if kind not in _DISTRIBUTIONS:
        raise MillvaeError(f"space: {name}: expected uniform, loguniform or randint; got {kind!r}")
    a, b = _numbers(name, kind, args)
    if kind == "uniform":
        if b <= 0:
            raise MillvaeError(
                f"space: {name}: expected uniform: [loc, scale] with scale > 0; got scale {b:g}"
            )
        return stats.uniform(a, b)
    if kind == "loguniform":
        if not 0 < a < b:
            raise MillvaeError(
                f"space: {name}: expected loguniform: [low, high] with 0 < low < high; "
                f"got {a:g} and {b:g}"
            )
        return stats.loguniform(a, b)
    if a != int(a) or b != int(b) or a >= b:
        raise MillvaeError(
            f"space: {name}: expected randint: [low, high] with integers low < high "
            f"(high excluded); got {a:g} and {b:g}"
        )
    return stats.randint(int(a), int(b))


def _candidates(name: str, value) -> list:
    """The values of one space entry to check: every choice, or a distribution's support ends."""
    if isinstance(value, list):
        return value
    ((kind, args),) = value.items()
    a, b = _numbers(name, kind, args)
    if kind == "randint":
        return [int(a), int(b) - 1]
    if _INT_PARAMS.get(name):
        raise MillvaeError(
            f"space: {name}: expected randint or a list (it takes integers); got {kind}, "
            "whose draws are not whole numbers"
        )
    return [_plain(a), _plain(a + b if kind == "uniform" else b)]


def check_space(spec: Mapping, fixed: Mapping) -> None:
    """Check every value the space can give against TrainConfig's rules, before any trial.

    Each choice (for a distribution: its parameters and both ends of its support) is validated
    with `make_config` over the fixed parameters. A rule between two parameters (lr_max >=
    learning_rate, window_size a multiple of 2**conv_layers) fails a value only where no single
    value of the other searched parameters makes it valid: a combination that fails is left to
    the trial, which is recorded FAILED with its reason.
    """
    space_from_spec(spec)  # names and distribution parameters first
    cands = {name: _candidates(name, value) for name, value in spec.items()}
    for name, values in cands.items():
        value = spec[name]
        where = "" if isinstance(value, list) else f", an end of {_describe(value)},"
        for v in values:
            err = _value_error(name, v, fixed, cands)
            if err:
                raise MillvaeError(f"space: {name}: {v!r}{where} is not allowed ({err})")


def _describe(dist: Mapping) -> str:
    ((kind, args),) = dist.items()
    return f"{kind} {list(args)}"


def _value_error(name: str, value, fixed: Mapping, cands: Mapping) -> str | None:
    """Why `name=value` breaks TrainConfig's rules with every other searched value, or None."""
    err = _config_error({**fixed, name: value})
    if err is None:
        return None
    for other, values in cands.items():
        if other != name and any(
            _config_error({**fixed, other: c, name: value}) is None for c in values
        ):
            return None
    return err


def _config_error(params: Mapping) -> str | None:
    from millvae.config import make_config

    try:
        make_config(**params)
    except MillvaeError as exc:
        return str(exc)
    return None


def load_space(path: str) -> dict:
    """The space spec from a YAML or JSON file ('' = the seed's space)."""
    if not path:
        return dict(DEFAULT_SPACE)
    p = Path(path)
    if not p.is_file():
        raise MillvaeError(f"space: expected a YAML or JSON file; got {path!r} (no such file)")
    import yaml

    try:
        spec = yaml.safe_load(p.read_text())  # YAML is a superset of JSON
    except yaml.YAMLError as exc:
        raise MillvaeError(f"space: could not parse {p.name}: {str(exc).splitlines()[0]}") from None
    if not isinstance(spec, Mapping) or not spec:
        raise MillvaeError(f"space: expected a mapping of parameter names in {p.name}")
    return dict(spec)


def sample_trials(spec: Mapping, n_iter: int, seed: int) -> list[dict]:
    """The search's trials, in order: trial i is the i-th ParameterSampler draw."""
    from sklearn.model_selection import ParameterSampler

    trials = []
    for draw in ParameterSampler(space_from_spec(spec), n_iter, random_state=seed):
        trials.append({k: _plain(v) for k, v in sorted(draw.items())})
    return trials


def _plain(v):
    import numpy as np

    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return round(float(v), 6)  # a stable, readable param string
    return v


def default_search_id(spec: Mapping, n_iter: int, seed: int, overrides: Mapping) -> str:
    blob = json.dumps([spec, n_iter, seed, overrides], sort_keys=True, default=str)
    return f"s{seed}-{hashlib.sha1(blob.encode()).hexdigest()[:8]}"


def shard_from_env(shard: int | None, n_shards: int) -> int:
    if shard is not None:
        return shard
    for var in ("JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID"):
        if os.environ.get(var, "").strip():
            try:
                return int(os.environ[var])
            except ValueError:
                raise MillvaeError(f"{var}: expected an integer; got {os.environ[var]!r}") from None
    return 0


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


def shard_indices(n_iter: int, shard: int, n_shards: int) -> list[int]:
    """The trial indices shard `shard` of `n_shards` runs: those ≡ shard (mod n_shards)."""
    return list(range(shard, n_iter, n_shards))


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def _children(client, search: Search) -> list:
    runs = client.search_runs(
        [search.experiment_id],
        filter_string=f"tags.`{SEARCH_ID_TAG}` = '{search.search_id}'",
        max_results=50000,
    )
    return [r for r in runs if TRIAL_TAG in r.data.tags]


def _parents(client, experiment_id: str, search_id: str) -> list:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{SEARCH_ID_TAG}` = '{search_id}' and tags.`{PARENT_TAG}` = 'true'",
        max_results=100,
    )
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def open_parent(client, experiment_id: str, search_id: str, description: dict) -> str:
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


def _create_parent(client, experiment_id: str, search_id: str, description: dict) -> str:
    """The parent run (the run of `mlflow run -e search`, where there is one), tagged at once:
    drivers waiting for it read the description's tags as soon as they find it."""
    from mlflow.entities import Param, RunTag

    tags = {SEARCH_ID_TAG: search_id, "model_type": "search"}
    tags.update({f"millvae.search.{k}": v for k, v in description.items()})
    tags[PARENT_TAG] = "true"
    driver = os.environ.get("MLFLOW_RUN_ID")
    if driver:  # `mlflow run -e search` made a run for us: it becomes the parent
        run_id = driver
        tags["mlflow.runName"] = f"search-{search_id}"
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    else:
        run_id = client.create_run(
            experiment_id, run_name=f"search-{search_id}", tags=tags
        ).info.run_id
    have = client.get_run(run_id).data.params  # `mlflow run` logged its -P values already
    params = [Param(k, v) for k, v in description.items() if k not in have]
    client.log_batch(run_id, params=params)
    return run_id


def _lock_name(experiment_id: str, search_id: str, gen: int) -> str:
    return f"{LOCK_PREFIX}/{experiment_id}/{search_id}/{gen}"


def _take_lock(client, experiment_id: str, search_id: str) -> bool:
    """Whether this driver may create the search's parent run.

    Experiment names are unique in every MLflow store, and a deleted experiment keeps its name:
    of drivers creating the lock experiment of one generation, exactly one succeeds. It is
    deleted at once (out of sight in the UI). A lock whose holder died before the parent run
    existed is taken over with the next generation.
    """
    from mlflow.exceptions import MlflowException

    gen, last = 0, None
    while exp := client.get_experiment_by_name(_lock_name(experiment_id, search_id, gen)):
        gen, last = gen + 1, exp
    if last is not None and _lock_holds(last.tags.get(LOCK_HOLDER_TAG, "")):
        return False
    try:
        lock = client.create_experiment(
            _lock_name(experiment_id, search_id, gen), tags={LOCK_HOLDER_TAG: _holder()}
        )
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return False  # another driver took this generation first
    client.delete_experiment(lock)
    return True


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
    import uuid

    host, pid = socket.gethostname(), os.getpid()
    return f"{host}|{pid}|{_proc_start(pid)}|{time.time():.3f}|{uuid.uuid4().hex[:12]}"


def _proc_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux); '' where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def claim_trial(client, search: Search, index: int) -> str | None:
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
    from mlflow.exceptions import MlflowException

    me = _holder()
    while True:
        gen, last = _last_claim(client.get_run(search.parent_id).data.params, index)
        if last is not None:
            runs = _trial_runs(client, search, index)
            if any(r.info.status == "FINISHED" for r in runs):
                return None
            mine = [r for r in runs if r.data.tags.get(CLAIM_TAG) == _claim_key(index, gen)]
            if _claim_holds(client, search, last, mine):
                return None
            _end_dead_runs(client, mine)
        key = _claim_key(index, gen + 1)
        try:
            client.log_param(search.parent_id, key, me)
        except MlflowException:
            if key not in client.get_run(search.parent_id).data.params:
                raise
            continue  # another process claimed this generation first: look again
        if client.get_run(search.parent_id).data.params.get(key) == me:
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


def _claim_holds(client, search: Search, holder: _Holder, runs: list) -> bool:
    """Whether a claim still holds: its run (if made yet) is RUNNING and its process lives; a
    process on another host is judged by its progress (the `stale_minutes` rule)."""
    if any(r.info.status != "RUNNING" for r in runs):
        return False
    if holder.host == socket.gethostname():
        return holder.alive()
    if runs:
        return not _stale(client, runs[0], search.stale_minutes)
    return time.time() - holder.since < search.stale_minutes * 60


def _end_dead_runs(client, runs: list) -> None:
    for run in runs:
        if run.info.status == "RUNNING":
            client.set_tag(
                run.info.run_id, "millvae.error", "worker died (process gone or no heartbeat)"
            )
            client.set_terminated(run.info.run_id, status="KILLED")


def _trial_runs(client, search: Search, index: int) -> list:
    return client.search_runs(
        [search.experiment_id],
        filter_string=f"tags.`{SEARCH_ID_TAG}` = '{search.search_id}' "
        f"and tags.`{TRIAL_TAG}` = '{index}'",
        max_results=1000,
    )


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


def reap_dead_trials(client, search: Search) -> int:
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


def _stale(client, run, minutes: float) -> bool:
    """Whether a run of another host showed no progress (a logged loss) for `minutes`."""
    last = max(
        [m.timestamp for m in client.get_metric_history(run.info.run_id, "loss")]
        or [run.info.start_time]
    )
    return time.time() * 1000 - last > minutes * 60_000


def pending_trials(client, search: Search) -> list[int]:
    finished = set()
    for run in _children(client, search):
        if run.info.status == "FINISHED":
            finished.add(int(run.data.tags.get(TRIAL_TAG, -1)))
    return [i for i in search.my_indices() if i not in finished]


def end_parent(client, search: Search, status: str) -> None:
    """End the parent run `status` (a driver stopped or killed) unless trials of another
    driver still run in it (a shard, a second start); `mlflow run` ends a parent it made."""
    if search.parent_id == search.driver_run_id:
        return
    try:
        if client.get_run(search.parent_id).info.status != "RUNNING":
            return
        others = [
            r
            for r in _children(client, search)
            if r.info.status == "RUNNING" and r.data.tags.get(DRIVER_TAG) != search.driver
        ]
        if not others:
            client.set_terminated(search.parent_id, status=status)
    except Exception as exc:  # the store may be what failed; the next start sets it right
        print(f"search: could not mark the parent run {status}: {exc}", file=sys.stderr)


def _reopen_parent(client, search: Search) -> None:
    """A parent ended KILLED or FAILED runs again while a resumed search runs in it."""
    if search.parent_id != search.driver_run_id:
        if client.get_run(search.parent_id).info.status != "RUNNING":
            client.update_run(search.parent_id, status="RUNNING")


def run_trial(search: Search, index: int, cache: dict, verbose: int = 0) -> dict:
    """Train trial `index` as one child run; a failure is recorded, never raised."""
    import mlflow

    from millvae.config import make_config
    from millvae.data.prepare import prepare
    from millvae.train import train_run

    client = _client()
    try:
        claim = claim_trial(client, search, index)
    except Exception as exc:  # the store refused or failed: this trial, not the worker, fails
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return {"index": index, "status": "FAILED", "error": f"could not claim it: {first}"}
    if claim is None:  # finished, or running, under another driver (a second start, a shard)
        return {"index": index, "status": "ELSEWHERE"}
    params = {**search.trials[index], **search.overrides}
    tags = {
        "mlflow.parentRunId": search.parent_id,
        SEARCH_ID_TAG: search.search_id,
        TRIAL_TAG: str(index),
        PID_TAG: str(os.getpid()),
        HOST_TAG: socket.gethostname(),
        DRIVER_TAG: search.driver,
        CLAIM_TAG: claim,
    }
    t0 = time.perf_counter()
    try:
        cfg = make_config(**params)
    except MillvaeError as exc:  # an invalid combination: rejected before any training
        run = client.create_run(search.experiment_id, tags=tags, run_name=f"trial-{index:04d}")
        for k, v in params.items():
            client.log_param(run.info.run_id, k, str(v))
        client.set_tag(run.info.run_id, "millvae.error", f"invalid parameters: {exc}")
        client.set_terminated(run.info.run_id, status="FAILED")
        return {"index": index, "status": "FAILED", "error": str(exc), "run_id": run.info.run_id}
    try:
        key = tuple(getattr(cfg, p) for p in PREP_PARAMS)  # trials sharing these share data
        if key not in cache:
            cache.clear()  # one preparation held at a time keeps a worker's memory flat
            cache[key] = prepare(cfg)
        res = train_run(
            cfg,
            prepared=cache[key],
            tags=tags,
            run_name=f"trial-{index:04d}_{cfg.run_name()}",
            experiment_id=search.experiment_id,
            verbose=verbose,
        )
        m = mlflow.get_run(res.run_id).data.metrics
        # memory of the worker after each of its trials: growth across trials would show here
        client.log_metric(res.run_id, "worker_rss_mib", _rss_mib())
        return {
            "index": index,
            "status": "FINISHED",
            "run_id": res.run_id,
            "metric": m.get(search.metric),
            "seconds": time.perf_counter() - t0,
            "fit_seconds": res.training_seconds,
        }
    except Exception as exc:  # train_run already ended the run FAILED with the reason
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return {"index": index, "status": "FAILED", "error": first}
    finally:
        try:
            import keras

            keras.backend.clear_session()  # no graph growth across a worker's trials
        except Exception:
            pass


def trial_cost(params: Mapping) -> float:
    """Relative compute of a trial, for dispatching the longest first (0 where it is invalid).

    Per window and epoch, each TCN layer's residual blocks (one per dilation) run over the layer's
    sequence length L with `filters` channels: convolutions ~ L·filters²·kernel, and the
    elementwise passes, BatchNorm and pooling ~ L·filters. Fitted to the fit times of 8 trials
    of the benchmark space on one thread (real data, 5 epochs): the per-channel term weighs like
    256 convolution taps; the model explained each fit within 0.8 s.
    """
    from millvae.config import make_config

    try:
        cfg = make_config(**params)
    except MillvaeError:
        return 0.0
    # encoder and decoder: one TCN on each of the lengths window, window/2, ... per conv layer
    lengths = 2 * sum(cfg.window_size / 2**i for i in range(cfg.conv_layers))
    f = cfg.start_filter_no
    return cfg.epochs * len(cfg.dilations) * lengths * f * (cfg.kernel_size * f + 256)


def recycle_mib() -> float:
    """Memory growth (MiB) after which a worker is replaced: MILLVAE_RECYCLE_MIB, 0 = never."""
    raw = os.environ.get("MILLVAE_RECYCLE_MIB", "")
    try:
        return float(raw) if raw.strip() else float(RECYCLE_MIB)
    except ValueError:
        raise MillvaeError(
            f"MILLVAE_RECYCLE_MIB: expected a number of MiB (0 = never); got {raw!r}"
        ) from None


def _rss_mib() -> float:
    """Resident memory of this process now (Linux /proc; peak RSS elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _configure_threads(threads: int) -> None:
    from millvae.runtime import thread_pools

    intra, inter = thread_pools(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    # the worker's share of the cores, whatever the driver's environment says: no oversubscription
    os.environ["TF_NUM_INTRAOP_THREADS"] = str(intra)
    os.environ["TF_NUM_INTEROP_THREADS"] = str(inter)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


_IN_TRIAL = False  # whether this worker is inside a trial (see `_on_sigterm`)
_DRIVER_PID = 0  # the search driver this worker serves (see `_watch_driver`)
_ORPHANED = False  # the driver died: end the trial in progress KILLED, take no other
_SEARCH: Search | None = None  # the search this worker runs trials of


def _on_sigterm(signum, frame) -> None:
    """SIGTERM (the driver stopping its workers, a scheduler): a trial in progress unwinds like
    Ctrl-C, so its run ends KILLED rather than RUNNING; otherwise the worker just leaves."""
    if _IN_TRIAL:
        raise KeyboardInterrupt(f"signal {signum}")
    os._exit(128 + signum)


def _on_driver_death(signum, frame) -> None:
    """The parent-death signal, or the watch thread's (see `_watch_driver`): once the driver is
    gone, a trial in progress unwinds like Ctrl-C (its run ends KILLED) and the worker leaves
    (`_serve`). A forked worker's parent is the first worker: one that retired while the driver
    lives is no reason to stop."""
    global _ORPHANED
    if _ORPHANED or _alive(_DRIVER_PID):
        return
    _ORPHANED = True
    if _IN_TRIAL:
        raise KeyboardInterrupt("the search driver died")


def _watch_driver(driver_pid: int, parent_pid: int) -> None:
    """End this worker with its driver: Linux sends SIGUSR1 when the parent dies (prctl's
    PR_SET_PDEATHSIG); `_poll_driver` covers other systems and forked workers, whose parent is
    the first worker."""
    global _DRIVER_PID
    _DRIVER_PID = driver_pid
    signal.signal(signal.SIGUSR1, _on_driver_death)
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGUSR1), 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl: no signal will come
            os.kill(os.getpid(), signal.SIGUSR1)


def _start_driver_poll(driver_pid: int) -> None:
    import threading

    threading.Thread(
        target=_poll_driver, args=(driver_pid,), daemon=True, name="millvae-driver-watch"
    ).start()


def _poll_driver(driver_pid: int) -> None:
    while _alive(driver_pid):
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGUSR1)
    # the main thread normally ends the trial's run and leaves at once; one stuck in a native
    # call (a store that does not answer) must not hold its memory for ever
    time.sleep(ORPHAN_GRACE_S)
    os._exit(137)


def _worker_main(setup, tasks, results, finished, forks: int = 0, driver_pid: int = 0) -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)  # inherited by the workers forked from this one
    _watch_driver(driver_pid, driver_pid)
    os.environ.pop("MLFLOW_RUN_ID", None)  # the driver's run is not ours to continue
    os.environ["MLFLOW_LOGGING_LEVEL"] = "WARNING"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import warnings

    warnings.simplefilter("ignore")
    import logging

    from millvae.train import preload

    # Imports first (about 4 s; TensorFlow without its CUDA/oneDNN start-up lines), while the
    # driver opens the store and the parent run; TensorFlow's thread pools are sized only when
    # the first op runs, after the driver says how many workers.
    preload()
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # retracing notes from scoring, once per trial
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    forks = 0 if _ORPHANED else forks  # the driver died during the imports
    children = _fork_workers(forks, setup, tasks, results, finished) if forks else []
    _start_driver_poll(driver_pid)  # after the fork: a thread does not survive one
    _serve(setup, tasks, results, finished, children)


def _forked_main(setup, tasks, results, finished, driver_pid: int, parent_pid: int) -> NoReturn:
    _watch_driver(driver_pid, parent_pid)  # a fork clears the parent-death signal
    _start_driver_poll(driver_pid)
    _serve(setup, tasks, results, finished)


def _fork_workers(n: int, setup, tasks, results, finished) -> list:
    """n more workers, forked from this one once its imports are done.

    Each worker used to import TensorFlow and the training code itself, side by side with the
    others and with the driver's own setup, on the same cores: 6.4-7.0 s from the command's start
    to the first trial (2 workers, 2 cores). Forked, the imports are done once. No TensorFlow
    runtime exists yet at this point (thread pools, devices and the native kernels come with the
    first op, in each worker), and a forked worker trains to the same losses as a fresh process.
    """
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    args = (setup, tasks, results, finished, _DRIVER_PID, os.getpid())
    kids = [ctx.Process(target=_forked_main, args=args) for _ in range(n)]
    for p in kids:
        p.start()
    # before any trial: the driver watches these pids to know when every worker is gone
    results.put({"status": "STARTED", "pids": [p.pid for p in kids]})
    return kids


def _serve(setup, tasks, results, finished, children: Sequence = ()) -> NoReturn:
    """Run trials (`_work`), then leave; `children`: workers forked from this one, waited for."""
    try:
        retired = _work(setup, tasks, results, finished)
    except KeyboardInterrupt:  # stopped mid-trial: its run already ended KILLED
        _leave(results, [], interrupted=True)
    if _ORPHANED:  # nobody reads the results now, and forked workers watch the driver too
        _leave(results, [], interrupted=True)
    # A retired worker leaves at once (its memory is why); its forked workers finish alone.
    _leave(results, [] if retired else children)


def _work(setup, tasks, results, finished) -> bool:
    """Run trials until the driver says stop; True where this worker retired (memory growth).

    An empty queue is not the end: a trial whose worker died goes back on it (see `run_search`).
    The driver puts one None per worker, or sets `finished`, once nothing more will come.
    """
    import queue

    global _IN_TRIAL, _SEARCH

    while True:
        # polled, not a blocking get: a worker stopped while it waited here can leave the queue's
        # lock held, and the others must still see that the driver is done
        try:
            job = setup.get(timeout=1.0)
            break
        except queue.Empty:
            if finished.is_set() or _ORPHANED:
                return False
    if job is None:  # the driver found less to do than workers started
        return False
    search, threads = job
    _SEARCH = search
    _configure_threads(threads)
    from millvae.runtime import configure_threads

    configure_threads(threads)
    cache: dict = {}
    limit = recycle_mib()
    baseline = None
    while True:
        try:
            index = tasks.get(timeout=1.0)
        except queue.Empty:
            if finished.is_set() or _ORPHANED:
                break
            continue
        if index is None or _ORPHANED:
            break
        results.put({"index": index, "status": "RUNNING", "pid": os.getpid()})
        _IN_TRIAL = True
        try:
            if _ORPHANED:  # the driver died just now, before this trial began
                raise KeyboardInterrupt("the search driver died")
            result = run_trial(search, index, cache)
        finally:
            _IN_TRIAL = False
        results.put({**result, "pid": os.getpid()})
        rss = _rss_mib()
        if baseline is None:
            baseline = rss  # after the first trial: TensorFlow, the data and one model in place
        elif limit and rss - baseline > limit:
            # A guard: trials no longer grow a worker (Keras' Adam left ~80 MiB of graph state
            # per fit; FusedAdam does not), but anything that does is capped by a fresh worker.
            results.put({"status": "RETIRED", "pid": os.getpid(), "rss_mib": rss})
            return True
    return False


def _leave(results, children: Sequence, interrupted: bool = False) -> NoReturn:
    # Every run this worker started has ended and its results are queued: flush them, then leave
    # without TensorFlow's interpreter teardown (about 2 s that the search's end waited for).
    # Stopped, it does not wait on a driver that may no longer read the queue.
    if _ORPHANED and _SEARCH is not None:
        end_parent(_client(), _SEARCH, "KILLED")  # no driver is left to do it
    if interrupted:
        results.cancel_join_thread()
    results.close()
    if not interrupted:
        results.join_thread()
    for p in children:  # workers forked from this one are waited for by it
        p.join()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130 if interrupted else 0)


class Progress:
    """A live line: done / failed / running, best validation metric so far, ETA."""

    def __init__(
        self, total: int, metric: str, stream=sys.stderr, costs: Mapping[int, float] | None = None
    ):
        self.total, self.metric, self.stream = total, metric, stream
        self.done = self.failed = self.running = 0
        self.elsewhere = 0  # trials another driver finished or runs (see `claim_trial`)
        self.first_error = ""  # "trial i: reason" of the first failure, for the summary line
        self.best: tuple[float, int] | None = None
        self.t0 = time.perf_counter()
        self.tty = stream.isatty()
        # relative cost of each pending trial (`trial_cost`): trials run longest first, so the
        # ETA is elapsed time scaled by the cost still to run, not by the count of trials
        self.costs = dict(costs or {})
        self.cost_ended = 0.0

    def update(self, result: dict) -> None:
        status = result["status"]
        if status == "RUNNING":
            self.running += 1
        elif status == "RETRY":  # its worker died; the trial is queued again
            self.running = max(0, self.running - 1)
        else:
            self.cost_ended += self.costs.get(result.get("index", -1), 0.0)
            self.running = max(0, self.running - 1)
            if status == "FINISHED":
                self.done += 1
                v = result.get("metric")
                if v is not None and (self.best is None or v > self.best[0]):
                    self.best = (v, result["index"])
            elif status == "ELSEWHERE":
                self.elsewhere += 1
            else:
                self.failed += 1
                if not self.first_error:
                    self.first_error = f"trial {result['index']}: {result.get('error', '')}"
        self.show(final=False, last=result)

    def show(self, final: bool, last: dict | None = None) -> None:
        ended = self.done + self.failed + self.elsewhere
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / ended * (self.total - ended) if ended else float("nan")
        cost_all = sum(self.costs.values())
        if ended and len(self.costs) == self.total and 0 < self.cost_ended <= cost_all:
            eta = elapsed / self.cost_ended * (cost_all - self.cost_ended)
        best = f"{self.best[0]:.4f} (trial {self.best[1]})" if self.best else "-"
        line = (
            f"search: {ended}/{self.total} ended ({self.done} finished, {self.failed} failed"
            + (f", {self.elsewhere} left to another driver" if self.elsewhere else "")
            + "), "
            f"{self.running} running | best {self.metric} {best} | "
            f"elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min"
        )
        if last and last.get("status") == "FAILED":
            line += f" | trial {last['index']} failed: {last.get('error', '')[:80]}"
        if last and last.get("status") == "RETRY":
            line += f" | trial {last['index']}: worker {last['pid']} died, trial queued again"
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if final else ""))
        elif not final and last is not None and last.get("status") != "RUNNING":
            self.stream.write(line + "\n")  # logs get one line per ended trial
        self.stream.flush()


_DIED = "its worker process (pid {pid}) died twice running it (killed, or out of memory?)"


def _fork_workers_here() -> bool:
    """Fork workers from the first one (Linux; MILLVAE_FORK_WORKERS=0 starts each afresh)."""
    return sys.platform.startswith("linux") and os.environ.get("MILLVAE_FORK_WORKERS", "1") != "0"


class WorkerPool:
    """Worker processes, started before the driver's own setup so their imports overlap it.

    The first worker imports TensorFlow and the training code and (on Linux) forks the others;
    each then waits for `(search, threads)` on the setup queue; `use` hands that to as many
    workers as there is work for and lets the rest go.
    """

    def __init__(self, size: int) -> None:
        import multiprocessing as mp

        # Started fresh, never forked from the driver: a driver that has run TensorFlow (a
        # notebook, a test session) has thread pools a fork would copy mid-use.
        self.ctx = mp.get_context("spawn")
        self.size = size
        self.setup, self.tasks, self.results = self.ctx.Queue(), self.ctx.Queue(), self.ctx.Queue()
        self.finished = self.ctx.Event()  # no more trials will be queued
        # On Linux the first worker forks the others after its imports (`_fork_workers`).
        forks = size - 1 if _fork_workers_here() else 0
        self.procs = [self._start(forks)] + [self._start() for _ in range(size - 1 - forks)]
        self.forked: set[int] = set()  # pids of forked workers, from their STARTED message
        self.job: tuple | None = None
        self._closed = False

    def _start(self, forks: int = 0):
        p = self.ctx.Process(
            target=_worker_main,
            args=(self.setup, self.tasks, self.results, self.finished, forks, os.getpid()),
        )
        p.start()
        return p

    def alive(self) -> bool:
        """Whether any worker is still running."""
        return any(p.is_alive() for p in self.procs) or any(map(_alive, self.forked))

    def use(self, search: Search, n: int) -> int:
        """Put n workers to work on `search` (the CPU divided between them); returns n."""
        from millvae.runtime import usable_cores

        n = max(0, min(n, self.size))
        self.job = (search, max(1, usable_cores() // max(n, 1)))
        for k in range(self.size):
            self.setup.put(self.job if k < n else None)
        return n

    def replace_one(self) -> None:
        """A fresh worker for one that retired (see MILLVAE_RECYCLE_MIB) or died."""
        self.procs.append(self._start())
        self.setup.put(self.job)

    def close(self, grace: float = 30.0) -> None:
        """Let the workers finish what they run for up to `grace` seconds, then stop them with
        SIGTERM (a trial in progress ends KILLED) and, 10 s later, SIGKILL."""
        if self._closed:
            return
        self._closed = True
        self.finished.set()
        for _ in range(len(self.procs) + len(self.forked)):
            self.tasks.put(None)  # workers waiting on the queue leave now, not at their next poll
        if self.job is None:  # never used (the driver failed or found nothing to do)
            for _ in range(self.size):
                self.setup.put(None)  # forked workers wait for their job: none is coming
            grace = 0.0  # still importing or waiting for work: nothing of theirs to save
        self._wait(time.monotonic() + grace)
        self._signal(signal.SIGTERM)
        self._wait(time.monotonic() + 10)
        self._signal(signal.SIGKILL)

    def _wait(self, deadline: float) -> None:
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        while any(map(_alive, self.forked)) and time.monotonic() < deadline:
            time.sleep(0.1)

    def _signal(self, sig: int) -> None:
        pids = [p.pid for p in self.procs if p.is_alive()] + list(filter(_alive, self.forked))
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def run_search(
    search: Search, workers: int, verbose: int = 0, pool: WorkerPool | None = None
) -> Progress:
    """Run this shard's pending trials with `workers` processes (0 = in this process); `pool`:
    workers started earlier (see `WorkerPool`)."""
    client = _client()
    reaped = reap_dead_trials(client, search)
    todo = pending_trials(client, search)
    if reaped:
        print(f"search: {reaped} trial(s) left RUNNING by a dead worker marked KILLED; retrying")
    print(
        f"search {search.search_id}: {len(search.my_indices())} trials in shard "
        f"{search.shard}/{search.n_shards}, {len(todo)} to run, parent run {search.parent_id}",
        flush=True,
    )
    costs = {i: trial_cost({**search.trials[i], **search.overrides}) for i in todo}
    progress = Progress(len(todo), search.metric, costs=costs)
    if pool is not None and (not todo or workers <= 0):
        pool.close()
    if not todo:
        return progress
    _reopen_parent(client, search)
    if workers <= 0:
        cache: dict = {}
        for i in todo:
            progress.update({"index": i, "status": "RUNNING"})
            progress.update(run_trial(search, i, cache, verbose=verbose))
        progress.show(final=True)
        return progress
    if pool is None:
        pool = WorkerPool(min(workers, len(todo)))
    tasks, results = pool.tasks, pool.results
    # Longest first: in index order a large trial drawn late ran alone at the end while the other
    # workers had nothing left (8 benchmark trials, 2 workers: a worker idle 4.6 s at the end).
    # Which trials exist and what each does does not depend on the order.
    for i in sorted(todo, key=lambda i: (-costs[i], i)):
        tasks.put(i)
    pool.use(search, min(pool.size, len(todo)))
    ended = 0
    busy: dict[int, int] = {}  # worker pid -> the trial it runs
    retried: set[int] = set()
    try:
        while ended < len(todo):
            try:
                r = results.get(timeout=2)
            except Exception:
                r = None
            if r is None or r["status"] == "RUNNING":
                # A worker killed mid-trial (SIGKILL, the kernel's OOM killer) never reports back:
                # its run becomes KILLED and the trial goes back on the queue, once.
                for pid in [p for p in busy if not _alive(p)]:
                    index = busy.pop(pid)
                    outcome = _worker_died(client, search, pid, index, retried)
                    progress.update(outcome)
                    if outcome["status"] != "RETRY":
                        ended += 1
                        continue
                    tasks.put(index)
                    if not pool.alive():
                        pool.replace_one()
                if r is None:
                    if not pool.alive() and not busy:
                        break  # every worker died; what is left RUNNING is reaped on the next start
                    continue
            if r["status"] == "STARTED":
                pool.forked.update(r["pids"])
                continue
            if r["status"] == "RETIRED":
                if ended + len(busy) < len(todo):
                    pool.replace_one()
                continue
            if r["status"] == "RUNNING":
                busy[r["pid"]] = r["index"]
            else:
                busy.pop(r.get("pid", -1), None)
                ended += 1
            progress.update(r)
    except BaseException:
        pool.close(grace=0)  # interrupted: the trials in progress end KILLED now
        raise
    pool.close()
    progress.show(final=True)
    return progress


def _worker_died(client, search: Search, pid: int, index: int, retried: set[int]) -> dict:
    """What becomes of trial `index` whose worker `pid` died: RETRY (once), else FAILED; FINISHED
    where its run had ended before the worker died (its result was lost, not its run)."""
    reap_dead_trials(client, search)  # its run, if it made one, is KILLED now
    runs = [r for r in _children(client, search) if r.data.tags.get(TRIAL_TAG) == str(index)]
    done = [r for r in runs if r.info.status == "FINISHED"]
    if done:
        return {"index": index, "status": "FINISHED", "run_id": done[0].info.run_id}
    if index in retried:
        return {"index": index, "status": "FAILED", "error": _DIED.format(pid=pid)}
    retried.add(index)
    return {"index": index, "status": "RETRY", "pid": pid}


def summarize(search: Search, top: int = 10) -> dict:
    """Log the summary on the parent; end it FINISHED once every trial has ended."""
    import tempfile

    import pandas as pd

    client = _client()
    rows = []
    for run in _children(client, search):
        m, p = run.data.metrics, run.data.params
        rows.append(
            {
                "trial_index": int(run.data.tags.get(TRIAL_TAG, -1)),
                "status": run.info.status,
                "run_id": run.info.run_id,
                search.metric: m.get(search.metric),
                "test_ap_kl": m.get("test_ap_kl"),
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
        client.log_metric(pid, k, v)
    if n_finished:
        ranked = finished.dropna(subset=[search.metric]).sort_values(
            search.metric, ascending="loss" in search.metric
        )
        if len(ranked):
            best = ranked.iloc[0]
            client.set_tag(pid, "best_run_id", best["run_id"])
            client.set_tag(pid, "best_trial_index", str(best["trial_index"]))
            client.log_metric(pid, f"best_{search.metric}", float(best[search.metric]))
            stats["best_run_id"] = best["run_id"]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "summary.csv"
            ranked.head(top).to_csv(path, index=False)
            client.log_artifact(pid, str(path))
            table.sort_values("trial_index").to_csv(Path(tmp) / "all_trials.csv", index=False)
            client.log_artifact(pid, str(Path(tmp) / "all_trials.csv"))
        print(
            ranked.head(top)[["trial_index", search.metric, "test_ap_kl", "run_id"]].to_string(
                index=False
            )
        )
    if n_finished + len(failed_only) >= total and search.driver_run_id != pid:
        client.set_terminated(pid, status="FINISHED" if n_finished else "FAILED")
    stats["finished_indices"] = sorted(int(i) for i in ended_idx)
    return stats


def main(argv: list[str] | None = None) -> int:
    p = ArgParser(prog="millvae search", description="Random search of β-VAEs, one run per trial.")
    p.add_argument("--n_iter", default="50", help="number of trials")
    p.add_argument("--seed", dest="search_seed", default="135", help="ParameterSampler seed")
    p.add_argument("--workers", default="1", help="worker processes (0 = in this process)")
    p.add_argument("--space", default="", help="YAML/JSON search space ('' = the seed's)")
    p.add_argument("--experiment", default="millvae", help="MLflow experiment")
    p.add_argument("--search_id", default="", help="names the search ('' = from its definition)")
    p.add_argument(
        "--shard",
        default="",
        help="this shard (default: JOB_COMPLETION_INDEX, SLURM_ARRAY_TASK_ID or 0)",
    )
    p.add_argument("--n_shards", default="1", help="number of shards")
    p.add_argument("--metric", default="val_ap_kl", help="validation metric that ranks trials")
    p.add_argument(
        "--stale_minutes",
        default="30",
        help="a trial of another host with no progress for this long is dead",
    )
    p.add_argument("--train_seed", default=None, help="fixed training `seed` of every trial")
    for name in PARAM_NAMES:
        if name not in ("experiment", "seed"):
            p.add_argument(
                f"--{name}", default=None, help=f"fixed for every trial: {PARAM_HELP[name]}"
            )
    args = vars(p.parse_args(argv))

    def as_int(name: str, low: int) -> int:
        try:
            v = int(float(args[name]))
        except (TypeError, ValueError):
            raise MillvaeError(f"{name}: expected an integer; got {args[name]!r}") from None
        if v < low:
            raise MillvaeError(f"{name}: expected >= {low}; got {v}")
        return v

    n_iter, seed = as_int("n_iter", 1), as_int("search_seed", 0)
    workers, n_shards = as_int("workers", 0), as_int("n_shards", 1)
    shard = shard_from_env(
        as_int("shard", 0) if args["shard"] not in ("", None) else None, n_shards
    )
    if not 0 <= shard < n_shards:
        raise MillvaeError(f"shard: expected 0 <= shard < n_shards = {n_shards}; got {shard}")
    try:
        stale = float(args["stale_minutes"])
    except ValueError:
        raise MillvaeError(
            f"stale_minutes: expected a number; got {args['stale_minutes']!r}"
        ) from None
    metric = str(args["metric"]).strip()
    if not metric.startswith("val_") and metric not in ("best_val_loss",):
        raise MillvaeError(f"metric: selection uses validation metrics only; got {metric!r}")
    mine = len(shard_indices(n_iter, shard, n_shards))
    # Started before anything else the driver does (sampling the trials imports scikit-learn and
    # SciPy, about 1 s; then the store): a worker's imports take about 4 s, and it starts its first
    # trial when they are done. Bad input found below ends them unused.
    pool = WorkerPool(min(workers, mine)) if workers > 0 and mine else None
    try:
        overrides = {
            k: args[k]
            for k in PARAM_NAMES
            if k not in ("experiment", "seed") and args.get(k) is not None
        }
        if args["train_seed"] is not None:
            overrides["seed"] = args["train_seed"]
        overrides["experiment"] = args["experiment"]
        spec = load_space(args["space"])
        clash = sorted(set(spec) & set(overrides))
        if clash:
            raise MillvaeError(f"parameters both searched and fixed: {', '.join(clash)}")
        from millvae.config import make_config

        # overrides are validated once, up front, with defaults standing in for the sampled values
        make_config(**overrides)
        check_space(spec, overrides)  # every value a trial can draw, before any trial
        trials = sample_trials(spec, n_iter, seed)
        search_id = args["search_id"] or default_search_id(spec, n_iter, seed, overrides)
        recycle_mib()  # a malformed MILLVAE_RECYCLE_MIB fails here, not in every worker
        search = _open_search(
            args["experiment"], search_id, spec, n_iter, seed, overrides, metric, trials,
            shard, n_shards, stale,
        )  # fmt: skip
        try:
            progress = run_search(search, workers, pool=pool)
        except BaseException as exc:  # the workers' trials in progress have ended by now
            end_parent(_client(), search, "KILLED" if _stopped(exc) else "FAILED")
            raise
    finally:
        if pool is not None:
            pool.close()
    stats = summarize(search)
    print(
        f"search {search.search_id}: {stats['n_finished']}/{stats['n_trials']} trials finished, "
        f"{stats['n_failed']} failed; parent run {search.parent_id}"
    )
    _check_finished(search, stats, progress)
    return 0


def _stopped(exc: BaseException) -> bool:
    return isinstance(exc, KeyboardInterrupt | SystemExit)


def _check_finished(search: Search, stats: dict, progress: Progress) -> None:
    """A shard none of whose trials finished failed (unless another driver has them)."""
    mine = search.my_indices()
    if not mine or set(mine) & set(stats["finished_indices"]) or progress.elsewhere:
        return
    reason = f"; {progress.first_error}"[:300] if progress.first_error else ""
    raise MillvaeError(
        f"search {search.search_id}: expected at least one trial to finish; none of "
        f"{len(mine)} did{reason}"
    )


def _open_search(
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
    from millvae.store import prepare_store

    prepare_store()  # shards started together on a new sqlite store: one creates it
    client = _client()
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
        client.set_tag(driver_run, "millvae.search_parent_run", parent)
        client.set_tag(driver_run, SEARCH_ID_TAG + "_driver", search_id)
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


def _search_experiment(client, exp_name: str, driver_run: str) -> str:
    """The experiment of the search: that of the run `mlflow run -e search` made (the parent
    and its children belong together), else `exp_name`, created if need be."""
    import mlflow

    if not driver_run:
        return mlflow.set_experiment(exp_name).experiment_id
    experiment_id = client.get_run(driver_run).info.experiment_id
    name = client.get_experiment(experiment_id).name
    if name != exp_name:
        print(
            f"millvae: note: `mlflow run` created this run in experiment {name!r}; the search "
            f"goes there (pass --experiment-name {exp_name} to `mlflow run` to file it there)",
            file=sys.stderr,
        )
    return experiment_id
