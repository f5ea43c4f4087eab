"""The MLflow calls of a hyperparameter search: its runs found by tag, the parent run made,
claims logged as parent params, the lock experiment, dead runs ended, the summary.

`millvae.search.store` decides (who holds a claim, which runs are dead, what the summary says);
everything it reads from or writes to the store goes through a `SearchRecords`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient


class SearchRecords:
    """One MLflow client and the few questions and writes the search needs of it."""

    def __init__(self) -> None:
        self.client = MlflowClient()

    # reading

    def runs_tagged(self, experiment_id: str, tags: Mapping[str, str], max_results: int) -> list:
        """Runs of the experiment whose tags equal `tags`."""
        where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        return self.client.search_runs(
            [experiment_id], filter_string=where, max_results=max_results
        )

    def run(self, run_id: str) -> Any:
        return self.client.get_run(run_id)

    def params(self, run_id: str) -> dict[str, str]:
        return self.client.get_run(run_id).data.params

    def status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status

    def children(self, run: Any) -> list:
        """The runs nested under `run` (the folds of a cross-validated trial)."""
        return self.client.search_runs(
            [run.info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'",
            max_results=1000,
        )

    def last_loss_ms(self, run: Any) -> int:
        """When the run, or a run nested under it (a fold of a cross-validated trial), last logged
        a training loss (the run's start where none did), in ms."""
        times = [m.timestamp for m in self.client.get_metric_history(run.info.run_id, "loss")]
        if not times:
            for child in self.children(run):
                history = self.client.get_metric_history(child.info.run_id, "loss")
                times += [m.timestamp for m in history] or [child.info.start_time]
        return max(times or [run.info.start_time])

    def experiment_tags(self, name: str) -> dict[str, str] | None:
        """The tags of the experiment `name` (deleted ones too), None where none has the name."""
        exp = self.client.get_experiment_by_name(name)
        return None if exp is None else dict(exp.tags)

    def search_experiment(self, exp_name: str, driver_run: str) -> tuple[str, str]:
        """(id, name) of the experiment of `driver_run`, else of `exp_name`, made if need be."""
        if not driver_run:
            return mlflow.set_experiment(exp_name).experiment_id, exp_name
        experiment_id = self.client.get_run(driver_run).info.experiment_id
        return experiment_id, self.client.get_experiment(experiment_id).name

    # writing

    def create_parent(
        self, experiment_id: str, run_name: str, tags: Mapping[str, str], params: Mapping
    ) -> str:
        """The parent run: `mlflow run`'s own run where there is one (MLFLOW_RUN_ID), tagged at
        once so that waiting drivers can read it; its params those `mlflow run` did not log."""
        run_id = os.environ.get("MLFLOW_RUN_ID")
        if run_id:
            tags = {**tags, "mlflow.runName": run_name}
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        else:
            run_id = self.client.create_run(
                experiment_id, run_name=run_name, tags=dict(tags)
            ).info.run_id
        have = self.params(run_id)  # `mlflow run` logged its -P values already
        todo = [Param(k, v) for k, v in params.items() if k not in have]
        self.client.log_batch(run_id, params=todo)
        return run_id

    def take_name(self, name: str, tags: Mapping[str, str]) -> bool:
        """Create experiment `name` and delete it at once (its name stays taken): whether this
        process made it. Experiment names are unique in every MLflow store."""
        try:
            made = self.client.create_experiment(name, tags=dict(tags))
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return False
        self.client.delete_experiment(made)
        return True

    def log_claim(self, run_id: str, key: str, value: str) -> bool:
        """Log param `key` = `value` on `run_id`: False where another process logged the key
        first (a param cannot be logged again with another value)."""
        try:
            self.client.log_param(run_id, key, value)
        except MlflowException:
            if key not in self.params(run_id):
                raise
            return False
        return True

    def end(self, run_id: str, status: str, error: str | None = None) -> None:
        """End a run `status`, with the reason as its `millvae.error` tag where given."""
        if error is not None:
            self.client.set_tag(run_id, "millvae.error", error)
        self.client.set_terminated(run_id, status=status)

    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def tag(self, run_id: str, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, v)

    def record_metric(self, run_id: str, key: str, value: float) -> None:
        self.client.log_metric(run_id, key, value)

    def failed_run(
        self, experiment_id: str, run_name: str, tags: Mapping, params: Mapping, error: str
    ) -> str:
        """A FAILED run that trained nothing (a trial whose parameters make no valid config)."""
        created = self.client.create_run(experiment_id, tags=dict(tags), run_name=run_name)
        run_id = created.info.run_id
        for k, v in params.items():
            self.client.log_param(run_id, k, str(v))
        self.end(run_id, "FAILED", error)
        return run_id

    def log_tables(self, run_id: str, tables: Mapping[str, Any]) -> None:
        """DataFrames as CSV artifacts of `run_id`, one file per name."""
        with tempfile.TemporaryDirectory() as tmp:
            for name, table in tables.items():
                path = Path(tmp) / name
                table.to_csv(path, index=False)
                self.client.log_artifact(run_id, str(path))
