"""MLflow: the training run (nesting, params, tags) and the one logger callback.

Nothing else in the project calls MLflow while training; the logger only reads the history.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import warnings
from typing import Iterator

import mlflow
import mlflow.pytorch
import numpy as np
import torch
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.utils.time import get_current_time_millis

from pipeline.callbacks import Callback
from pipeline.errors import PipelineError
from pipeline.kaggle import IMAGE_SIZE

EXPERIMENT = "facial-keypoints"
EPOCH_METRICS = (
    "train_loss", "valid_loss", "train_valid_ratio", "valid_rmse_px",
    "learning_rate", "momentum", "epoch_seconds",
)


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


@contextlib.contextmanager
def training_run(net_name: str, params: dict, tags: dict, generated: list[str]) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for one training, named after the net.

    `mlflow run` hands its own run to the command through MLFLOW_RUN_ID; a plain start_run()
    would resume and overwrite that run, so the training becomes its child instead.
    """
    parent_run_id = os.environ.get("MLFLOW_RUN_ID")
    experiment_id = mlflow.set_experiment(EXPERIMENT).experiment_id
    commit, dirty = git_state(generated)
    run_tags = {
        "mlflow.source.git.commit": commit,
        "git_commit": commit,
        "git_dirty": str(dirty).lower(),
        "dvc_stage": os.environ.get("DVC_STAGE", ""),
        **tags,
    }
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow.MlflowClient().create_run(experiment_id, run_name=net_name, tags=run_tags)
    with mlflow.start_run(run_id=run.info.run_id) as active:
        mlflow.log_params(params)
        yield active


class MlflowLogger(Callback):
    """Log each epoch's row of the history (step = epoch) and, at the end, the model."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.client = mlflow.MlflowClient()

    def on_epoch_finished(self, trainer, history: list[dict]) -> None:
        row = history[-1]
        now = get_current_time_millis()
        metrics = [Metric(key, float(row[key]), now, row["epoch"]) for key in EPOCH_METRICS]
        self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)

    def on_train_end(self, trainer, history: list[dict]) -> None:
        model = trainer.model
        # Two faces, not one: MLflow exports the model with torch.export, which would otherwise
        # specialise the batch dimension to 1.
        example = np.zeros((2, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
        parameter = next(model.parameters())
        with torch.no_grad():
            output = model(torch.from_numpy(example).to(parameter.device)).cpu().numpy()
        with warnings.catch_warnings():
            # torch.export's note about channels_last weights, which it stores correctly anyway.
            warnings.filterwarnings("ignore", message="No complete tensor found in the group")
            mlflow.pytorch.log_model(
                model,
                name="model",
                signature=infer_signature(example, output),
                input_example=example,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
            )


class TrackingError(PipelineError):
    """The tracking store refused something; the caller decides whether that is fatal."""


def log_evaluation(run_id: str, metrics: dict[str, float], artifacts: list) -> None:
    """Add a net's test figures and pictures to its own training run, creating no new run."""
    client = mlflow.MlflowClient()
    now = get_current_time_millis()
    try:
        client.log_batch(run_id, metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()],
                         synchronous=True)
        for path in artifacts:
            client.log_artifact(run_id, str(path), artifact_path="evaluation")
    except MlflowException as error:
        raise TrackingError(str(error).splitlines()[0]) from None
