"""Worker processes: started fresh (spawn), the first imports TensorFlow once and forks the others;
each runs trials from a queue and ends with its driver (PR_SET_PDEATHSIG, a pid watcher)."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from typing import NoReturn

from millvae.errors import MillvaeError
from millvae.runtime import configure_threads, thread_pools, usable_cores
from millvae.search.store import Search, _alive, end_parent, search_records
from millvae.search.trial import _rss_mib, run_trial

# After its driver died, a worker has this long to end its trial run KILLED before it just exits.
ORPHAN_GRACE_S = 20.0
# A worker whose resident memory grew by this much since its first trial hands over to a new one.
RECYCLE_MIB = 1024


def recycle_mib() -> float:
    """Memory growth (MiB) after which a worker is replaced: MILLVAE_RECYCLE_MIB, 0 = never."""
    raw = os.environ.get("MILLVAE_RECYCLE_MIB", "")
    try:
        return float(raw) if raw.strip() else float(RECYCLE_MIB)
    except ValueError:
        raise MillvaeError(
            f"MILLVAE_RECYCLE_MIB: expected a number of MiB (0 = never); got {raw!r}"
        ) from None


def _configure_threads(threads: int) -> None:
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
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGUSR1), 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl: no signal will come
            os.kill(os.getpid(), signal.SIGUSR1)


def _start_driver_poll(driver_pid: int) -> None:
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

    warnings.simplefilter("ignore")

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
        end_parent(search_records(), _SEARCH, "KILLED")  # no driver is left to do it
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
