"""`millvae register`: the best FINISHED run (by a validation metric) -> the MLflow Model Registry.

Only reads the tracking store, then registers the chosen run's pyfunc `detector` and points an
alias (default `champion`) at that version. Selection never looks at test metrics: they are copied
onto the version as tags so the registry shows them, nothing more.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from millvae.errors import ArgParser, MillvaeError
from millvae.metric_groups import flat
from millvae.tracking.registry import register_version, tag_run
from millvae.tracking.store import prepare_store

DEFAULTS = {
    "experiment": "millvae",
    "metric": "val_ap_kl",
    "model_name": "millvae",
    "alias": "champion",
    "search_id": "",
    "allow_synthetic": "false",
    "protocol": "leak-free",
}
DETECTOR_NAME = "detector"
SEARCH_ID_TAG = "millvae.search_id"

# Metric-name tokens that say which direction is better.
_HIGHER_TOKENS = ("ap", "rocauc", "prauc", "auc", "f1", "precision", "recall", "accuracy")
_LOWER_TOKENS = ("loss",)
# Metric kinds that prefix the score name, longest first so `cut_ap` wins over `ap`.
_KINDS = (
    "cutshare_ap",
    "cut_rocauc",
    "cut_ap",
    "precision",
    "rocauc",
    "recall",
    "prauc",
    "f1",
    "ap",
)
# The headline metrics copied onto the version: no per-condition (`_doc0.75`, `_steel`) or
# interval (`_lo`, `_hi`) suffix; a score is one word, optionally `_cond`.
_MAIN_METRIC = re.compile(r"^(val|test)_(ap|rocauc|prauc|f1)_[a-z0-9]+(_cond)?(_smooth)?$")
_ALIAS = re.compile(r"^[\w\-]+$")
# Which runs are compared: figures of the seed's window split (windows of one cut in training and
# test) are not comparable with those of whole held-out tools or cuts.
PROTOCOLS = {
    "leak-free": ("case", "casefold", "cut"),
    "case": ("case",),
    "casefold": ("casefold",),
    "cut": ("cut",),
    "window": ("window",),
    "any": ("window", "case", "casefold", "cut"),
}
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no", "")


@dataclass(frozen=True)
class Registration:
    """What `register_best` did; `summary()` is what the command prints."""

    model_name: str
    version: str
    alias: str
    created: bool  # False: an existing version of this run was reused
    run_id: str
    run_name: str
    experiment: str
    metric: str
    value: float
    higher_is_better: bool
    test_ap_metric: str | None
    test_ap: float | None
    model_uri: str  # what was registered (models:/<model_id> or runs:/<run_id>/detector)
    data_source: str
    considered: int
    skipped_synthetic: int
    skipped_unfinished: int
    skipped_no_metric: int
    skipped_no_detector: int
    protocol: str = "leak-free"
    skipped_protocol: int = 0
    previous_alias_version: str | None = None
    version_tags: dict[str, str] = field(default_factory=dict)
    fold_run_id: str | None = None  # a cross-validated run's detector: the fold it comes from

    def summary(self) -> str:
        """A few lines for the terminal."""
        how = "new version" if self.created else "existing version, reused"
        moved = ""
        if self.previous_alias_version and self.previous_alias_version != self.version:
            moved = f" (moved from version {self.previous_alias_version})"
        test = (
            f"{self.test_ap_metric} = {self.test_ap:.4f}"
            if self.test_ap is not None
            else f"{self.test_ap_metric or 'test AP'} = n/a"
        )
        synthetic = " [SYNTHETIC data]" if self.data_source == "synthetic" else ""
        skipped = [f"{self.skipped_synthetic} synthetic"] if self.skipped_synthetic else []
        if self.skipped_unfinished:
            skipped.append(f"{self.skipped_unfinished} not FINISHED")
        if self.skipped_no_metric:
            skipped.append(f"{self.skipped_no_metric} without {self.metric}")
        if self.skipped_protocol:
            skipped.append(f"{self.skipped_protocol} of another protocol")
        if self.skipped_no_detector:
            skipped.append(f"{self.skipped_no_detector} better without a '{DETECTOR_NAME}' model")
        return "\n".join(
            [
                f"millvae: registered '{self.model_name}' version {self.version} ({how}); "
                f"alias @{self.alias} -> version {self.version}{moved}",
                f"  run {self.run_id} ({self.run_name}) of experiment '{self.experiment}'"
                f"{synthetic}",
                f"  selected by {self.metric} = {self.value:.4f} "
                f"({'higher' if self.higher_is_better else 'lower'} is better); "
                f"{test} (reported, not used for selection)",
                f"  protocol: {self.protocol} (split={'/'.join(PROTOCOLS[self.protocol])}); "
                f"runs: {self.considered} considered"
                + (f", skipped {', '.join(skipped)}" if skipped else ""),
                *(
                    [
                        f"  detector of its fold {self.version_tags.get('fold', '?')} (run "
                        f"{self.fold_run_id}), the best of its folds by "
                        f"{self.metric.removeprefix('cv_')}"
                    ]
                    if self.fold_run_id
                    else []
                ),
                f'  load: mlflow.pyfunc.load_model("models:/{self.model_name}@{self.alias}")',
            ]
        )


def parse_bool(value: str | bool, name: str = "allow_synthetic") -> bool:
    """true/false/1/0/yes/no (any case); anything else is a one-line error."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise MillvaeError(f"{name} must be one of true/false/1/0/yes/no; got {value!r}")


