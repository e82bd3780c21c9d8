"""The trained net as an MLflow model (pipeline/tracking/export.py): its signature, its input example
taken from the faces it trained on, and its export, which predicts pixels as predict does."""

import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException

from pipeline.base.config import load_config
from pipeline.base.model import KeypointNet
from pipeline.faces.data import load_faces, pixels_of, read_summary, split
from pipeline.faces.kaggle import KEYPOINT_COLUMNS
from pipeline.faces.synthetic import render_faces
from pipeline.predict import NamedFaces, predict_pixels
from pipeline.tracking.export import MODEL_SIGNATURE, example_faces, log_model
from pipeline.tracking.runs import training_run
from pipeline.training.loop import fit
from tests.support.loops import data, make_trainer
from tests.support.trainings import trained_run_of


def logged_model(run: mlflow.ActiveRun) -> mlflow.entities.LoggedModel:
    [model] = mlflow.search_logged_models(filter_string=f"source_run_id = '{run.info.run_id}'", output_format="list")
    return model


def test_the_example_faces_are_the_nets_first_input_faces_in_their_gray_levels():
    levels = np.random.default_rng(0).integers(0, 256, (5, 96, 96), dtype=np.uint8)
    # As the train stage holds them: float32 in 0..1, (n, 1, 96, 96), in the channels-last layout.
    images = torch.from_numpy(levels / np.float32(255)).unsqueeze(1).contiguous(memory_format=torch.channels_last)
    faces = example_faces(images)
    assert faces.dtype == np.uint8 and np.array_equal(faces, levels[:2])


@pytest.mark.slow  # a store created and a model logged: 10-20 s
def test_the_model_is_logged_with_a_signature_and_the_callers_first_face_as_its_example_and_speaks_pixels():
    faces, _ = render_faces(3, seed=7, missing_fraction=0.0)
    with training_run("net4", {}, {}, []) as run:
        log_model(KeypointNet(), faces)
    model = logged_model(run)
    local = mlflow.artifacts.download_artifacts(model.model_uri)
    logged = mlflow.models.Model.load(local)
    assert logged.signature == MODEL_SIGNATURE
    assert str(logged.signature.inputs) == "[Tensor('uint8', (-1, 96, 96))]"
    assert np.array_equal(logged.load_input_example(local), faces[:1])
    predicted = mlflow.pyfunc.load_model(model.model_uri).predict(faces)
    assert list(predicted.columns) == list(KEYPOINT_COLUMNS) and predicted.shape == (3, 30)
    with pytest.raises(MlflowException, match="Failed to enforce schema"):  # levels, not images in 0..1
        mlflow.pyfunc.load_model(model.model_uri).predict(faces.astype(np.float32) / 255)


@pytest.mark.slow  # a store created and a model logged
def test_a_net_given_one_face_is_exported_for_batches_of_any_size():
    """A training portion of one face (prepare allows it) lends the export its face twice."""
    faces, _ = render_faces(3, seed=1, missing_fraction=0.0)
    with training_run("net4", {}, {}, []) as run:
        log_model(KeypointNet(), faces[:1])
    served = mlflow.pyfunc.load_model(logged_model(run).model_uri)
    assert served.predict(faces).shape == (3, 30) and served.predict(faces[:1]).shape == (1, 30)


@pytest.mark.slow  # a training and a model logged
def test_the_logged_model_is_a_host_copy_that_predicts_pixels_as_predict_does_and_logs_quietly(capfd):
    trainer, training = make_trainer(2), data(32)
    fit(trainer, training, data(16, seed=1))
    net = trainer.network
    with training_run("net4", {}, {}, []) as run:
        log_model(net, example_faces(training.images))
    noise = capfd.readouterr()
    assert "Failed to validate" not in noise.err + noise.out and "[[" not in noise.err + noise.out
    assert "Downloading artifacts" not in noise.err + noise.out and "type hints" not in noise.err + noise.out
    assert net.features[0].weight.is_contiguous(memory_format=torch.channels_last)  # the net itself untouched
    faces, _ = render_faces(5, seed=2, missing_fraction=0.0)
    served = mlflow.pyfunc.load_model(logged_model(run).model_uri).predict(faces)
    expected = predict_pixels(net, NamedFaces([""] * 5, faces))
    # The same to the 4 decimals predict prints: the exported net's kernels may differ in the 6th digit.
    assert list(served.columns) == list(KEYPOINT_COLUMNS)
    np.testing.assert_allclose(served.to_numpy(), expected, rtol=0, atol=5e-5)


@pytest.mark.slow  # the project after `dvc repro`
def test_the_train_stage_gives_its_model_its_first_training_face_as_the_example(reproduced, tmp_path, monkeypatch):
    monkeypatch.chdir(reproduced)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{reproduced / 'mlflow.db'}")
    config = load_config()
    summary = read_summary(config.paths.prepared_summary)
    training, _ = split(load_faces(config.paths.train_faces, summary), config.train.valid_fraction,
                        seed=config.train.seeds[0], key="train.valid_fraction")
    [model] = mlflow.search_logged_models(filter_string=f"source_run_id = '{trained_run_of(reproduced, 'net4')}'",
                                          output_format="list")
    local = mlflow.artifacts.download_artifacts(model.model_uri, dst_path=str(tmp_path))
    example = mlflow.models.Model.load(local).load_input_example(local)
    assert np.array_equal(example, pixels_of(training.X[:1, 0]))
