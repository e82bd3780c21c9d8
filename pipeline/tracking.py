"""MLflow: the experiment, the training run (nesting, params, tags, datasets) and the one logger callback.

Nothing else in the project calls MLflow while training; the logger only reads the history.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import importlib.util
import os
import queue
import re
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import mlflow
import mlflow.pytorch
import numpy as np
import torch
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import DatasetInput, InputTag, LoggedModelStatus, Metric
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.types import ColSpec, DataType, Schema
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from mlflow.utils.time import get_current_time_millis

from pipeline.callbacks import Callback
from pipeline.errors import PipelineError
from pipeline.kaggle import IMAGE_SIZE, KEYPOINT_COLUMNS
from pipeline.weights import weights_checksum

EXPERIMENT = "facial-keypoints"
# MLflow 3 marks an experiment of model trainings, as opposed to GenAI apps (traces, token usage), with
# this tag. The UI of 3.17.2 opens an experiment as its sidebar's GenAI/Model training switch says instead.
KIND_TAG = "mlflow.experimentKind"
KIND = "custom_model_development"
# The checksum of the weights a run trained (weights.weights_checksum): how a model file finds its
# run. models/ records no run id, so that training the same code again leaves it byte-identical.
WEIGHTS_TAG = "weights_sha256"
# The portions of the prepared faces a run uses, by the context MLflow shows them under.
PORTIONS = {"training": "train", "validation": "valid", "test": "test"}
# Where the faces come from: a CSV in the layout of Kaggle's training.csv, keypoints in pixels, some missing.
CSV_SCHEMA = Schema([*(ColSpec(DataType.double, column, required=False) for column in KEYPOINT_COLUMNS),
                     ColSpec(DataType.string, "Image")])
# The Python packages MLflow's system metrics need on a GPU machine, by the module they import.
SYSTEM_METRICS_PACKAGES = {"psutil": "psutil", "pynvml": "nvidia-ml-py"}
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


def git_state(generated: list[str]) -> tuple[str, bool]:
    """The commit and whether tracked files differ from it.

    dvc.lock and the `generated` paths (the pipeline's own outputs, committed for reference) are
    rewritten by the very run being tracked, so changes there do not make the tree dirty.
    """
    excluded = [f":(exclude){path}" for path in ["dvc.lock", *generated]]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *excluded],
            capture_output=True, text=True, check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown", True
    return commit, bool(changes.strip())


class TrackingError(PipelineError):
    """The tracking store refused something; the caller decides whether that is fatal."""


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, with a relative SQLite path (and the default store) in the project's root.

    `dvc exp run --queue` runs each experiment in a temporary copy of the repository, and a path
    relative to the working directory would put the runs in that copy, deleted with it. DVC tells
    every stage the project's root in DVC_ROOT, the original one for queued experiments too.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or SQLITE_PREFIX + DEFAULT_STORE
    database = _sqlite_file(uri)
    if database is None or database.is_absolute():
        return uri
    root = Path(os.environ.get("DVC_ROOT") or Path.cwd())
    return uri.replace(str(database), str((root / database).resolve()), 1)


def store_exists() -> bool:
    """False for a SQLite store whose file is not there yet: connect() would create it."""
    database = _sqlite_file(tracking_uri())
    return database is None or database.exists()


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a SQLite URI (relative as written), None for any other store."""
    if not uri.startswith(SQLITE_PREFIX):
        return None
    path = uri.removeprefix(SQLITE_PREFIX).partition("?")[0]
    return None if path == ":memory:" else Path(path)


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise the creation of a SQLite store: two processes creating its tables at once fail."""
    database = _sqlite_file(uri)
    if database is None:
        yield
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
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
        with _store_lock(uri), _environment(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
                                            MLFLOW_HTTP_REQUEST_TIMEOUT=str(PREFLIGHT_TIMEOUT)):
            _set_experiment()
    except Exception as error:  # noqa: BLE001 - whatever the store's client raises, the store is unusable
        raise TrackingError(f"MLflow tracking store {uri} is not usable: {_reason(error)}") from None
    return uri


def _reason(error: Exception) -> str:
    """The operating system's words when it has some ("Connection refused"), the HTTP client's for a
    server that does not answer ("Read timed out. (read timeout=30)"), else the first 200 characters."""
    text = " ".join(str(error).split())
    cause = re.search(r"\[Errno -?\d+\] [^'\")\]]+|[^:'\"(]*timed out\. \(\w+ timeout=[\d.]+\)", text)
    return cause.group(0).strip() if cause else text[:200] or type(error).__name__


def _set_experiment() -> str:
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
    database = _sqlite_file(uri)
    return str(database.parent / "mlruns" / EXPERIMENT) if database and database.is_absolute() else None


def _resumable(client: mlflow.MlflowClient, run_id: str | None) -> mlflow.entities.Run | None:
    """The run to continue, if the store still has it and it is not deleted."""
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        # Only a run the store does not know is gone; a store that fails must not start a second run.
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return None
    return run if run.info.lifecycle_stage == "active" else None


def _store_failure(error: Exception, unlogged: str) -> TrackingError:
    """One line: the store, the cause, and what it has not got."""
    return TrackingError(f"MLflow tracking store {mlflow.get_tracking_uri()} failed ({_reason(error)}): {unlogged}")


@contextlib.contextmanager
def _store_calls(unlogged: str) -> Iterator[None]:
    """Whatever the store's client raises (it wraps every failure in an MlflowException) as one line."""
    try:
        yield
    except MlflowException as error:
        raise _store_failure(error, unlogged) from None


@contextlib.contextmanager
def training_run(net_name: str, params: dict, tags: dict, generated: list[str],
                 resume_run_id: str | None = None, inputs: list[DatasetInput] | None = None,
                 device: torch.device | None = None) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for one training, named after the net; the given run, if it still exists.

    `inputs` are the data it trains on (see faces_inputs); a training on CUDA also logs MLflow's
    system metrics (GPU utilisation and memory among them).
    """
    client = mlflow.MlflowClient()
    with _store_calls("no run was started"):
        resumed = _resumable(client, resume_run_id)
        if resumed is None:
            run_id = _new_run(client, net_name, tags, generated)
        else:
            run_id = resumed.info.run_id
            # Params outside the training's fingerprint may have changed since; the run keeps its own.
            params = {key: value for key, value in params.items() if key not in resumed.data.params}
    with _running(run_id, params, inputs, _system_metrics(device)) as active:
        yield active


def faces_inputs(summary: dict, **faces: int) -> list[DatasetInput]:
    """The portions of the prepared faces a run uses, by context (training=1632, ...), as MLflow dataset
    inputs: the CSV they came from, the prepared data's hash (prepare's summary), the CSV's columns.

    No arrays: DVC keeps those. The number of faces is in the name, since MLflow keeps one dataset per
    name and digest: a training with another valid_fraction uses other datasets of the same data.
    """
    return [
        DatasetInput(
            MetaDataset(LocalArtifactDatasetSource(summary["source"]), name=f"{PORTIONS[context]}: {count} faces",
                        digest=summary["data_hash"], schema=CSV_SCHEMA)._to_mlflow_entity(),
            tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)],
        )
        for context, count in faces.items()
    ]


def _system_metrics(device: torch.device | None) -> bool:
    """Whether the run logs MLflow's system metrics: on CUDA, where they show how busy the GPU is, and
    if the packages they need are there (else one line says which are missing)."""
    if device is None or device.type != "cuda":
        return False
    missing = [package for module, package in SYSTEM_METRICS_PACKAGES.items()
               if importlib.util.find_spec(module) is None]
    if missing:
        print(f"warning: no system metrics in MLflow: {' and '.join(missing)} not installed "
              "(pip install -r requirements.txt)", flush=True)
    return not missing


def _new_run(client: mlflow.MlflowClient, net_name: str, tags: dict, generated: list[str]) -> str:
    """`mlflow run` hands its own run to the command through MLFLOW_RUN_ID; a plain start_run()
    would resume and overwrite that run, so the training becomes its child instead."""
    parent_run_id = os.environ.get("MLFLOW_RUN_ID")
    experiment_id = _set_experiment()
    commit, dirty = git_state(generated)
    run_tags = {
        "mlflow.source.git.commit": commit,
        "git_commit": commit,
        "git_dirty": str(dirty).lower(),
        "dvc_stage": os.environ.get("DVC_STAGE", ""),
        # Joins the run to `dvc exp show`: DVC names every experiment it runs in this variable.
        "dvc_experiment": os.environ.get("DVC_EXP_NAME", ""),
        **tags,
    }
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    return client.create_run(experiment_id, run_name=net_name, tags=run_tags).info.run_id


@contextlib.contextmanager
def _running(run_id: str, params: dict, inputs: list[DatasetInput] | None,
             system_metrics: bool) -> Iterator[mlflow.ActiveRun]:
    """The run active for the block; FINISHED after it, FAILED on an error, KILLED on Ctrl-C or SIGTERM.

    A store that cannot mark the run FINISHED is a TrackingError, like any other part of the run
    it lacks: running the stage again resumes the run and finishes it.
    """
    with _store_calls(f"run {run_id} was not started"):
        # Elsewhere than on CUDA, MLflow's own setting decides (MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING); a
        # resumed run's system metrics go on from its last step.
        active = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics or None)
    try:
        with _store_calls(f"the params were not logged to run {run_id}"):
            mlflow.log_params(params)
        # A resumed run logs them again: MLflow keeps a run's input once.
        with _store_calls(f"the datasets were not logged to run {run_id}"):
            if inputs:
                mlflow.MlflowClient().log_inputs(run_id, datasets=inputs)
        yield active
    except KeyboardInterrupt:
        _end_after_error("KILLED")
        raise
    except BaseException:
        _end_after_error("FAILED")
        raise
    with _store_calls(f"run {run_id} was not marked finished"):
        mlflow.end_run("FINISHED")


def _end_after_error(status: str) -> None:
    """One short try and no second error: the error in flight is the one to report, and a store
    that is down would only delay it. MLflow forgets the active run either way."""
    with _environment(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(PREFLIGHT_TIMEOUT)), \
            contextlib.suppress(MlflowException):
        mlflow.end_run(status)


class MlflowLogger(Callback):
    """Log every key of each epoch's history row (step = epoch) and, once the files are written, the model,
    into the MLflow run active when the logger is made (tracking.training_run's).

    A thread writes the rows, so the loop never waits on the store: at most once a second, it
    sends whatever rows have queued up in one request. A store that fails does not stop the
    training: the thread keeps the rows and tries again after 2 s, 4 s, 8 s, ... (at most a
    minute apart), with one warning when the store fails and one when it answers again. Use the
    logger as a context manager: leaving it makes a last try to store every row, however the
    training ended; rows the store still refuses then are a TrackingError. A resumed training
    brings the history of its earlier epochs; those the run lacks (the process died, or the store
    was down, before they were logged) are logged first, and no epoch twice.
    """

    # MLflow takes at most 1000 metrics in one request; whole rows keep each epoch in one transaction.
    ROWS_PER_REQUEST = 100
    SECONDS_BETWEEN_REQUESTS = 1.0
    MAX_SECONDS_BETWEEN_TRIES = 60.0

    def __init__(self):
        # The active run is the one the model is logged to (MLflow's log_model takes no run id): the
        # epochs go to the same one.
        active = mlflow.active_run()
        if active is None:
            raise TrackingError("MlflowLogger logs into the active MLflow run, and none is active")
        self.run_id = active.info.run_id
        self.client = mlflow.MlflowClient()
        self.history: list[dict] = []
        self.logged: set[int] = set()  # the epochs in the run or on their way to it
        self._rows: queue.SimpleQueue[list[Metric]] = queue.SimpleQueue()
        self._unsent: list[list[Metric]] = []  # each epoch's metrics, oldest first, until the store has them
        self._sender: threading.Thread | None = None
        self._flushing = threading.Event()
        self._failure: Exception | None = None  # while the store fails: its last error

    def on_train_begin(self, trainer) -> None:
        self.history = trainer.history
        if trainer.history:
            # Each epoch is logged whole in one request, so any one key tells which epochs are in.
            key = next(key for key in trainer.history[0] if key != "epoch")
            with _store_calls(f"the epochs of run {self.run_id} could not be read"):
                self.logged = {point.step for point in self.client.get_metric_history(self.run_id, key)}
        for row in trainer.history:
            self._send(row)

    def on_epoch_finished(self, trainer, history: list[dict]) -> None:
        self._send(history[-1])

    def log_model(self, model: torch.nn.Module) -> None:
        """The trained net, unless the run has it: a rerun after a failure past this point logs no second one.

        Then the run is tagged with the weights' checksum, which run_of_weights finds it by.
        """
        active = mlflow.active_run()
        if active is None or active.info.run_id != self.run_id:
            raise TrackingError(f"the model was not logged to run {self.run_id}: it is no longer the active run")
        with _store_calls(f"the model was not logged to run {self.run_id}"):
            if not self._has_model():
                log_model(model)
            self.client.set_tag(self.run_id, WEIGHTS_TAG, weights_checksum(model))

    def _has_model(self) -> bool:
        """MLflow marks a logged model READY only once all of it is stored."""
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        models = self.client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{self.run_id}'")
        return any(model.status == LoggedModelStatus.READY for model in models)

    def _send(self, row: dict) -> None:
        # An epoch logged before its checkpoint was written is computed again, identically, on
        # resuming; the run keeps the first.
        if row["epoch"] in self.logged:
            return
        self.logged.add(row["epoch"])
        if self._sender is None:
            self._sender = threading.Thread(target=self._send_rows, name="mlflow logger", daemon=True)
            self._sender.start()
        # Stamped once: a request that reached the store but whose answer was lost is sent again
        # with the very same metrics, which MLflow stores once.
        now = get_current_time_millis()
        self._rows.put([Metric(key, float(value), now, row["epoch"]) for key, value in row.items() if key != "epoch"])

    def _send_rows(self) -> None:
        pause = self.SECONDS_BETWEEN_REQUESTS
        while True:
            # Short epochs (a GPU's take tens of ms) queue up while waiting: one request, one
            # transaction for them all writes a fraction of the bytes of one per epoch.
            last = self._flushing.wait(pause)
            self._take_queued()
            stored = self._store_unsent()
            # A try that failed while the training was ending counts as the last: a second would
            # double the wait on a store that is down.
            if last or (not stored and self._flushing.is_set()):
                return
            # A store that fails is asked less and less often, so that an outage does not cost the run its time.
            pause = self.SECONDS_BETWEEN_REQUESTS if stored else min(2 * pause, self.MAX_SECONDS_BETWEEN_TRIES)

    def _take_queued(self) -> None:
        while not self._rows.empty():
            self._unsent.append(self._rows.get())

    def _store_unsent(self) -> bool:
        """Every row waiting, oldest first; False, and the rows kept, when the store fails."""
        while self._unsent:
            epochs = self._unsent[:self.ROWS_PER_REQUEST]
            try:
                self.client.log_batch(self.run_id, metrics=[metric for epoch in epochs for metric in epoch],
                                      synchronous=True)
            except Exception as error:  # noqa: BLE001 - whatever the store's client raises, tried again later
                self._failed(error)
                return False
            del self._unsent[:len(epochs)]
        self._answered()
        return True

    def _failed(self, error: Exception) -> None:
        if self._failure is None:
            print(f"warning: MLflow tracking store {mlflow.get_tracking_uri()} failed ({_reason(error)}): "
                  "the training goes on, its metrics kept to be sent again", flush=True)
        self._failure = error

    def _answered(self) -> None:
        if self._failure is not None:
            print(f"warning: MLflow tracking store {mlflow.get_tracking_uri()} answers again: "
                  "the metrics kept are logged", flush=True)
        self._failure = None

    def flush(self) -> None:
        """A last try to store every queued row; the rows the store still refuses are a TrackingError."""
        if self._sender is not None:
            self._flushing.set()
            self._sender.join()
            self._sender = None
            self._flushing.clear()
        self._take_queued()  # the rows that came while the store failed its last try
        if self._unsent:
            steps = [epoch[0].step for epoch in self._unsent]
            raise _store_failure(self._failure, f"{_epochs(steps)} not logged to run {self.run_id}")

    def __enter__(self) -> "MlflowLogger":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.flush()
            return
        # A stop between an epoch's end and its row reaching this logger (another callback's hook
        # was running) leaves a finished epoch unsent.
        for row in self.history:
            self._send(row)
        try:
            self.flush()
        except TrackingError:
            pass  # the error in flight is the one to report


def _epochs(steps: list[int]) -> str:
    """The epochs as a reader counts them: "epoch 3", "epochs 3-14" or, with gaps, "epochs 3, 5, 9"."""
    if len(steps) == 1:
        return f"epoch {steps[0]}"
    if steps[-1] - steps[0] == len(steps) - 1:
        return f"epochs {steps[0]}-{steps[-1]}"
    return f"epochs {', '.join(map(str, steps))}"


def log_model(model: torch.nn.Module) -> None:
    """Log the net to the active run as an MLflow PyTorch model that loads on any machine.

    MLflow stores it with torch.export, which fixes the device of the weights: the copy exported
    is on the CPU, wherever the net trained, and MLflow's own check of the input example runs it
    there too (its default on a GPU machine would be the GPU, which the exported weights refuse).
    """
    model = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format).eval()
    # Two faces, not one: torch.export would otherwise specialise the batch dimension to 1.
    example = np.zeros((2, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    with _environment(MLFLOW_DEFAULT_PREDICTION_DEVICE="cpu"):
        mlflow.pytorch.log_model(
            model,
            name="model",
            signature=infer_signature(example, output),
            input_example=example,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
        )


def run_of_weights(net_name: str, model: torch.nn.Module) -> mlflow.entities.Run | None:
    """The latest active run of the experiment that trained `net_name` to these very weights; None if the
    store has none (the model was trained against another store, or restored by DVC from elsewhere).

    A training that gives the same weights again (the same code, params and data) tags its run the
    same: the latest is the one whose model and files the workspace holds.
    """
    with _store_calls(f"the run that trained {net_name} was not looked up"):
        experiment = mlflow.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            return None
        runs = mlflow.MlflowClient().search_runs(
            [experiment.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
            filter_string=f"tags.net = '{net_name}' AND tags.{WEIGHTS_TAG} = '{weights_checksum(model)}'")
    return runs[0] if runs else None


def log_evaluation(run_id: str, metrics: dict[str, float], artifacts: list, inputs: list[DatasetInput]) -> None:
    """Add a net's test figures, files and test data to its own training run, creating no new run.

    Evaluating again logs nothing twice: a figure is logged only if the run's latest value of it
    differs (a changed one becomes the latest), the files replace their namesakes, and MLflow keeps
    a run's input once.
    """
    client = mlflow.MlflowClient()
    now = get_current_time_millis()
    try:
        logged = client.get_run(run_id).data.metrics
        client.log_batch(run_id, metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()
                                          if logged.get(key) != float(value)], synchronous=True)
        client.log_inputs(run_id, datasets=inputs)
        for path in artifacts:
            client.log_artifact(run_id, str(path), artifact_path="evaluation")
    except MlflowException as error:
        raise TrackingError(str(error).splitlines()[0]) from None
