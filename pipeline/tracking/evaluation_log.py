"""The evaluation's figures, files and test data, added to each net's own training run."""

from __future__ import annotations

import mlflow
from mlflow.entities import DatasetInput, Metric
from mlflow.exceptions import MlflowException
from mlflow.utils.time import get_current_time_millis

from pipeline.tracking.store import TrackingError


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
