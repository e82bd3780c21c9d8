"""The tracking store: where it is, the check that it answers before any work, and the one-line
errors of a store that fails."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import urllib.parse
from pathlib import Path
from typing import Iterator

import mlflow
from filelock import FileLock
from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
from mlflow.exceptions import MlflowException
from mlflow.utils.uri import is_local_uri

from pipeline.base.errors import PipelineError, is_out_of_memory

EXPERIMENT = "facial-keypoints"
# MLflow 3 marks an experiment of model trainings, as opposed to GenAI apps (traces, token usage), with
# this tag. The UI of 3.17.2 opens an experiment as its sidebar's GenAI/Model training switch says instead.
KIND_TAG = "mlflow.experimentKind"
KIND = "custom_model_development"

# MLflow's own default store, but always in the project's root (see tracking_uri).
DEFAULT_STORE = "mlflow.db"
SQLITE_PREFIX = "sqlite:///"

# The logger that writes a traceback for every SQLite error before MLflow raises it as an exception,
# which the stages report in one line.
SQL_ERRORS_LOGGER = "mlflow.store.db.utils"

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


def project_root() -> Path:
    """The project's root, the original one for a queued or temporary experiment: `dvc exp run --queue`
    runs each experiment in a temporary copy of the repository, and tells every stage the original
    root in DVC_ROOT."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, with a relative SQLite path (and the default store) in the project's root:
    relative to the working directory, a queued experiment's runs would go into its temporary copy,
    deleted with it.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or SQLITE_PREFIX + DEFAULT_STORE
    database = sqlite_file(uri)
    if database is None or database.is_absolute():
        return uri
    return uri.replace(str(database), str(project_root() / database), 1)


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

    Returns the tracking URI. A store that cannot be reached, read or written fails here, in seconds,
    rather than after hours of training; every later request of the stage waits as HTTP_SETTINGS say.
    """
    uri = tracking_uri()
    refuse_file_store(uri)
    mlflow.set_tracking_uri(uri)
    for name, value in HTTP_SETTINGS.items():
        os.environ.setdefault(name, value)
    logging.getLogger(SQL_ERRORS_LOGGER).addFilter(_without_tracebacks)
    try:
        # MLflow retries HTTP requests for minutes; a preflight should fail in seconds instead.
        with store_lock(uri), environment_set(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
                                              MLFLOW_HTTP_REQUEST_TIMEOUT=str(PREFLIGHT_TIMEOUT)):
            experiment = mlflow.get_experiment(set_experiment())
            # A write, so that a store that reads but cannot write (a read-only mlflow.db) fails here
            # too: the kind tag (set_experiment), written again as it is.
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, KIND_TAG, experiment.tags[KIND_TAG])
    except Exception as error:  # noqa: BLE001 - whatever the store's client raises, the store is unusable
        if is_out_of_memory(error):
            raise  # the machine's failure, not the store's: reports_errors names memory
        cause = reason(error)
        raise TrackingError(f"MLflow tracking store {uri} is not usable: {cause}{remedy(uri, cause)}") from None
    check_artifact_folder(uri, experiment.artifact_location)
    return uri


def refuse_file_store(uri: str) -> None:
    """A path (`/tmp/store`, `mlflow.db`, `file:///tmp/store`) names MLflow's file store, which MLflow 3
    refuses in a paragraph: one line saying what to set instead, unless the user allowed the file store."""
    if not is_local_uri(uri) or MLFLOW_ALLOW_FILE_STORE.get():
        return
    path = Path(urllib.parse.urlparse(uri).path)
    database = path if path.suffix == ".db" or path.is_file() else path / DEFAULT_STORE
    raise TrackingError(
        f"MLFLOW_TRACKING_URI={uri} is a path, which MLflow 3 takes for its file store and refuses: set "
        f"MLFLOW_TRACKING_URI={SQLITE_PREFIX}{database} for a SQLite store (or http://host:port for a server)")


def remedy(uri: str, cause: str) -> str:
    """What to do about a SQLite store that fails in the preflight, after a semicolon ("" if unknown)."""
    database = sqlite_file(uri)
    if database is None:
        return ""
    if "not a database" in cause or "malformed" in cause:
        return (f"; {database} is damaged or not an MLflow store: move it aside (`mv {database} {database}.damaged`) "
                "to start a new store, or restore it from a backup")
    if any(words in cause for words in ("readonly", "unable to open", "Read-only file system", "Permission denied")):
        return f"; make {database} and its folder writable, or set MLFLOW_TRACKING_URI to a store you can write"
    return ""


def check_artifact_folder(uri: str, location: str) -> None:
    """Refuse, before any work, a local artifact folder the runs could not use.

    A SQLite store records its experiment's artifact folder as an absolute path (_artifact_location):
    in a project moved elsewhere, the models would go to the old folder, made again where it is
    gone, or fail there after the whole training where it cannot be written.
    """
    database, folder = sqlite_file(uri), _local_folder(location)
    if database is None or folder is None:
        return
    start_afresh = f"move {database} aside (`mv {database} {database}.old`) to start a new store beside it"
    if not folder.exists() and not folder.is_relative_to(database.parent):
        raise TrackingError(f"MLflow tracking store {uri} keeps its artifacts in {folder}, which is gone (the store "
                            f"records absolute paths: was the project moved?); put that folder back, or {start_afresh}")
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TrackingError(f"MLflow tracking store {uri} keeps its artifacts in {folder}, which cannot be written "
                            f"(was the project moved?); make {existing} writable, or {start_afresh}")


def _local_folder(location: str) -> Path | None:
    """The folder of a local artifact location (a path or a file: URI); None for any other."""
    parsed = urllib.parse.urlparse(location)
    return Path(urllib.parse.unquote(parsed.path)).absolute() if parsed.scheme in ("", "file") else None


def _without_tracebacks(record: logging.LogRecord) -> bool:
    """Drop the log records that carry an exception: MLflow raises it too, and the stage reports it."""
    return record.exc_info is None


def reason(error: Exception) -> str:
    """The operating system's words when it has some ("Connection refused"), SQLite's ("attempt to write
    a readonly database"), the HTTP client's for a server that does not answer ("Read timed out.
    (read timeout=30)"), else the first 200 characters or so, cut between words."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    text = " ".join(str(error).split())
    sqlite = re.search(r"\(sqlite3\.\w+\) ([^\[]+)", text)
    if sqlite:
        return sqlite.group(1).strip()
    cause = re.search(r"\[Errno -?\d+\] [^'\")\]]+|[^:'\"(]*timed out\. \(\w+ timeout=[\d.]+\)", text)
    if cause:
        return cause.group(0).strip()
    return (text if len(text) <= 200 else text[:200].rpartition(" ")[0] + " ...") or type(error).__name__


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
