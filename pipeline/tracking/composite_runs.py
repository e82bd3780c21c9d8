"""A composite's MLflow run: a composite trains nothing, so evaluate makes it a run of its own, holding
its model (its nets side by side, exported as a net's is) and tagged with its members' weights, so that
it registers, gets its test figures and an alias like a net's training run (pipeline.tracking.registry).

Its WEIGHTS_TAG is the composite's checksum (composite.composite_checksum): evaluate finds the run of the
same members' weights again through this machine's note of it (trained_by.record_training_run), as it
finds a net's, so evaluating again makes no second run and no second version."""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from pipeline.base.composite import Composite
from pipeline.tracking.export import log_model
from pipeline.tracking.registry import DATA_TAG, NET_TAG, Trained, trained_run
from pipeline.tracking.runs import COLOUR_TAG, training_run
from pipeline.tracking.store import store_calls
from pipeline.tracking.trained_by import WEIGHTS_TAG, record_training_run, recorded_training_run

# The run's tags naming its nets, in the composite's order, and each one's weights (models/<net>.json's checksum).
MEMBERS_TAG = "composite_of"
MEMBER_WEIGHTS_TAG = "member.{net}." + WEIGHTS_TAG


def composite_tags(name: str, weights: dict[str, str], checksum: str, data_hash: str) -> dict[str, str]:
    """The tags of composite `name`'s run: those a net's training run has that registry reads (net,
    weights, data) and its members with their weights (`weights`, by member, in the composite's order)."""
    return {NET_TAG: name, WEIGHTS_TAG: checksum, DATA_TAG: data_hash, MEMBERS_TAG: ",".join(weights),
            **{MEMBER_WEIGHTS_TAG.format(net=member): sha for member, sha in weights.items()}}


def composite_run(folder: str, name: str, weights: dict[str, str], checksum: str, seed: int, data_hash: str,
                  model: Composite, faces: np.ndarray, colour: str, generated: list[str]) -> Trained:
    """The run of composite `name` of these members' weights under `seed`: the one noted on this machine,
    if the store still has it, or a new one with the composite's model (export.log_model, exported from
    `faces`, uint8 (n, 96, 96)), noted once the model is logged. A noted run tagged otherwise (another
    net, other weights) is refused in one line (registry.trained_run), a store that fails too."""
    noted = recorded_training_run(folder, name, checksum)
    if noted is not None and _active(noted):
        return Trained(name, trained_run(Trained(name, noted, checksum)).info.run_id, checksum)
    params = {"net": name, "seed": seed, MEMBERS_TAG: ",".join(weights)}
    tags = {**composite_tags(name, weights, checksum, data_hash), COLOUR_TAG: colour}
    with training_run(name, params, tags, generated) as run:
        with store_calls(f"{name}'s model was not logged to run {run.info.run_id}"):
            log_model(model, faces)
    record_training_run(folder, name, checksum, run.info.run_id)
    return Trained(name, run.info.run_id, checksum)


def _active(run_id: str) -> bool:
    """Whether the store has the run and has not deleted it; a store that fails is a TrackingError."""
    with store_calls(f"run {run_id} was not read"):
        try:
            return mlflow.MlflowClient().get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            return False
