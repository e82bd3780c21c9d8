"""A training's MLflow run: started or resumed, named, tagged (its commit, its DVC experiment, its user
and source), given its params and datasets, and ended with the training's outcome."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import mlflow
import torch
from mlflow.entities import DatasetInput
from mlflow.exceptions import MlflowException
from mlflow.tracking.context.registry import resolve_tags

from pipeline.tracking.git import git_state
from pipeline.tracking.store import PREFLIGHT_TIMEOUT, environment_set, set_experiment, store_calls
from pipeline.tracking.system_metrics import logs_system_metrics

# The DVC experiment of a run outside any (a plain `dvc repro`, or a stage run by hand): the work tree's.
WORKSPACE = "workspace"
# The run tag MLflow's UI draws a run in (charts, runs table), a CSS colour: a net's runs keep its colour.
COLOUR_TAG = "mlflow.runColor"


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


@contextlib.contextmanager
def training_run(net_name: str, params: dict, tags: dict, generated: list[str],
                 resume_run_id: str | None = None, inputs: list[DatasetInput] | None = None,
                 device: torch.device | None = None) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for one training, named after the net and its DVC experiment (run_name); the given
    run, if it still exists.

    `inputs` are the data it trains on (datasets.faces_inputs); a training on CUDA also logs MLflow's
    system metrics (GPU utilisation and memory among them).
    """
    client = mlflow.MlflowClient()
    with store_calls("no run was started"):
        resumed = _resumable(client, resume_run_id)
        if resumed is None:
            run_id = _new_run(client, net_name, tags, generated)
        else:
            run_id = resumed.info.run_id
            # Params outside the training's fingerprint may have changed since; the run keeps its own.
            params = {key: value for key, value in params.items() if key not in resumed.data.params}
    with _running(run_id, params, inputs, logs_system_metrics(device)) as active:
        yield active


def _new_run(client: mlflow.MlflowClient, net_name: str, tags: dict, generated: list[str]) -> str:
    """`mlflow run` hands its own run to the command through MLFLOW_RUN_ID; a plain start_run()
    would resume and overwrite that run, so the training becomes its child instead.

    create_run adds none of the tags start_run would: MLflow's own (resolve_tags) give the user and
    the command's file, which the UI shows as the run's "Created by" and "Source".
    """
    parent_run_id = os.environ.get("MLFLOW_RUN_ID")
    experiment_id = set_experiment()
    commit, dirty = git_state(generated)
    run_tags = {
        **resolve_tags(),
        "mlflow.source.git.commit": commit,
        "git_commit": commit,
        "git_dirty": "unknown" if dirty is None else str(dirty).lower(),
        "dvc_stage": os.environ.get("DVC_STAGE", ""),
        # Joins the run to `dvc exp show`.
        "dvc_experiment": dvc_experiment(),
        **tags,
    }
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    return client.create_run(experiment_id, run_name=run_name(net_name, dvc_experiment()), tags=run_tags).info.run_id


def dvc_experiment() -> str:
    """The DVC experiment a training belongs to: DVC names every experiment it runs in DVC_EXP_NAME."""
    return os.environ.get("DVC_EXP_NAME") or WORKSPACE


def run_name(net_name: str, experiment: str) -> str:
    """A training run's name, which MLflow's runs list and charts show: the net and its DVC experiment,
    so that the runs of one net in several experiments can be told apart."""
    return f"{net_name} ({experiment})"


@contextlib.contextmanager
def _running(run_id: str, params: dict, inputs: list[DatasetInput] | None,
             system_metrics: bool) -> Iterator[mlflow.ActiveRun]:
    """The run active for the block; FINISHED after it, FAILED on an error, KILLED on Ctrl-C or SIGTERM.

    A store that cannot mark the run FINISHED is a TrackingError, like any other part of the run
    it lacks: running the stage again resumes the run and finishes it.
    """
    with store_calls(f"run {run_id} was not started"):
        # Elsewhere than on CUDA, MLflow's own setting decides (MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING); a
        # resumed run's system metrics go on from its last step.
        active = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics or None)
    try:
        with store_calls(f"the params were not logged to run {run_id}"):
            mlflow.log_params(params)
        # A resumed run logs them again: MLflow keeps a run's input once.
        with store_calls(f"the datasets were not logged to run {run_id}"):
            if inputs:
                mlflow.MlflowClient().log_inputs(run_id, datasets=inputs)
        yield active
    except KeyboardInterrupt:
        _end_after_error("KILLED")
        raise
    except BaseException:
        _end_after_error("FAILED")
        raise
    with store_calls(f"run {run_id} was not marked finished"):
        mlflow.end_run("FINISHED")


def _end_after_error(status: str) -> None:
    """One short try and no second error: the error in flight is the one to report, and a store
    that is down would only delay it. MLflow forgets the active run either way."""
    with environment_set(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(PREFLIGHT_TIMEOUT)), \
            contextlib.suppress(MlflowException):
        mlflow.end_run(status)
