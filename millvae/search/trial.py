"""One trial: its config from the sampled point and the fixed parameters, trained by
`train_run` as a child run of the search's parent; a failure is recorded, never raised.

Under `split=casefold` with no `split_seed` of its own a trial is cross-validated: its run holds
one nested run per fold and is ranked by the validation AP over the folds (`cv_val_ap_<score>`),
the pooled out-of-fold test figures logged beside it, never used.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from millvae.config import PREP_PARAMS, make_config
from millvae.errors import MillvaeError
from millvae.search.store import (
    CLAIM_TAG,
    DRIVER_TAG,
    HOST_TAG,
    PID_TAG,
    SEARCH_ID_TAG,
    TRIAL_TAG,
    Search,
    claim_trial,
    search_records,
)

if TYPE_CHECKING:
    from millvae.tracking.search import SearchRecords


def run_trial(search: Search, index: int, cache: dict, verbose: int = 0) -> dict:
    """Train trial `index` as one child run; a failure is recorded, never raised."""
    client = search_records()
    try:
        claim = claim_trial(client, search, index)
    except Exception as exc:  # the store refused or failed: this trial, not the worker, fails
        first = _first_line(exc)
        return {"index": index, "status": "FAILED", "error": f"could not claim it: {first}"}
    if claim is None:  # finished, or running, under another driver (a second start, a shard)
        return {"index": index, "status": "ELSEWHERE"}
    params = {**search.trials[index], **search.overrides}
    tags = _trial_tags(search, index, claim)
    t0 = time.perf_counter()
    try:
        cfg = make_config(**params)
    except MillvaeError as exc:  # an invalid combination: rejected before any training
        return _reject(client, search, index, params, tags, exc)
    if cross_validated(params):
        return _train_folds(client, search, index, cfg, tags, cache, verbose, t0)
    return _train(client, search, index, cfg, tags, cache, verbose, t0)


def cross_validated(params: Mapping) -> bool:
    """Whether a trial of these parameters trains every fold of split=casefold."""
    return str(params.get("split", "")).strip().lower() == "casefold" and (
        params.get("split_seed") in (None, "")
    )


def trial_objective(metric: str, cross_validation: bool) -> str:
    """The metric that ranks the trials: cross-validated trials log the validation AP over their
    folds as `cv_val_ap_<score>` (`val_ap_<score>` is read as that); others `val_...`."""
    if cross_validation:
        if metric.startswith("cv_val_ap_"):
            return metric
        if metric.startswith("val_ap_"):
            print(
                f"search: trials of split=casefold train every fold; they are ranked by "
                f"cv_{metric}, the validation AP over the folds",
                file=sys.stderr,
            )
            return "cv_" + metric
        raise MillvaeError(
            "metric: trials of split=casefold train every fold and are ranked by the validation "
            f"AP over the folds, cv_val_ap_<score> (e.g. cv_val_ap_combined_cond); got {metric!r}"
        )
    if metric.startswith("cv_"):
        raise MillvaeError(
            f"metric: {metric} is logged by trials that train every fold (-P split=casefold, "
            "split_seed not fixed); these trials train one split: use val_<metric>_<score>"
        )
    return metric


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _trial_tags(search: Search, index: int, claim: str) -> dict:
    """The tags of trial `index`'s run, made under claim `claim` by this process."""
    return {
        "mlflow.parentRunId": search.parent_id,
        SEARCH_ID_TAG: search.search_id,
        TRIAL_TAG: str(index),
        PID_TAG: str(os.getpid()),
        HOST_TAG: socket.gethostname(),
        DRIVER_TAG: search.driver,
        CLAIM_TAG: claim,
    }


def _reject(
    client: SearchRecords, search: Search, index: int, params: Mapping, tags: dict, exc
) -> dict:
    """A FAILED run for a trial whose parameters make no valid config (nothing trained)."""
    run_id = client.failed_run(
        search.experiment_id, f"trial-{index:04d}", tags, params, f"invalid parameters: {exc}"
    )
    return {"index": index, "status": "FAILED", "error": str(exc), "run_id": run_id}