def higher_is_better(metric: str) -> bool:
    """Direction of a validation metric; refuses test metrics and names it cannot judge."""
    if metric.startswith(("test_", "pooled_test_")):
        raise MillvaeError(f"selection uses validation metrics only; got {metric}")
    if not metric.removeprefix("cv_").startswith("val_"):
        raise MillvaeError(
            f"the selection metric must be a validation metric named val_<metric>_<score> "
            f"(e.g. val_ap_kl), or cv_val_ap_<score> over the folds of split=casefold; "
            f"got {metric!r}"
        )
    tokens = metric.removeprefix("cv_").split("_")[1:]
    if any(t in _LOWER_TOKENS for t in tokens):
        return False
    if any(t in _HIGHER_TOKENS for t in tokens):
        return True
    raise MillvaeError(
        f"cannot tell whether a higher or lower {metric} is better: expected a name with one of "
        f"{', '.join(_HIGHER_TOKENS)} (higher) or loss (lower)"
    )


def paired_test_ap_metric(metric: str) -> str | None:
    """`val_rocauc_mse_cond` -> `test_ap_mse_cond`: the test AP of the selection metric's score
    (`cv_val_ap_kl` -> `pooled_test_ap_kl`, the folds' test windows pooled)."""
    pooled = metric.startswith("cv_val_")
    rest = metric.removeprefix("cv_").removeprefix("val_")
    for kind in _KINDS:
        if rest.startswith(kind + "_"):
            return f"{'pooled_' if pooled else ''}test_ap_{rest[len(kind) + 1 :]}"
    return None


def _finite(value) -> bool:
    return value is not None and isinstance(value, int | float) and math.isfinite(value)


def _all_runs(client, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _find_experiment(client, name: str):
    exp = client.get_experiment_by_name(name)
    if exp is None and name.isdigit():  # MLflow users also pass experiment ids
        try:
            exp = client.get_experiment(name)
        except Exception:
            exp = None
    if exp is None or exp.lifecycle_stage != "active":
        import mlflow

        names = [e.name for e in client.search_experiments(max_results=10)]
        listed = ", ".join(repr(n) for n in names) if names else "none"
        raise MillvaeError(
            f"experiment {name!r} not found in {mlflow.get_tracking_uri()}; existing: {listed}"
        )
    return exp


def _val_metric_names(runs, limit: int = 12) -> str:
    names = sorted(
        {k for r in runs for k in flat(r.data.metrics) if k.startswith(("val_", "cv_val_"))}
    )
    if not names:
        return "none (these runs logged no val_ metrics)"
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def detector_uri(client, run) -> str | None:
    """The run's `detector`: its LoggedModel (MLflow 3), else runs:/<id>/detector (MLflow 2)."""

    run_id = run.info.run_id
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{DETECTOR_NAME}'",
        output_format="list",
    )
    ready = [m for m in models if str(getattr(m.status, "name", m.status)).upper() == "READY"]
    if ready:
        # a retried log_model leaves several; the last one logged is the one the run ended with
        newest = max(ready, key=lambda m: m.creation_timestamp or 0)
        return f"models:/{newest.model_id}"
    try:
        files = {f.path for f in client.list_artifacts(run_id, DETECTOR_NAME)}
    except Exception:  # no artifact repository for this run: nothing to fall back to
        files = set()
    if f"{DETECTOR_NAME}/MLmodel" in files:
        return f"runs:/{run_id}/{DETECTOR_NAME}"
    return None


