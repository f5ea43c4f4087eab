"""The search driver: `main(argv)` parses the command line into a `SearchSpec`, checks the space,
opens the search in the store and runs this shard's pending trials (`run_search`)."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

from millvae.config import PARAM_HELP, PARAM_NAMES, make_config
from millvae.errors import ArgParser, MillvaeError
from millvae.search.space import (
    check_space,
    default_search_id,
    load_space,
    sample_trials,
    shard_from_env,
    shard_indices,
)
from millvae.search.store import (
    TRIAL_TAG,
    Search,
    _alive,
    _children,
    _reopen_parent,
    end_parent,
    open_search,
    pending_trials,
    reap_dead_trials,
    search_records,
    summarize,
)
from millvae.search.trial import cross_validated, run_trial, trial_cost, trial_objective
from millvae.search.workers import WorkerPool, recycle_mib


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


def run_search(
    search: Search, workers: int, verbose: int = 0, pool: WorkerPool | None = None
) -> Progress:
    """Run this shard's pending trials with `workers` processes (0 = in this process); `pool`:
    workers started earlier (see `WorkerPool`)."""
    client = search_records()
    todo = _pending(client, search)
    costs = {i: trial_cost({**search.trials[i], **search.overrides}) for i in todo}
    progress = Progress(len(todo), search.metric, costs=costs)
    if pool is not None and (not todo or workers <= 0):
        pool.close()
    if not todo:
        return progress
    _reopen_parent(client, search)
    if workers <= 0:
        _run_here(search, todo, progress, verbose)
        return progress
    if pool is None:
        pool = WorkerPool(min(workers, len(todo)))
    _dispatch(search, pool, todo, costs)
    try:
        _collect(client, search, pool, len(todo), progress)
    except BaseException:
        _close_pool(client, search, pool, grace=0)  # interrupted: trials in progress end KILLED
        raise
    _close_pool(client, search, pool)
    progress.show(final=True)
    return progress


def _close_pool(client, search: Search, pool: WorkerPool, grace: float = 30.0) -> None:
    """Stop the workers (`WorkerPool.close`), then end KILLED any trial run they left RUNNING.

    A worker stopped by SIGTERM ends its run KILLED itself, unless the signal's KeyboardInterrupt
    came inside one of its own sqlite writes (an epoch's metrics): that transaction's lock stays
    held while the exception unwinds, so its `end_run` waits on itself (busy_timeout 20 s) and the
    other worker's waits on it, until SIGKILL 10 s later leaves both runs RUNNING. Once the
    workers are gone, their locks are too: the driver ends those runs."""
    pool.close(grace=grace)
    try:
        reap_dead_trials(client, search)
    except Exception as exc:  # the store may be what failed; the next start reaps them
        print(f"search: could not mark dead workers' trials KILLED: {exc}", file=sys.stderr)


def _pending(client, search: Search) -> list[int]:
    """This shard's trials still to run (dead workers' trials reaped first), announced."""
    reaped = reap_dead_trials(client, search)
    todo = pending_trials(client, search)
    if reaped:
        print(f"search: {reaped} trial(s) left RUNNING by a dead worker marked KILLED; retrying")
    print(
        f"search {search.search_id}: {len(search.my_indices())} trials in shard "
        f"{search.shard}/{search.n_shards}, {len(todo)} to run, parent run {search.parent_id}",
        flush=True,
    )
    return todo


def _run_here(search: Search, todo: list[int], progress: Progress, verbose: int) -> None:
    """The trials one after another in this process (`--workers 0`)."""
    cache: dict = {}
    for i in todo:
        progress.update({"index": i, "status": "RUNNING"})
        progress.update(run_trial(search, i, cache, verbose=verbose))
    progress.show(final=True)


def _dispatch(search: Search, pool: WorkerPool, todo: list[int], costs: Mapping) -> None:
    """Queue the trials and put the pool's workers to work on them."""
    # Longest first: in index order a large trial drawn late ran alone at the end while the other
    # workers had nothing left (8 benchmark trials, 2 workers: a worker idle 4.6 s at the end).
    # Which trials exist and what each does does not depend on the order.
    for i in sorted(todo, key=lambda i: (-costs[i], i)):
        pool.tasks.put(i)
    pool.use(search, min(pool.size, len(todo)))


def _collect(client, search: Search, pool: WorkerPool, n: int, progress: Progress) -> None:
    """Read the workers' results until the n trials have ended (or every worker died)."""
    ended = 0
    busy: dict[int, int] = {}  # worker pid -> the trial it runs
    retried: set[int] = set()
    while ended < n:
        try:
            r = pool.results.get(timeout=2)
        except Exception:
            r = None
        if r is None or r["status"] == "RUNNING":
            ended += _dead_workers(client, search, pool, busy, retried, progress)
            if r is None:
                if not pool.alive() and not busy:
                    break  # every worker died; what is left RUNNING is reaped on the next start
                continue
        if r["status"] == "STARTED":
            pool.forked.update(r["pids"])
            continue
        if r["status"] == "RETIRED":
            if ended + len(busy) < n:
                pool.replace_one()
            continue
        if r["status"] == "RUNNING":
            busy[r["pid"]] = r["index"]
        else:
            busy.pop(r.get("pid", -1), None)
            ended += 1
        progress.update(r)


