"""The registry's aliases follow the workspace: an experiment run in a temporary copy registers its
versions and moves no alias, `python -m pipeline.promote` points them at the workspace's models after
`dvc exp apply`, predict says when an alias is not the workspace's, and two projects sharing one
tracking server keep their own."""

import json
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.base.weights import load_model
from pipeline.faces.kaggle import KEYPOINT_COLUMNS
from pipeline.predict import NamedFaces, predict_pixels
from tests.support.project import copy_project, make_project, run, set_params
from tests.support.trainings import trained_run_of
from tests.tracking.test_tracking import tracking_server  # noqa: F401 - a fixture: a real `mlflow server`

# Real experiments, trainings and servers.
pytestmark = pytest.mark.slow

MODEL = "facial-keypoints"


def aliases(client, model=MODEL):
    return {alias: int(version) for alias, version in client.get_registered_model(model).aliases.items()}


def predicted(project, face, net):
    """predict's keypoints of one face by `net` (a net or a models:/ URI), and its warnings."""
    output = project / "predicted.csv"
    result = run(project, sys.executable, "-m", "pipeline.predict", str(face), "--net", net, "--output", str(output))
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    return pd.read_csv(output)[list(KEYPOINT_COLUMNS)].to_numpy()[0], warnings


def test_a_temporary_experiment_moves_no_alias_and_promote_points_them_at_the_applied_models(reproduced, tmp_path,
                                                                                          monkeypatch):
    project = copy_project(reproduced, tmp_path / "project")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    before = aliases(client)
    assert before.keys() == {"net4", "net5", "champion"}
    run(project, "dvc", "exp", "run", "--temp", "-n", "sweep", "-S", "train.max_epochs=1")
    assert aliases(client) == before
    swept = {version.tags["net"]: version for version in client.search_model_versions(f"name = '{MODEL}'")
             if version.tags.get("dvc_experiment") == "sweep"}
    assert swept.keys() == {"net4", "net5"}
    assert not {int(version.version) for version in swept.values()} & {*before.values()}

    run(project, "dvc", "exp", "apply", "sweep")
    assert "up to date" in run(project, "dvc", "repro").stdout  # evaluate does not run again
    face = tmp_path / "face.png"
    with np.load(project / "data/prepared/test.npz") as prepared:
        Image.fromarray(prepared["pixels"][0, 0]).save(face)
    image = np.asarray(Image.open(face))[None]
    workspace = predict_pixels(load_model(project / "models/net5.pt"), NamedFaces([str(face)], image))[0]
    _, warnings = predicted(project, face, f"models:/{MODEL}@net5")
    assert warnings == [f"warning: models:/{MODEL}@net5 is version {before['net5']}, whose weights are not this "
                        "workspace's model of net5: run `python -m pipeline.promote` to point the aliases at the "
                        "workspace's models"]

    promoted = run(project, sys.executable, "-m", "pipeline.promote").stdout.splitlines()
    results = json.loads((project / "metrics/evaluate.json").read_text())
    best = min(("net4", "net5"), key=lambda net: results[net]["test_rmse_px"])
    after = {net: int(swept[net].version) for net in ("net4", "net5")}
    assert aliases(client) == {**after, "champion": after[best]}
    assert promoted[:2] == [f"promote: models:/{MODEL}@{net} -> version {after[net]}" for net in ("net4", "net5")]
    served, warnings = predicted(project, face, f"models:/{MODEL}@net5")
    assert warnings == []
    # predict's 4 decimals: the registered model and the workspace's weights agree to their last digit.
    np.testing.assert_allclose(served, workspace, rtol=0, atol=1e-4)


def test_two_projects_on_one_tracking_server_keep_their_own_aliases(tmp_path, tracking_server):  # noqa: F811
    one_net = {"nets": {"net4": {"flip": False}}, "train.max_epochs": 1}
    first, second = (make_project(tmp_path / name, one_net) for name in ("first", "second"))
    run(first, "dvc", "repro")
    client = mlflow.MlflowClient()
    first_aliases = aliases(client)
    assert first_aliases.keys() == {"net4", "champion"}

    evaluated = run(second, "dvc", "repro")  # the same registered model name: refused, and the first's kept
    warnings = [line for line in evaluated.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == [f"warning: net4: model not registered in MLflow (the registered model {MODEL} of "
                        f"{tracking_server.url} belongs to the project at {first_owner(client)}: give this project a "
                        "name of its own in params.yaml (registry.model_name), or, if that project moved here, "
                        "delete the model's tag project)"]
    assert aliases(client) == first_aliases and len(client.search_model_versions(f"name = '{MODEL}'")) == 1

    set_params(second, {"registry.model_name": "second-keypoints"})
    run(second, "dvc", "repro")
    second_run = trained_run_of(second, "net4")
    assert client.get_model_version_by_alias("second-keypoints", "champion").run_id == second_run
    assert aliases(client) == first_aliases


def first_owner(client):
    return client.get_registered_model(MODEL).tags["project"]