def _existing_version(client, model_name: str, run_id: str):

    quote = '"' if "'" in model_name else "'"
    try:
        versions = client.search_model_versions(f"name = {quote}{model_name}{quote}")
    except MlflowException:
        return None
    mine = [
        v
        for v in versions
        if (v.run_id == run_id or (v.tags or {}).get("run_id") == run_id)
        and str(v.status).upper().endswith("READY")
    ]
    # the first registration of the run is the one to keep pointing at
    return min(mine, key=lambda v: int(v.version)) if mine else None


def _version_tags(run, metric: str, value: float, experiment_name: str) -> dict[str, str]:
    metrics = flat(run.data.metrics)
    tags = {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name or "",
        "experiment": experiment_name,
        "selection_metric": metric,
        "selection_value": str(float(value)),
        "data_source": run.data.tags.get("data_source", "unknown"),
        "split": run.data.params.get("split", "unknown"),
    }
    if run.data.tags.get(SEARCH_ID_TAG):
        tags[SEARCH_ID_TAG] = run.data.tags[SEARCH_ID_TAG]
    for name in sorted(metrics):
        if _MAIN_METRIC.match(name) and _finite(metrics[name]):
            tags[name] = str(float(metrics[name]))
    return tags


def _check_names(model_name: str, alias: str) -> None:
    # checked before anything is registered, so a bad alias never leaves a stray version behind
    if not model_name.strip() or "/" in model_name or ":" in model_name:
        raise MillvaeError(f"model_name must be non-empty without '/' or ':'; got {model_name!r}")
    if not _ALIAS.match(alias) or len(alias) > 255:
        raise MillvaeError(f"alias must be letters, digits, '_' or '-'; got {alias!r}")
    if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise MillvaeError(f"alias {alias!r} is reserved by MLflow (latest, v<number>)")


@dataclass
class Selection:
    """The candidates of a registration, best first, and why the other runs were not among them."""

    candidates: list
    figures: dict[str, dict[str, float]]
    runs: int
    finished: int
    with_metric: int
    synthetic: int
    other_protocol: int


def register_best(
    experiment: str = DEFAULTS["experiment"],
    metric: str = DEFAULTS["metric"],
    model_name: str = DEFAULTS["model_name"],
    alias: str = DEFAULTS["alias"],
    search_id: str = DEFAULTS["search_id"],
    allow_synthetic: bool | str = False,
    protocol: str = DEFAULTS["protocol"],
) -> Registration:
    """Register the best FINISHED run's detector under `model_name` and point `alias` at it."""
    higher, allow, protocol = _check_args(metric, allow_synthetic, protocol, model_name, alias)
    prepare_store()
    client = MlflowClient()
    exp = _find_experiment(client, experiment)
    own_run = os.environ.get("MLFLOW_RUN_ID")  # `mlflow run -e register`'s own run
    runs, where = _runs(client, exp, search_id, own_run)
    sel = select_run(
        runs, metric, higher=higher, allow_synthetic=allow, protocol=protocol, where=where
    )
    chosen, uri, fold = _first_with_detector(client, sel.candidates, metric, where)
    value = float(sel.figures[chosen.info.run_id][metric])
    tags = _version_tags(chosen, metric, value, exp.name)
    if fold is not None:  # a cross-validated run: the detector is that of its best fold
        tags.update(fold_run_id=fold.info.run_id, fold=fold.data.params.get("split_seed", ""))
    description = (
        f"{exp.name} run {chosen.info.run_name} ({chosen.info.run_id}): {metric} = {value:.4f}"
    )
    existing = _existing_version(client, model_name, (fold or chosen).info.run_id)
    version, created, previous = register_version(
        uri, model_name, alias, existing, tags=tags, description=description
    )
    if own_run:  # leave a trace on the `mlflow run -e register` run itself
        tag_run(own_run, _trace(model_name, version.version, alias, chosen, protocol))
    test_metric = paired_test_ap_metric(metric)
    test_value = sel.figures[chosen.info.run_id].get(test_metric) if test_metric else None
    return Registration(
        model_name=model_name,
        version=str(version.version),
        alias=alias,
        created=created,
        run_id=chosen.info.run_id,
        run_name=chosen.info.run_name or "",
        experiment=exp.name,
        metric=metric,
        value=value,
        higher_is_better=higher,
        test_ap_metric=test_metric,
        test_ap=float(test_value) if _finite(test_value) else None,
        model_uri=uri,
        data_source=tags["data_source"],
        considered=len(sel.candidates),
        skipped_synthetic=0 if allow else sel.synthetic,
        skipped_unfinished=sel.runs - sel.finished,
        skipped_no_metric=sel.finished - sel.with_metric,
        skipped_no_detector=sel.candidates.index(chosen),
        protocol=protocol,
        skipped_protocol=sel.other_protocol,
        previous_alias_version=str(previous) if previous is not None else None,
        version_tags=tags,
        fold_run_id=fold.info.run_id if fold is not None else None,
    )


