"""The Model Registry and the served model: the versions `dvc repro` registers, their aliases, and the
champion loaded by MLflow, served by `mlflow models serve` and used by pipeline.predict, all in pixels."""

import json
import os
import subprocess
import sys
import time
import urllib.request

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.base.model import KeypointNet
from pipeline.base.weights import load_model, weights_checksum
from pipeline.faces.kaggle import KEYPOINT_COLUMNS
from pipeline.predict import NamedFaces, predict_pixels
from pipeline.tracking.export import MODEL_SIGNATURE, example_faces
from pipeline.tracking.logger import MlflowLogger
from pipeline.tracking.registry import Trained, promote, register
from pipeline.tracking.runs import training_run
from pipeline.tracking.trained_by import WEIGHTS_TAG
from tests.support.loops import data
from tests.support.project import copy_project, default_config, free_port, run, tool_env

# Real trainings, evaluations and servers.
pytestmark = pytest.mark.slow

NETS = ("net4", "net5")
REGISTERED_MODEL = default_config().registry.model_name


@pytest.fixture(scope="module")
def registered(reproduced, tmp_path_factory):
    """A copy of the reproduced project, whose `dvc repro` registered its nets in its own store."""
    return copy_project(reproduced, tmp_path_factory.mktemp("registry") / "project")


@pytest.fixture
def store_of(monkeypatch):
    """Point this test's MLflow client, and the commands it starts, at a project's own store."""
    def point(project):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
        return mlflow.MlflowClient()
    return point


def prepared_test_faces(project):
    """The prepared test faces as they are stored: uint8 (n, 96, 96), the gray levels the model takes."""
    with np.load(project / "data/prepared/test.npz") as prepared:
        return prepared["pixels"][:, 0]


def versions(client):
    return sorted(client.search_model_versions(f"name = '{REGISTERED_MODEL}'"), key=lambda version: version.version)


def test_each_net_is_a_version_tagged_with_its_weights_data_and_test_rmse_with_the_aliases(registered, store_of):
    client = store_of(registered)
    results = json.loads((registered / "metrics/evaluate.json").read_text())
    data_hash = json.loads((registered / "data/prepared/summary.json").read_text())["data_hash"]
    by_net = {version.tags["net"]: version for version in versions(client)}
    assert sorted(by_net) == list(NETS)
    for net, version in by_net.items():
        assert version.tags["weights_sha256"] == weights_checksum(load_model(registered / f"models/{net}.pt"))
        assert version.tags["data_hash"] == data_hash
        assert float(version.tags["test_rmse_px"]) == pytest.approx(results[net]["test_rmse_px"])
        assert client.get_run(version.run_id).data.tags["net"] == net
    champion = min(NETS, key=lambda net: results[net]["test_rmse_px"])
    assert client.get_registered_model(REGISTERED_MODEL).aliases == {
        **{net: by_net[net].version for net in NETS}, "champion": by_net[champion].version}


def test_the_champion_takes_uint8_faces_and_gives_pixels_under_kaggles_names_as_predict_does(registered, store_of):
    store_of(registered)
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}@champion")
    assert model.metadata.signature == MODEL_SIGNATURE
    champion = mlflow.MlflowClient().get_model_version_by_alias(REGISTERED_MODEL, "champion").tags["net"]
    faces = prepared_test_faces(registered)
    served = model.predict(faces)
    assert list(served.columns) == list(KEYPOINT_COLUMNS) and len(served) == len(faces)
    expected = predict_pixels(load_model(registered / f"models/{champion}.pt"), NamedFaces([""] * len(faces), faces))
    # The same to the 4 decimals predict prints: the exported net's kernels may differ in the 6th digit.
    np.testing.assert_allclose(served.to_numpy(), expected, rtol=0, atol=5e-5)
    # Its input example is a face, not a blank image.
    local = mlflow.artifacts.download_artifacts(f"models:/{REGISTERED_MODEL}@champion")
    face = mlflow.models.Model.load(local).load_input_example(local)
    assert face.dtype == np.uint8 and face.shape == (1, 96, 96) and face.std() > 20


def test_dvc_repro_and_evaluate_again_add_no_version(registered, tmp_path, store_of):
    project = copy_project(registered, tmp_path / "project")
    client = store_of(project)
    before = [(version.version, version.tags) for version in versions(client)]
    assert "up to date" in run(project, "dvc", "repro").stdout
    run(project, sys.executable, "-m", "pipeline.evaluate")
    assert [(version.version, version.tags) for version in versions(client)] == before
    assert client.get_registered_model(REGISTERED_MODEL).aliases.keys() == {*NETS, "champion"}


def logged_run(net, seed):
    """A run with a logged model of a net of its own weights (untrained: the registry needs no good ones)."""
    with training_run(net, {}, {"net": net, "data_hash": "0123456789abcdef"}, []) as active:
        torch.manual_seed(seed)
        MlflowLogger().log_model(KeypointNet(), example_faces(data(2).images))
    run_id = active.info.run_id
    return Trained(net, run_id, mlflow.MlflowClient().get_run(run_id).data.tags[WEIGHTS_TAG])


def aliases(client):
    return {alias: int(version) for alias, version in client.get_registered_model(REGISTERED_MODEL).aliases.items()}


