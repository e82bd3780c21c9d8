"""MLflow runs: a training's run (nesting, params, tags, datasets), its model, evaluation figures
added to it, and finding the run that trained a model file."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import DatasetInput, InputTag, Metric
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking.context.registry import resolve_tags
from mlflow.types import ColSpec, DataType, Schema, TensorSpec
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from mlflow.utils.time import get_current_time_millis

from pipeline.base.files import read_json, write_json
from pipeline.base.weights import weights_checksum
from pipeline.faces.data import unscale_keypoints
from pipeline.faces.kaggle import IMAGE_SIZE, KEYPOINT_COLUMNS
from pipeline.faces.synthetic import render_faces
from pipeline.tracking import pyfunc_model
from pipeline.tracking.store import (EXPERIMENT, PREFLIGHT_TIMEOUT, TrackingError, environment_set, set_experiment,
                                     project_root, store_calls)

# The checksum of the weights a run trained (weights.weights_checksum), a tag of the run and a key of
# models/<net>.json and of the training's note (record_training_run), which names the run under
# TRAINING_RUN_KEY: evaluate registers that run's model.
WEIGHTS_TAG = "weights_sha256"
TRAINING_RUN_KEY = "mlflow_run_id"
# The portions of the prepared faces a run uses, by the context MLflow shows them under.
PORTIONS = {"training": "train", "validation": "valid", "test": "test"}
# The lock a run's training held, as host:absolute path (lock_tag): a run still RUNNING under the lock
# that a new training of its net holds was left by a process that died (close_dead_runs).
LOCK_TAG = "training_lock"
# The run's description in MLflow's UI.
NOTE_TAG = "mlflow.note.content"
# Where the faces come from: a CSV in the layout of Kaggle's training.csv, keypoints in pixels, some missing.
CSV_SCHEMA = Schema([*(ColSpec(DataType.double, column, required=False) for column in KEYPOINT_COLUMNS),
                     ColSpec(DataType.string, "Image")])
# The logged model's: faces of 8-bit gray levels (uint8: every value 0..255 is one) in, keypoints in pixels out.
MODEL_SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, IMAGE_SIZE, IMAGE_SIZE))]),
    outputs=Schema([ColSpec(DataType.float, column) for column in KEYPOINT_COLUMNS]),
)
# The DVC experiment of a run outside any (a plain `dvc repro`, or a stage run by hand): the work tree's.
WORKSPACE = "workspace"
# The run tag MLflow's UI draws a run in (charts, runs table), a CSS colour: a net's runs keep its colour.
COLOUR_TAG = "mlflow.runColor"

# The Python packages MLflow's system metrics need on a GPU machine, by the module they import.
SYSTEM_METRICS_PACKAGES = {"psutil": "psutil", "pynvml": "nvidia-ml-py"}


def git_state(generated: list[str]) -> tuple[str, bool | None]:
    """The commit and whether tracked files differ from it; ("unknown", None) where git fails (no
    repository, no git, too few file descriptors): a failure says nothing of the files.

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
        return "unknown", None
    return commit, bool(changes.strip())


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

    `inputs` are the data it trains on (see faces_inputs); a training on CUDA also logs MLflow's
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
    with _running(run_id, params, inputs, _system_metrics(device)) as active:
        yield active



def lock_tag(lock: Path) -> str:
    """LOCK_TAG's value for a training that holds `lock`: one lock file on one machine."""
    return f"{socket.gethostname()}:{Path(lock).resolve()}"


def close_dead_runs(net_name: str, lock: Path, live: mlflow.entities.RunInfo) -> list[str]:
    """Mark KILLED, with a note saying why, the other runs of `net_name` still RUNNING that a training
    holding `lock` started; returns their ids. The caller, whose run is `live`, holds `lock`, so their
    processes no longer do: they died (kill -9, a lost machine) without ending their runs, and no
    checkpoint continues them (the live run would be theirs). The UI then shows one live run per net.

    Runs of other nets, and those of trainings under another lock (another project, a queued
    experiment's copy, another machine), whose processes may be alive, are left as they are.
    """
    client = mlflow.MlflowClient()
    with store_calls(f"the dead runs of {net_name} were not marked killed"):
        running = client.search_runs([live.experiment_id],
                                     filter_string=f"tags.net = '{net_name}' AND attributes.status = 'RUNNING'")
        dead = [run for run in running
                if run.data.tags.get(LOCK_TAG) == lock_tag(lock) and run.info.run_id != live.run_id]
        for run in dead:
            client.set_tag(run.info.run_id, NOTE_TAG, (
                f"KILLED: the process of this training of {net_name} ended without ending its run (a kill -9 or a "
                f"lost machine), and no checkpoint continued it. Marked so on {time.strftime('%Y-%m-%d %H:%M:%S')} "
                f"by the next training of {net_name}, run {live.run_id}, on taking the lock {lock} this one held."))
            client.set_terminated(run.info.run_id, "KILLED", end_time=_last_logged(client, run))
    return [run.info.run_id for run in dead]


