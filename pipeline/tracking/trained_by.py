"""Which MLflow run trained a net's weights: the tag a run is found by, and this machine's note of it."""

from __future__ import annotations

from pathlib import Path

import mlflow
import torch

from pipeline.base.files import read_json, write_json
from pipeline.base.weights import weights_checksum
from pipeline.tracking.store import EXPERIMENT, project_root, store_calls

# The checksum of the weights a run trained (weights.weights_checksum), a tag of the run and a key of
# models/<net>.json and of the training's note (record_training_run), which names the run under
# TRAINING_RUN_KEY: evaluate registers that run's model.
WEIGHTS_TAG = "weights_sha256"
TRAINING_RUN_KEY = "mlflow_run_id"


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