def _train(
    client: SearchRecords,
    search: Search,
    index: int,
    cfg,
    tags: dict,
    cache: dict,
    verbose: int,
    t0: float,
) -> dict:
    """Train the trial's config with `train_run` (data prepared once per PREP_PARAMS key)."""
    from millvae.tracking import run_metrics
    from millvae.train import train_run

    try:
        res = train_run(
            cfg,
            prepared=_prepared(cfg, cache),
            tags=tags,
            run_name=f"trial-{index:04d}_{cfg.run_name()}",
            experiment_id=search.experiment_id,
            verbose=verbose,
        )
        metric = run_metrics(res.run_id).get(search.metric)
        return _finished(client, index, res.run_id, metric, t0, res.training_seconds)
    except Exception as exc:  # train_run already ended the run FAILED with the reason
        return {"index": index, "status": "FAILED", "error": _first_line(exc)}
    finally:
        _clear_session()


def _train_folds(
    client: SearchRecords,
    search: Search,
    index: int,
    cfg,
    tags: dict,
    cache: dict,
    verbose: int,
    t0: float,
) -> dict:
    """A cross-validated trial: one run, a nested run per fold, the pooled figures on it."""
    from millvae import tracking
    from millvae.crossval import record_pooled, tag_data
    from millvae.detect.pooled import fold_scores
    from millvae.train import train_run

    seeds = list(range(cfg.folds))
    name = f"trial-{index:04d}_{cfg.model_name()}_casefold{cfg.folds}"
    fit_seconds, folds = 0.0, []
    try:
        with tracking.tracked_run(
            cfg, tags=tags, run_name=name, experiment_id=search.experiment_id
        ) as run:
            params = {k: v for k, v in cfg.to_params().items() if k != "split_seed"}
            params["split_seeds"] = ",".join(map(str, seeds))
            tracking.start_record(params, model_type="cv_trial")
            for seed in seeds:
                child = dataclasses.replace(cfg, split_seed=seed)
                prepared = _prepared(child, cache)
                res = train_run(child, prepared=prepared, nested=True, verbose=verbose)
                _clear_session()
                fit_seconds += res.training_seconds
                if res.evaluation is None:
                    raise MillvaeError(
                        f"fold {seed}: no detection figures (run {res.run_id}: "
                        "its validation or test split has no failed windows)"
                    )
                folds.append(fold_scores(seed, res.evaluation, prepared.windows))
            tag_data(prepared)
            stats = record_pooled(folds, res.evaluation.score_names, cfg, f"trial {index}")
        return _finished(client, index, run.info.run_id, stats.get(search.metric), t0, fit_seconds)
    except Exception as exc:  # tracked_run ended the trial's run (and the fold's) FAILED
        return {"index": index, "status": "FAILED", "error": _first_line(exc)}


def _finished(client: SearchRecords, index: int, run_id: str, metric, t0: float, fit: float):
    """A finished trial's result; the worker's memory recorded on its run (growth across trials
    would show there)."""
    client.record_metric(run_id, "worker_rss_mib", _rss_mib())
    return {
        "index": index,
        "status": "FINISHED",
        "run_id": run_id,
        "metric": metric,
        "seconds": time.perf_counter() - t0,
        "fit_seconds": fit,
    }


def _prepared(cfg, cache: dict):
    """The trial's data, shared by the trials (and folds) whose PREP_PARAMS agree; a worker keeps
    the folds of one data set and split, never more, so its memory stays flat."""
    from millvae.data.prepare import prepare

    base = tuple(getattr(cfg, p) for p in PREP_PARAMS if p != "split_seed")
    key = (base, cfg.split_seed)
    if key not in cache:
        if any(b != base for b, _ in cache) or len(cache) >= max(cfg.folds, 1):
            cache.clear()
        cache[key] = prepare(cfg)
    return cache[key]


def _clear_session() -> None:
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
    try:
        cfg = make_config(**params)
    except MillvaeError:
        return 0.0
    # encoder and decoder: one TCN on each of the lengths window, window/2, ... per conv layer
    lengths = 2 * sum(cfg.window_size / 2**i for i in range(cfg.conv_layers))
    f = cfg.start_filter_no
    trainings = cfg.folds if cross_validated(params) else 1
    return trainings * cfg.epochs * len(cfg.dilations) * lengths * f * (cfg.kernel_size * f + 256)


def _rss_mib() -> float:
    """Resident memory of this process now (Linux /proc; peak RSS elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
