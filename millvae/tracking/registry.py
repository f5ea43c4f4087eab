"""The Model Registry: a version for a run's detector, its alias and tags."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from millvae.errors import MillvaeError


def register_version(
    uri: str,
    model_name: str,
    alias: str,
    existing: Any,
    *,
    tags: Mapping[str, str],
    description: str,
) -> tuple[Any, bool, str | None]:
    """Register `uri` as a version of `model_name` (or refresh the tags of `existing`, the run's
    version already there), point `alias` at it; (version, created, the alias' previous version).
    """
    try:
        created = existing is None
        client = MlflowClient()
        if created:
            version = mlflow.register_model(uri, model_name, tags=dict(tags))
        else:  # refresh the tags: a version registered by hand may lack them
            version = existing
            for key, val in tags.items():
                client.set_model_version_tag(model_name, version.version, key, val)
        previous = client.get_registered_model(model_name).aliases.get(alias)
        client.set_registered_model_alias(model_name, alias, version.version)
        client.update_model_version(model_name, version.version, description=description)
    except MlflowException as exc:
        first = str(exc.message if hasattr(exc, "message") else exc).splitlines()[0]
        raise MillvaeError(f"registering {uri} as {model_name!r} failed: {first}") from exc
    return version, created, previous


def tag_run(run_id: str, tags: Mapping[str, str]) -> None:
    """Tags on a run that is not the active one; a failure here is a warning, not an error."""
    client = MlflowClient()
    try:
        for key, val in tags.items():
            client.set_tag(run_id, key, val)
    except MlflowException as exc:  # what was done before (a registration) stands
        print(f"millvae: warning: could not tag run {run_id}: {exc}")
