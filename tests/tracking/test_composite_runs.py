"""A composite's MLflow run (pipeline/tracking/composite_runs.py): made once for its nets' weights, with
a model that the registry registers and loads like a net's, answering as its nets side by side."""

import mlflow
import numpy as np
import pytest

from pipeline.base.composite import Composite, combine, composite_checksum, member_columns
from pipeline.base.config import load_config
from pipeline.base.model import KeypointNet
from pipeline.base.weights import weights_checksum
from pipeline.faces.kaggle import KEYPOINT_COLUMNS
from pipeline.faces.synthetic import render_faces
from pipeline.predict import NamedFaces, predict_pixels
from pipeline.tracking import registry
from pipeline.tracking.composite_runs import MEMBERS_TAG, composite_run
from pipeline.tracking.registry import register
from pipeline.tracking.store import connect
from pipeline.tracking.trained_by import WEIGHTS_TAG
from tests.support.composites import COMPOSITE, GROUPS
from tests.support.project import write_params

MODEL_NAME = "facial-keypoints"


@pytest.mark.slow  # a store created and a model logged: 10-20 s
def test_a_composite_is_one_run_and_one_version_whose_model_answers_as_its_nets_side_by_side(tmp_path):
    config = load_config(write_params(tmp_path, {
        **{f"nets.{net}": {"flip": False, "keypoints": list(keypoints)} for net, keypoints in GROUPS.items()},
        "composites": {COMPOSITE: list(GROUPS)}}))
    columns = member_columns(config, COMPOSITE)
    members = [KeypointNet(outputs=len(each)).eval() for each in columns]
    weights = {net: weights_checksum(model) for net, model in zip(GROUPS, members)}
    checksum = composite_checksum(config, COMPOSITE, weights)
    faces, _ = render_faces(4, seed=3, missing_fraction=0.0)
    connect()

    def made():
        return composite_run(str(tmp_path / "training-runs"), COMPOSITE, weights, checksum, 42, "abc",
                             Composite(members, columns).eval(), faces, "#000000", [])

    trained = made()
    assert made() == trained  # evaluated again: the same run
    run = mlflow.MlflowClient().get_run(trained.run_id)
    assert run.data.tags[MEMBERS_TAG] == "eyes,rest" and run.data.tags[WEIGHTS_TAG] == checksum
    assert all(run.data.tags[f"member.{net}.{WEIGHTS_TAG}"] == sha for net, sha in weights.items())
    version = register(MODEL_NAME, trained, 1.5)
    assert register(MODEL_NAME, trained, 1.5).version == version.version
    assert (version.tags["net"], version.tags["seed"]) == (COMPOSITE, "42")
    loaded = registry.load(f"models:/{MODEL_NAME}/{version.version}")  # its checks (check_model) pass
    served = loaded.model.predict(faces)
    assert list(served.columns) == list(KEYPOINT_COLUMNS)
    side_by_side = combine(columns, [predict_pixels(net, NamedFaces([], faces))
                                     for net in members])
    assert np.array_equal(served.to_numpy(), side_by_side)
    # A composite of other weights is another run.
    assert composite_checksum(config, COMPOSITE, {**weights, "eyes": "0" * 64}) != checksum
