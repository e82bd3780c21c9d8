"""The training loop's MLflow logger: every key of each epoch's row, logged with step = epoch."""

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


class MlflowLogger:
    """A training.loop.MetricLogger: log every key of each epoch's row (step = epoch) and, once the files
    are written, the model, into the MLflow run active when the logger is made (tracking.training_run's).

    A thread writes the rows, so the loop never waits on the store: at most once a second, it
    sends whatever rows have queued up in one request. A store that fails does not stop the
    training: the thread keeps the rows and tries again after 2 s, 4 s, 8 s, ... (at most a
    minute apart), with one warning when the store fails and one when it answers again. Use the
    logger as a context manager: leaving it closes it, a last try to store every row, however the
    training ended; rows the store still refuses then are a TrackingError. A resumed training
    hands the rows of its earlier epochs again; those the run lacks (the process died, or the store
    was down, before they were logged) are logged, and no epoch twice.

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

    def __init__(self, resumed: bool = False):
        # The active run is the one the model is logged to (MLflow's log_model takes no run id): the
        # epochs go to the same one.
        active = mlflow.active_run()
        if active is None:
            raise TrackingError("MlflowLogger logs into the active MLflow run, and none is active")
        self.run_id = active.info.run_id
        self.client = mlflow.MlflowClient()
        # The epochs in the run or on their way to it; a resumed run's are asked for with its first row
        # (None until then), a new run has none.
        self.logged: set[int] | None = None if resumed else set()
        self._rows: queue.SimpleQueue[list[Metric]] = queue.SimpleQueue()
        self._unsent: list[list[Metric]] = []  # each epoch's metrics, oldest first, until the store has them
        self._sender: threading.Thread | None = None
        self._flushing = threading.Event()
        self._failure: Exception | None = None  # while the store fails: its last error

    def log_row(self, row: dict, step: int) -> None:
        if self.logged is None:
            self.logged = self._logged_steps(next(key for key in row if key != "epoch"))
        # An epoch logged before its checkpoint was written is computed again, identically, on
        # resuming; the run keeps the first.
        if step in self.logged:
            return
        self.logged.add(step)
        if self._sender is None:
            self._sender = threading.Thread(target=self._send_rows, name="mlflow logger", daemon=True)
            self._sender.start()
        # Stamped once: a request that reached the store but whose answer was lost is sent again
        # with the very same metrics, which MLflow stores once.
        now = get_current_time_millis()
        self._rows.put([Metric(key, float(value), now, step) for key, value in row.items() if key != "epoch"])

    def _logged_steps(self, key: str) -> set[int]:
        """The steps the run has: each epoch is logged whole in one request, so any one key tells."""
        with store_calls(f"the epochs of run {self.run_id} could not be read"):
            return {point.step for point in self.client.get_metric_history(self.run_id, key)}

    def log_model(self, model: torch.nn.Module, example_faces: np.ndarray) -> None:
        """The trained net, with `example_faces` (uint8, as export.example_faces makes them) as its input
        example, unless the run has it: a rerun after a failure past this point logs no second one.

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

    def close(self) -> None:
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
            self.close()
            return
        try:
            self.close()
        except TrackingError:
            pass  # the error in flight is the one to report


def _epochs(steps: list[int]) -> str:
    """The epochs as a reader counts them: "epoch 3", "epochs 3-14" or, with gaps, "epochs 3, 5, 9"."""
    if len(steps) == 1:
        return f"epoch {steps[0]}"
    if steps[-1] - steps[0] == len(steps) - 1:
        return f"epochs {steps[0]}-{steps[-1]}"
    return f"epochs {', '.join(map(str, steps))}"
