"""The MLflow tracking store, made ready before a process uses it.

MLflow creates a sqlite store's tables on the first connection of each process, with a check then
a create that is not atomic across processes: two commands started together on a store that does
not exist yet (search workers, a shell loop with ``&``) both see no tables, both create them, and
one dies with ``table ... already exists``. `prepare_store` does that first connection under an
exclusive lock on ``<db>.lock`` beside the database, so the second process waits and then finds
the store ready. Other stores (a tracking server, PostgreSQL, a folder) are left to MLflow.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from millvae.cache import file_lock
from millvae.errors import MillvaeError


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:`` tracking URI (relative to the working directory where
    the URI is), or None for another kind of store or an in-memory database."""
    if not tracking_uri.startswith("sqlite"):
        return None

    try:
        database = make_url(tracking_uri).database
    except ArgumentError as exc:
        raise MillvaeError(
            f"expected a tracking URI like sqlite:///path/to/mlflow.db, got {tracking_uri!r}: {exc}"
        ) from None
    if not database or database == ":memory:" or database.startswith("file:"):
        # nothing on disk to race for (a file: URI names its path in a way sqlite parses)
        return None
    return Path(database).absolute()


_READY: set[str] = set()  # stores this process has prepared: later calls cost nothing


def prepare_store(tracking_uri: str | None = None) -> None:
    """Create and migrate a sqlite tracking store (`tracking_uri`, else MLflow's current one)
    under a file lock, so that processes starting together do not race to create its tables.
    Other stores: nothing. Once per store and process (a search worker runs many trials)."""

    uri = tracking_uri or mlflow.get_tracking_uri()
    db = sqlite_path(uri)
    if db is None or uri in _READY:
        return
    try:
        db.parent.mkdir(parents=True, exist_ok=True)  # as MLflow does for sqlite stores
        with file_lock(Path(f"{db}.lock"), f"waiting for another process to create {db}"):
            _initialise(uri)
    except OSError as exc:  # no lock file possible: a read-only folder
        if not db.is_file():
            raise MillvaeError(
                f"expected a writable folder for the MLflow store {uri}, got "
                f"{type(exc).__name__}: {exc.strerror or exc}"
            ) from None
        _initialise(uri)  # a read-only store that exists: nothing to create, nothing to race
    _READY.add(uri)


def _initialise(uri: str) -> None:

    try:
        # the first query builds the store (cached per URI for this process), which creates the
        # tables and runs the migrations of a new database and checks the schema of an old one
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except MlflowException as exc:
        first = (str(exc.message).strip().splitlines() or [""])[0]
        raise MillvaeError(f"expected a usable MLflow store at {uri}, got: {first}") from None
    except SQLAlchemyError as exc:  # not a database, a schema sqlite cannot read, ...
        first = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [""])[0]
        raise MillvaeError(
            f"expected an MLflow sqlite store at {uri}, got {type(exc).__name__}: {first}"
        ) from None
