"""The one MLflow callback of the training loop: it reads the history and logs every key of it."""

from __future__ import annotations

import queue
import threading

import mlflow
import numpy as np
import torch
from mlflow.entities import LoggedModelStatus, Metric
from mlflow.utils.time import get_current_time_millis

from pipeline.base.weights import weights_checksum
from pipeline.tracking.export import log_model
from pipeline.tracking.store import TrackingError, reason, store_calls, store_failure
from pipeline.tracking.trained_by import WEIGHTS_TAG
from pipeline.training.loop import Callback


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

    Why a thread of its own rather than MLflow's asynchronous logging (`log_batch(...,
    synchronous=False)`): MLflow's queue also batches rows in the background, but a batch that
    fails is dropped with an error in its log, and its failure shows only to whoever waits on the
    operation. Keeping the rows and trying again while the training goes on is what it lacks, and
    what this thread adds; the requests themselves are MLflow's synchronous `log_batch`.
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
            with store_calls(f"the epochs of run {self.run_id} could not be read"):
                self.logged = {point.step for point in self.client.get_metric_history(self.run_id, key)}
        for row in trainer.history:
            self._send(row)

    def on_epoch_finished(self, trainer, history: list[dict]) -> None:
        self._send(history[-1])

    def log_model(self, model: torch.nn.Module, example_faces: np.ndarray) -> None:
        """The trained net, unless the run has it: a rerun after a failure past this point logs no second one.

        Then the run is tagged with the weights' checksum, which run_of_weights finds it by.
        """
        active = mlflow.active_run()
        if active is None or active.info.run_id != self.run_id:
            raise TrackingError(f"the model was not logged to run {self.run_id}: it is no longer the active run")
        with store_calls(f"the model was not logged to run {self.run_id}"):
            if not self._has_model():
                log_model(model, example_faces)
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
            print(f"warning: MLflow tracking store {mlflow.get_tracking_uri()} failed ({reason(error)}): "
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
            raise store_failure(self._failure, f"{_epochs(steps)} not logged to run {self.run_id}")

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
