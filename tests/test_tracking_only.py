"""`millvae.tracking` is the one place that writes to MLflow: no other module of the package calls
MLflow's writing API (runs, params, tags, metrics, artifacts, models, experiments, registry)."""

from __future__ import annotations

import ast
from pathlib import Path

import millvae

PACKAGE = Path(millvae.__file__).parent
# MLflow's fluent and client methods that change the store
WRITES = {
    "create_experiment",
    "create_run",
    "delete_experiment",
    "delete_run",
    "end_run",
    "log_artifact",
    "log_artifacts",
    "log_batch",
    "log_input",
    "log_metric",
    "log_metrics",
    "log_model",
    "log_param",
    "log_params",
    "register_model",
    "set_experiment",
    "set_model_version_tag",
    "set_registered_model_alias",
    "set_tag",
    "set_tags",
    "set_terminated",
    "start_run",
    "update_model_version",
    "update_run",
}


def _writes(path: Path) -> list[str]:
    """`file:line name` of every call to a writing method in `path` (`tracking.set_tags(...)`,
    our own function of that name, excepted)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            ours = isinstance(owner, ast.Name) and owner.id == "tracking"
            if node.func.attr in WRITES and not ours:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.func.attr}")
    return found


def test_only_tracking_writes_to_mlflow():
    outside = [
        hit
        for path in sorted(PACKAGE.rglob("*.py"))
        if "tracking" not in path.relative_to(PACKAGE).parts
        for hit in _writes(path)
    ]
    assert outside == []


def test_the_scan_sees_the_writes_tracking_makes():
    """The scan finds writes where they are, so an empty answer above means something."""
    inside = [hit for path in sorted((PACKAGE / "tracking").rglob("*.py")) for hit in _writes(path)]
    kinds = {hit.split()[-1] for hit in inside}
    assert {"create_run", "log_param", "set_terminated", "log_metrics", "start_run"} <= kinds