def _check_args(metric: str, allow_synthetic, protocol, model_name: str, alias: str):
    """(higher is better, allow synthetic, protocol), checked before anything is read or written."""
    higher = higher_is_better(metric)
    allow = parse_bool(allow_synthetic)
    protocol = str(protocol).strip().lower()
    if protocol not in PROTOCOLS:
        raise MillvaeError(f"protocol: expected one of {', '.join(PROTOCOLS)}; got {protocol!r}")
    _check_names(model_name, alias)
    return higher, allow, protocol


def _runs(client, exp, search_id: str, own_run: str | None) -> tuple[list, str]:
    """The experiment's runs (of one search, with `search_id`), and how to name them; our own
    run (`mlflow run -e register` runs inside one) is never a candidate, never counted."""
    runs = [r for r in _all_runs(client, exp.experiment_id) if r.info.run_id != own_run]
    where = f"experiment {exp.name!r}"
    if search_id:
        runs = [r for r in runs if r.data.tags.get(SEARCH_ID_TAG) == search_id]
        where += f" with {SEARCH_ID_TAG} = {search_id!r}"
    return runs, where


def _trace(model_name: str, version: str, alias: str, chosen, protocol: str) -> dict[str, str]:
    return {
        "millvae.registered_model": model_name,
        "millvae.registered_version": str(version),
        "millvae.registered_alias": alias,
        "millvae.selected_run_id": chosen.info.run_id,
        "millvae.protocol": protocol,
        "model_type": "register",
        # a labelled record of the registration, not a stray run with a generated name
        "mlflow.runName": f"register_{model_name}_v{version}",
    }


def select_run(
    runs: list,
    metric: str,
    *,
    higher: bool,
    allow_synthetic: bool,
    protocol: str,
    where: str,
) -> Selection:
    """The runs that may be registered, best by `metric` first (validation figures only; ties
    to the earlier run, so re-running register never flips between equals). Reads nothing."""
    if not runs:
        raise MillvaeError(
            f"{where} has no runs; train one first (`mlflow run . --env-manager local`)"
        )
    runs, other = _of_protocol(runs, protocol, where)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    if not finished:
        statuses: dict[str, int] = {}
        for r in runs:
            statuses[r.info.status] = statuses.get(r.info.status, 0) + 1
        counts = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
        raise MillvaeError(f"{where} has no FINISHED runs ({counts})")
    # figures under their own names, grouped or not (`detail/val_f1_kl` is val_f1_kl)
    figures = {r.info.run_id: flat(r.data.metrics) for r in runs}
    with_metric = [r for r in finished if _finite(figures[r.info.run_id].get(metric))]
    if not with_metric:
        _no_metric(runs, finished, figures, metric, where)
    synthetic = [r for r in with_metric if r.data.tags.get("data_source") == "synthetic"]
    synthetic_ids = {r.info.run_id for r in synthetic}
    candidates = [r for r in with_metric if allow_synthetic or r.info.run_id not in synthetic_ids]
    if not candidates:
        raise MillvaeError(
            f"all {len(synthetic)} FINISHED runs of {where} with {metric} were trained on "
            f"synthetic data (tag data_source=synthetic); pass allow_synthetic=true to register "
            f"one anyway"
        )
    sign = -1.0 if higher else 1.0
    candidates.sort(
        key=lambda r: (sign * figures[r.info.run_id][metric], r.info.start_time or 0, r.info.run_id)
    )
    return Selection(
        candidates, figures, len(runs), len(finished), len(with_metric), len(synthetic), len(other)
    )