def _last_logged(client: mlflow.MlflowClient, run: mlflow.entities.Run) -> int:
    """When a dead run last logged a figure (its start if none): its end, so that the UI shows how long
    it lived rather than until it was found dead."""
    return max([run.info.start_time, *(point.timestamp for key in run.data.metrics
                                       for point in client.get_metric_history(run.info.run_id, key))])


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


def log_model(model: torch.nn.Module) -> None:
    """Log the net to the active run as an MLflow model that speaks pixels and loads on any machine.

    The model (pyfunc_model.py, MLflow's "model from code") takes 96x96 faces of 8-bit gray levels
    and returns the 30 keypoints in pixels under Kaggle's column names. The net is exported with
    its conversions from levels and to pixels (PixelNet), so that the served model converts as the
    pipeline does and needs no code of the project; torch.export fixes the device of the weights,
    so the copy exported is on the CPU, wherever the net trained.
    """
    faces, _ = render_faces(2, seed=0, missing_fraction=0.0)
    # MLflow checks the input example by loading the model back: no progress bars among the epochs' lines.
    with tempfile.TemporaryDirectory() as folder, environment_set(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):
        mlflow.pyfunc.log_model(
            name="model",
            python_model=pyfunc_model.__file__,
            artifacts=_model_artifacts(model, faces, Path(folder)),
            signature=MODEL_SIGNATURE,
            input_example=faces[:1],
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}",
                              f"pandas=={pd.__version__}"],
        )


class PixelNet(torch.nn.Module):
    """The net from uint8 faces (n, 96, 96) to keypoints in pixels: the conversions of images_of and
    unscale_keypoints around it, in float32 as pipeline.predict computes them."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        return unscale_keypoints(self.net((faces.to(torch.float32) / 255).unsqueeze(1)))


def _model_artifacts(model: torch.nn.Module, faces: np.ndarray, folder: Path) -> dict[str, str]:
    """The exported PixelNet and the output columns' names, as files in `folder`, by artifact name.

    Exported from two faces with a dynamic batch dimension: from one, torch.export would fix the batch to 1.
    """
    net = PixelNet(copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format).eval())
    exported = torch.export.export(net, (torch.from_numpy(faces),), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    paths = {pyfunc_model.NET_ARTIFACT: folder / "net.pt2", pyfunc_model.COLUMNS_ARTIFACT: folder / "columns.json"}
    torch.export.save(exported, paths[pyfunc_model.NET_ARTIFACT])
    paths[pyfunc_model.COLUMNS_ARTIFACT].write_text(json.dumps(list(KEYPOINT_COLUMNS)))
    return {name: str(path) for name, path in paths.items()}


def run_of_weights(net_name: str, model: torch.nn.Module) -> mlflow.entities.Run | None:
    """The latest active run of the experiment that trained `net_name` to these very weights; None if the
    store has none (the model was trained against another store, or restored by DVC from elsewhere).

    A training that gives the same weights again (the same code, params and data) tags its run the
    same: the latest is the one whose model and files the workspace holds.
    """
    with store_calls(f"the run that trained {net_name} was not looked up"):
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


def training_record(folder: str, net: str, weights: str) -> Path:
    """Where record_training_run notes the run of these weights: in the workspace, also for an
    experiment trained in a copy of it, so that `dvc exp apply` finds the run of the weights it brings."""
    return project_root() / folder / f"{net}-{weights[:16]}.json"


def record_training_run(folder: str, net: str, weights: str, run_id: str) -> None:
    """Which MLflow run trained these weights of the net (a store that lacks the run says so when asked).

    A note on this machine, git-ignored like the store it points into: models/<net>.json, which git
    tracks, stays the same bytes whichever run trained the weights (a fresh clone's `dvc repro`
    leaves the committed files as they are), and evaluate and promote find the run without
    searching the store by tags, which anyone who can write to a shared store could plant.
    """
    write_json(training_record(folder, net, weights), {"net": net, WEIGHTS_TAG: weights, TRAINING_RUN_KEY: run_id})


def recorded_training_run(folder: str, net: str, weights: str) -> str | None:
    """The run record_training_run noted for these weights; None without one (weights trained on
    another machine: a fresh clone's committed weights, say)."""
    path = training_record(folder, net, weights)
    if not path.is_file():
        return None
    record = read_json(path, f"delete it and train {net} again (`dvc repro --force train@{net}`)")
    if record.get(WEIGHTS_TAG) != weights:
        return None
    return record.get(TRAINING_RUN_KEY)