def test_registering_moves_no_alias_promoting_does_and_a_version_deleted_by_hand_is_registered_again():
    first_net4, net5, second_net4 = logged_run("net4", 1), logged_run("net5", 2), logged_run("net4", 3)
    client = mlflow.MlflowClient()
    one, two = register(REGISTERED_MODEL, first_net4, 5.0), register(REGISTERED_MODEL, net5, 4.0)
    assert aliases(client) == {}
    assert promote(REGISTERED_MODEL, {"net4": [one], "net5": [two]}).version == two.version == 2
    three = register(REGISTERED_MODEL, second_net4, 3.0)
    assert three.version == 3 and aliases(client) == {"net4": 1, "net5": 2, "champion": 2}
    assert promote(REGISTERED_MODEL, {"net4": [three], "net5": [two]}).version == 3
    # `dvc checkout` of the first net4, evaluated again (by other code: another figure): the same version.
    again = register(REGISTERED_MODEL, first_net4, 5.5)
    assert again.version == 1 and again.tags["test_rmse_px"] == "5.5"
    assert len(versions(client)) == 3
    # net5's version deleted by hand: the next evaluation registers it again and the aliases follow.
    client.delete_model_version(REGISTERED_MODEL, "2")
    four = register(REGISTERED_MODEL, net5, 4.0)
    assert four.version == 4
    promote(REGISTERED_MODEL, {"net4": [again], "net5": [four]})
    assert aliases(client) == {"net4": 1, "net5": 4, "champion": 4}
    # A net the workspace no longer has loses its alias; the champion stays on the workspace's best.
    promote(REGISTERED_MODEL, {"net4": [again]})
    assert aliases(client) == {"net4": 1, "champion": 1}


def test_the_champion_is_the_net_of_the_lowest_mean_on_its_best_seed_and_its_tags_say_so():
    client = mlflow.MlflowClient()
    # net4's seeds: 3.0 and 5.0 (mean 4.0, the best single training of all); net5's: 3.5 and 3.7 (mean 3.6).
    net4 = [register(REGISTERED_MODEL, logged_run("net4", seed), rmse) for seed, rmse in ((1, 3.0), (2, 5.0))]
    net5 = [register(REGISTERED_MODEL, logged_run("net5", seed), rmse) for seed, rmse in ((3, 3.7), (4, 3.5))]
    champion = promote(REGISTERED_MODEL, {"net4": net4, "net5": net5})
    assert champion.version == net5[1].version
    # Each net's alias: its first seed's version, the net's own files.
    assert aliases(client) == {"net4": int(net4[0].version), "net5": int(net5[0].version),
                               "champion": int(net5[1].version)}
    tags = client.get_model_version(REGISTERED_MODEL, champion.version).tags
    assert (tags["net"], tags["test_rmse_px"], float(tags["net_mean_test_rmse_px"]), tags["net_seeds"]) == (
        "net5", "3.5", pytest.approx(3.6), "2")
    assert float(client.get_model_version(REGISTERED_MODEL, net4[0].version).tags["net_mean_test_rmse_px"]) == 4.0


def serve(project, port):
    """`mlflow models serve` of the champion, as the README shows it, on 127.0.0.1."""
    command = [os.path.join(os.path.dirname(sys.executable), "mlflow"), "models", "serve", "-m",
               f"models:/{REGISTERED_MODEL}@champion", "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    log = (project / "serve.log").open("w")
    return subprocess.Popen(command, cwd=project, env=tool_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def post(url, body, timeout=10):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return json.loads(answer.read())


def test_the_served_champion_answers_a_posted_face_as_predict_does(registered, tmp_path, store_of):
    project = copy_project(registered, tmp_path / "project")
    store_of(project)
    face = prepared_test_faces(project)[0]
    Image.fromarray(face).save(tmp_path / "face.png")
    predicted = run(project, sys.executable, "-m", "pipeline.predict", str(tmp_path / "face.png"),
                    "--net", f"models:/{REGISTERED_MODEL}@champion", "--output", str(tmp_path / "predicted.csv"))
    assert predicted.stdout.startswith(f"predict: models:/{REGISTERED_MODEL}@champion (version ")
    port = free_port()
    server = serve(project, port)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (project / "serve.log").read_text()[-3000:]
            try:
                answer = post(f"http://127.0.0.1:{port}/invocations", {"inputs": [face.tolist()]})
                break
            except OSError:
                assert time.monotonic() < deadline, "the served model did not answer within 2 minutes"
                time.sleep(0.5)
        # A face of values in 0..1, not gray levels: the server makes it all black, and its log says so.
        post(f"http://127.0.0.1:{port}/invocations", {"inputs": [(face / 255).tolist()]})
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    assert "1 of 1 faces have no gray level above 1, all black" in (project / "serve.log").read_text()
    [keypoints] = answer["predictions"]
    assert list(keypoints) == list(KEYPOINT_COLUMNS)
    expected = pd.read_csv(tmp_path / "predicted.csv").iloc[0]
    # predict's 4 decimals: the served figures agree with them to their last digit.
    np.testing.assert_allclose([keypoints[name] for name in KEYPOINT_COLUMNS], expected[list(KEYPOINT_COLUMNS)].astype(float),
                               rtol=0, atol=1e-4)