def _dead_workers(
    client, search: Search, pool: WorkerPool, busy: dict, retried: set, progress: Progress
) -> int:
    """Trials whose worker died, each queued again once (else ended); how many ended."""
    ended = 0
    # A worker killed mid-trial (SIGKILL, the kernel's OOM killer) never reports back:
    # its run becomes KILLED and the trial goes back on the queue, once.
    for pid in [p for p in busy if not _alive(p)]:
        index = busy.pop(pid)
        outcome = _worker_died(client, search, pid, index, retried)
        progress.update(outcome)
        if outcome["status"] != "RETRY":
            ended += 1
            continue
        pool.tasks.put(index)
        if not pool.alive():
            pool.replace_one()
    return ended


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


@dataclass
class SearchSpec:
    """What `millvae search` was asked to do: the command line, parsed and checked."""

    n_iter: int
    seed: int  # the ParameterSampler seed (--seed)
    workers: int
    shard: int
    n_shards: int
    stale_minutes: float
    metric: str
    space: str  # the space file ('' = the seed's space)
    experiment: str
    search_id: str  # '' = from the search's definition
    overrides: dict  # the parameters fixed for every trial


def main(argv: list[str] | None = None) -> int:
    spec = parse_args(argv)
    mine = len(shard_indices(spec.n_iter, spec.shard, spec.n_shards))
    # Started before anything else the driver does (sampling the trials imports scikit-learn and
    # SciPy, about 1 s; then the store): a worker's imports take about 4 s, and it starts its first
    # trial when they are done. Bad input found below ends them unused.
    pool = WorkerPool(min(spec.workers, mine)) if spec.workers > 0 and mine else None
    try:
        search = prepare_search(spec)
        try:
            progress = run_search(search, spec.workers, pool=pool)
        except BaseException as exc:  # the workers' trials in progress have ended by now
            end_parent(search_records(), search, "KILLED" if _stopped(exc) else "FAILED")
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


def _parser() -> ArgParser:
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
    return p


def parse_args(argv: list[str] | None) -> SearchSpec:
    """The command line as a `SearchSpec`; a bad value is a MillvaeError naming it."""
    args = vars(_parser().parse_args(argv))
    n_iter, seed = _as_int(args, "n_iter", 1), _as_int(args, "search_seed", 0)
    workers, n_shards = _as_int(args, "workers", 0), _as_int(args, "n_shards", 1)
    shard = shard_from_env(
        _as_int(args, "shard", 0) if args["shard"] not in ("", None) else None, n_shards
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
    if not metric.startswith(("val_", "cv_val_")) and metric not in ("best_val_loss",):
        raise MillvaeError(f"metric: selection uses validation metrics only; got {metric!r}")
    return SearchSpec(
        n_iter=n_iter,
        seed=seed,
        workers=workers,
        shard=shard,
        n_shards=n_shards,
        stale_minutes=stale,
        metric=metric,
        space=args["space"],
        experiment=args["experiment"],
        search_id=args["search_id"],
        overrides=_overrides(args),
    )


def _as_int(args: Mapping, name: str, low: int) -> int:
    try:
        v = int(float(args[name]))
    except (TypeError, ValueError):
        raise MillvaeError(f"{name}: expected an integer; got {args[name]!r}") from None
    if v < low:
        raise MillvaeError(f"{name}: expected >= {low}; got {v}")
    return v


def _overrides(args: Mapping) -> dict:
    """The parameters fixed for every trial (--train_seed is the trials' `seed`)."""
    overrides = {
        k: args[k]
        for k in PARAM_NAMES
        if k not in ("experiment", "seed") and args.get(k) is not None
    }
    if args["train_seed"] is not None:
        overrides["seed"] = args["train_seed"]
    overrides["experiment"] = args["experiment"]
    return overrides


def prepare_search(spec: SearchSpec) -> Search:
    """Check the space against the fixed parameters, sample the trials, open the parent run."""
    space = load_space(spec.space)
    overrides = spec.overrides
    clash = sorted(set(space) & set(overrides))
    if clash:
        raise MillvaeError(f"parameters both searched and fixed: {', '.join(clash)}")
    # overrides are validated once, up front, with defaults standing in for the sampled values
    make_config(**overrides)
    check_space(space, overrides)  # every value a trial can draw, before any trial
    if {"split", "split_seed"} & set(space):
        raise MillvaeError(
            "space: split and split_seed are fixed for a whole search (-P split=...), not "
            "searched: trials of different splits cannot be ranked by one validation figure"
        )
    metric = trial_objective(spec.metric, cross_validated(overrides))
    trials = sample_trials(space, spec.n_iter, spec.seed)
    search_id = spec.search_id or default_search_id(space, spec.n_iter, spec.seed, overrides)
    recycle_mib()  # a malformed MILLVAE_RECYCLE_MIB fails here, not in every worker
    return open_search(
        spec.experiment, search_id, space, spec.n_iter, spec.seed, overrides, metric,
        trials, spec.shard, spec.n_shards, spec.stale_minutes,
    )  # fmt: skip


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
