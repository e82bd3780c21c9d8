"""The tracking store: where it is, the check that it answers before any work, and the one-line
errors of a store that fails."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterator

import mlflow
from filelock import FileLock
from mlflow.exceptions import MlflowException

from pipeline.base.errors import PipelineError

EXPERIMENT = "facial-keypoints"
# MLflow 3 marks an experiment of model trainings, as opposed to GenAI apps (traces, token usage), with
# this tag. The UI of 3.17.2 opens an experiment as its sidebar's GenAI/Model training switch says instead.
KIND_TAG = "mlflow.experimentKind"
KIND = "custom_model_development"

# MLflow's own default store, but always in the project's root (see tracking_uri).
DEFAULT_STORE = "mlflow.db"
SQLITE_PREFIX = "sqlite:///"

# Seconds the preflight waits for a tracking server, instead of minutes of retries.
PREFLIGHT_TIMEOUT = 10
# MLflow's defaults (7 retries, backoff factor 2, 120 s per request) let one request to a dead
# server take 8 minutes. The stages' own: a server that refuses connections fails a request in
# about 3 s, one that does not answer in about 93 s (3 tries of 30 s, time enough for a server to
# store a 32 MB model before it answers). A user's own values in the environment win.
HTTP_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


class TrackingError(PipelineError):
    """The tracking store refused something; the caller decides whether that is fatal."""


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, with a relative SQLite path (and the default store) in the project's root.

    `dvc exp run --queue` runs each experiment in a temporary copy of the repository, and a path
    relative to the working directory would put the runs in that copy, deleted with it. DVC tells
    every stage the project's root in DVC_ROOT, the original one for queued experiments too.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or SQLITE_PREFIX + DEFAULT_STORE
    database = sqlite_file(uri)
    if database is None or database.is_absolute():
        return uri
    root = Path(os.environ.get("DVC_ROOT") or Path.cwd())
    return uri.replace(str(database), str((root / database).resolve()), 1)


def store_exists() -> bool:
    """False for a SQLite store whose file is not there yet: connect() would create it."""
    database = sqlite_file(tracking_uri())
    return database is None or database.exists()


def sqlite_file(uri: str) -> Path | None:
    """The database file of a SQLite URI (relative as written), None for any other store."""
    if not uri.startswith(SQLITE_PREFIX):
        return None
    path = uri.removeprefix(SQLITE_PREFIX).partition("?")[0]
    return None if path == ":memory:" else Path(path)


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Serialise the creation of a SQLite store: two processes creating its tables at once fail."""
    database = sqlite_file(uri)
    if database is None:
        yield
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(database.with_name(database.name + ".lock")):
        yield


@contextlib.contextmanager
def environment_set(**values: str) -> Iterator[None]:
    """MLflow reads some settings only from environment variables: set them for the block alone."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def connect() -> str:
    """Point MLflow at the project's store and check that it answers, before any work is done.

    Returns the tracking URI. A store that cannot be reached fails here, in seconds, rather than
    after hours of training; every later request of the stage waits as HTTP_SETTINGS say.
    """
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    for name, value in HTTP_SETTINGS.items():
        os.environ.setdefault(name, value)
    try:
        # MLflow retries HTTP requests for minutes; a preflight should fail in seconds instead.
        with store_lock(uri), environment_set(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
                                              MLFLOW_HTTP_REQUEST_TIMEOUT=str(PREFLIGHT_TIMEOUT)):
            set_experiment()
    except Exception as error:  # noqa: BLE001 - whatever the store's client raises, the store is unusable
        raise TrackingError(f"MLflow tracking store {uri} is not usable: {reason(error)}") from None
    return uri


def reason(error: Exception) -> str:
    """The operating system's words when it has some ("Connection refused"), the HTTP client's for a
    server that does not answer ("Read timed out. (read timeout=30)"), else the first 200 characters."""
    text = " ".join(str(error).split())
    cause = re.search(r"\[Errno -?\d+\] [^'\")\]]+|[^:'\"(]*timed out\. \(\w+ timeout=[\d.]+\)", text)
    return cause.group(0).strip() if cause else text[:200] or type(error).__name__


def set_experiment() -> str:
    """The project's experiment, made the active one (created, tagged as model training, if new); its id."""
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        try:
            mlflow.create_experiment(EXPERIMENT, artifact_location=_artifact_location(mlflow.get_tracking_uri()),
                                     tags={KIND_TAG: KIND})
        except MlflowException as error:
            # Another process created it between the lookup and the create: use that one.
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    experiment = mlflow.set_experiment(EXPERIMENT)
    # An experiment created before the tag existed, or by `mlflow run`; a kind a user chose is kept.
    if KIND_TAG not in experiment.tags:
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, KIND_TAG, KIND)
    return experiment.experiment_id


def _artifact_location(uri: str) -> str | None:
    """Beside a SQLite store's file; MLflow's default, ./mlruns, would follow the working directory
    into the temporary copies of queued experiments. A server chooses its own (None)."""
    database = sqlite_file(uri)
    return str(database.parent / "mlruns" / EXPERIMENT) if database and database.is_absolute() else None


def store_failure(error: Exception, unlogged: str) -> TrackingError:
    """One line: the store, the cause, and what it has not got."""
    return TrackingError(f"MLflow tracking store {mlflow.get_tracking_uri()} failed ({reason(error)}): {unlogged}")


@contextlib.contextmanager
def store_calls(unlogged: str) -> Iterator[None]:
    """Whatever the store's client raises (it wraps every failure in an MlflowException) as one line."""
    try:
        yield
    except MlflowException as error:
        raise store_failure(error, unlogged) from None