def _of_protocol(runs: list, protocol: str, where: str) -> tuple[list, list]:
    """(runs of the protocol's splits, the others); runs without a split (a search's or repeat's
    parent, a register run) compete on nothing and are kept, to be dropped for want of metrics."""
    splits = PROTOCOLS[protocol]
    other = [r for r in runs if r.data.params.get("split", splits[0]) not in splits]
    if other and len(other) == len(runs):
        found = sorted({r.data.params["split"] for r in other})
        raise MillvaeError(
            f"protocol: expected runs with split={'/'.join(splits)} ({protocol}) in {where}; "
            f"its {len(runs)} runs have split={'/'.join(found)}; pass protocol="
            f"{'window' if found == ['window'] else 'any'} to compare those"
        )
    return [r for r in runs if r.data.params.get("split", splits[0]) in splits], other


def _no_metric(runs: list, finished: list, figures: dict, metric: str, where: str) -> None:
    if not any(metric in f for f in figures.values()):
        raise MillvaeError(
            f"unknown metric {metric}: no run of {where} logged it; "
            f"validation metrics there: {_val_metric_names(runs)}"
        )
    raise MillvaeError(
        f"none of the {len(finished)} FINISHED runs of {where} has {metric} "
        f"(only runs that did not finish logged it); their validation metrics: "
        f"{_val_metric_names(finished)}"
    )


def _first_with_detector(client, candidates: list, metric: str, where: str):
    """The best candidate that has a logged detector, the detector's URI, and the fold run it
    comes from where the candidate is cross-validated (else None)."""
    for run in candidates:
        uri = detector_uri(client, run)
        if uri is not None:
            return run, uri, None
        if metric.startswith("cv_"):
            found = _best_fold(client, run, metric.removeprefix("cv_"))
            if found is not None:
                return run, found[1], found[0]
    best = candidates[0]
    raise MillvaeError(
        f"none of the {len(candidates)} candidate runs of {where} has a '{DETECTOR_NAME}' "
        f"model (best by {metric}: run {best.info.run_id}); was it trained by this version?"
    )


def _best_fold(client, run, fold_metric: str):
    """(fold run, its detector URI) of a cross-validated run (a `repeat` or search trial over
    every fold): the FINISHED fold best by its own `fold_metric` (validation), ties to the
    earlier fold; None where no fold has a detector."""
    folds = client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'",
        max_results=1000,
    )
    sign = -1.0 if higher_is_better(fold_metric) else 1.0
    ranked = sorted(
        (f for f in folds if f.info.status == "FINISHED" and _finite(_metric(f, fold_metric))),
        key=lambda f: (sign * _metric(f, fold_metric), f.info.start_time or 0, f.info.run_id),
    )
    for fold in ranked:
        uri = detector_uri(client, fold)
        if uri is not None:
            return fold, uri
    return None


def _metric(run, name: str):
    return flat(run.data.metrics).get(name)


def _parser() -> ArgParser:
    p = ArgParser(
        prog="millvae register",
        description="Register the best FINISHED run (by a validation metric) as a model version.",
    )
    p.add_argument("--experiment", default=DEFAULTS["experiment"], help="experiment name (or id)")
    p.add_argument(
        "--metric",
        default=DEFAULTS["metric"],
        help="validation metric to select by (val_...; never test_); loss metrics are minimised",
    )
    p.add_argument("--model_name", default=DEFAULTS["model_name"], help="registered model name")
    p.add_argument("--alias", default=DEFAULTS["alias"], help="alias set on the chosen version")
    p.add_argument(
        "--search_id",
        default=DEFAULTS["search_id"],
        help=f"only runs tagged {SEARCH_ID_TAG}=<id>; empty = all runs",
    )
    p.add_argument(
        "--allow_synthetic",
        default=DEFAULTS["allow_synthetic"],
        help="also consider runs trained on synthetic data (true/false)",
    )
    p.add_argument(
        "--protocol",
        default=DEFAULTS["protocol"],
        help="which runs compete: leak-free (split=case, casefold or cut), case, casefold, cut, "
        "window (the seed's, leaky) or any",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """`millvae register ...`: prints the summary; errors raise MillvaeError."""
    args = _parser().parse_args(argv)
    result = register_best(
        experiment=args.experiment,
        metric=args.metric,
        model_name=args.model_name,
        alias=args.alias,
        search_id=args.search_id,
        allow_synthetic=args.allow_synthetic,
        protocol=args.protocol,
    )
    print(result.summary())
    return 0
