"""The pipeline on a CUDA device: the train stage end to end, kill -9 and resume, reproducibility,
flips, bf16, evaluation and prediction. Marked `gpu`: skipped, with the reason, where there is no
CUDA device (as on CI); run them with `python -m pytest -m gpu` on a machine with one.

The stages run as their commands (`python -m pipeline.train net4`), not through DVC, and the
scratch project is no git repository: a GPU machine may have neither DVC nor git.
"""

import os
import shutil
import signal
import sys

import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.base.config import NetConfig
from pipeline.base.model import KeypointNet
from pipeline.base.weights import load_model, save_model
from pipeline.evaluation.metrics import predict
from pipeline.faces.augment import flip, flip_random_half
from pipeline.faces.synthetic import render_faces
from pipeline.predict import NamedFaces, predict_pixels
from pipeline.training import checkpoint as checkpoints
from pipeline.training.checkpoint import Checkpoint
from pipeline.training.graphs import CapturedSteps
from pipeline.training.loop import DeviceFaces, Trainer, fit, run_epoch
from tests.support.project import make_project, run, set_params
from tests.support.loops import EpochWeights, bright_square_faces, faces_of, stage_trainer
from tests.support.plain_loop import assert_same_training, fast_and_plain
from tests.support.trainings import (assert_same_weights, history, logged, metric_keys, runs, saved_epochs, start,
                       wait_for_checkpoint, weights)

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

DEVICE = "cuda:0"
# Epochs of a few milliseconds each: enough of them that a test can kill the training midway.
EPOCHS, FACES = 400, 600
# The tutorial's net6: net5 with dropout.
NET6 = {"flip": True, "dropout": [0.1, 0.2, 0.3, 0.5]}
# Lines that MLflow prints when its check of the logged model fails, or when it prints an array.
NOISE = ("Traceback", "Failed to validate", "Got error", "[[")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("gpu") / "project", {
        "synthetic.n_faces": FACES, "train.max_epochs": EPOCHS, "train.device": DEVICE,
        "checkpoint.interval_seconds": 0,
    }, git=False)
    for stage in ("synthesize", "prepare"):
        run(project, sys.executable, "-m", f"pipeline.{stage}")
    return project


@pytest.fixture
def project(prepared, tmp_path):
    copy = tmp_path / "project"
    shutil.copytree(prepared, copy)
    return copy


def stage(project, *args):
    return run(project, sys.executable, "-m", *args)


def test_the_stages_on_cuda_log_a_model_that_predicts_on_the_cpu(project):
    for net in ("net4", "net5"):
        trained = stage(project, "pipeline.train", net)
        assert f"faces on {DEVICE}," in trained.stdout
        assert not any(noise in trained.stdout + trained.stderr for noise in NOISE), trained.stderr
    evaluated = stage(project, "pipeline.evaluate")
    assert "Traceback" not in evaluated.stderr and (project / "metrics/evaluate.json").exists()

    [run_] = runs("net5")
    assert run_.info.status == "FINISHED" and run_.data.params["device"] == DEVICE
    [model] = mlflow.search_logged_models(experiment_ids=[run_.info.experiment_id], output_format="list",
                                          filter_string=f"source_run_id = '{run_.info.run_id}'")
    # The logged model runs on the CPU on a machine with a GPU too, and speaks pixels as predict does.
    served = mlflow.pyfunc.load_model(model.model_uri)
    faces = render_faces(6, seed=3, missing_fraction=0.0)[0]
    expected = predict_pixels(load_model(project / "models/net5.pt", "cpu"), NamedFaces([""] * 6, faces))
    np.testing.assert_allclose(served.predict(faces).to_numpy(), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("net", ["net5", "net6"])
def test_kill_9_on_cuda_then_resume_ends_like_an_uninterrupted_training(project, tmp_path, monkeypatch, net):
    """net6's dropout draws from the device's generator, in replayed CUDA graphs: the checkpoint keeps
    that generator's state, and the resumed epochs, eager warm-up steps and new captures included,
    draw the masks the uninterrupted ones drew."""
    set_params(project, {"nets.net6": NET6})
    references = []
    for name in ("first", "second"):
        copy = tmp_path / name
        shutil.copytree(project, copy)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / name}.db")
        stage(copy, "pipeline.train", net)
        references.append(copy)
    first, second = references
    # Reproducible: the same params and seed on the same GPU give the same training, bit for bit.
    assert_same_weights(weights(first, net), weights(second, net))
    assert history(first, net).equals(history(second, net))
    [reference_run] = runs(net)
    keys = [key for key in metric_keys(first, net) if key != "epoch_seconds"]
    expected = {key: logged(reference_run.info.run_id, key) for key in keys}

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'resumed.db'}")
    training = start(project, sys.executable, "-m", "pipeline.train", net)
    wait_for_checkpoint(project, training, net=net)
    os.killpg(training.pid, signal.SIGKILL)
    training.wait()
    done = saved_epochs(project, net)
    assert 2 <= done < EPOCHS
    resumed = stage(project, "pipeline.train", net)
    assert f"resuming after epoch {done}" in resumed.stdout
    assert_same_weights(weights(project, net), weights(first, net))
    assert history(project, net).equals(history(first, net))
    [resumed_run] = runs(net)
    for key in keys:
        assert logged(resumed_run.info.run_id, key) == expected[key], key  # every epoch once, same values


def test_replayed_steps_draw_fresh_dropout_masks_the_ones_eager_steps_draw():
    """PyTorch registers the device's default generator with each graph it captures: every replay
    draws the numbers after the last step's, as an eager step does. So the masks change from step to
    step, and a resumed training, whose first steps are eager again, draws what an unbroken one drew."""
    ones = torch.ones(64, 256, device=DEVICE)
    torch.manual_seed(0)
    steps = CapturedSteps(before_replay=lambda: None)
    drawn = [steps(lambda images, targets, global_rows: F.dropout(images, 0.5, training=True), ones, ones, 64).clone()
             for _ in range(CapturedSteps.WARMUP_STEPS + 3)]
    assert len(steps.graphs) == 1  # the last three were replays
    assert not torch.equal(drawn[-1], drawn[-2])
    torch.manual_seed(0)
    for step, masked in enumerate(drawn):
        assert torch.equal(masked, F.dropout(ones, 0.5, training=True)), step


def test_flips_stay_on_the_device_and_never_wait_for_the_host():
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    images = torch.rand(128, 1, 96, 96, device=DEVICE).contiguous(memory_format=torch.channels_last)
    targets = torch.rand(128, 30, device=DEVICE) * 2 - 1
    stored = images.clone(), targets.clone()
    flip(images, targets)  # builds the device's flip tables, once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out_images, out_targets = flip_random_half(images, targets, generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out_images.device == images.device and out_targets.device == targets.device
    assert torch.equal(images, stored[0]) and torch.equal(targets, stored[1])
    mirrored_images, mirrored_targets = flip(images.cpu(), targets.cpu())
    changed = (out_images.cpu() != images.cpu()).flatten(1).any(1)
    assert int(changed.sum()) == 64
    assert torch.equal(out_images.cpu()[changed], mirrored_images[changed])
    assert torch.equal(out_targets.cpu()[changed], mirrored_targets[changed])
    assert torch.equal(out_targets.cpu()[~changed], targets.cpu()[~changed])


def cuda_trainer(bf16=False, flip=False):
    device = torch.device(DEVICE)
    torch.manual_seed(0)
    model = KeypointNet().to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, nesterov=True)
    return Trainer(model, optimizer, max_epochs=3, batch_size=32,
                   generator=torch.Generator(device=device).manual_seed(0),
                   augment=flip_random_half if flip else None,
                   augment_generator=torch.Generator(device=device).manual_seed(1) if flip else None,
                   schedules={"lr": (0.03, 0.001)}, bf16=bf16)


def cuda_data(n, seed):
    return DeviceFaces.of(bright_square_faces(n, seed), torch.device(DEVICE))


def test_bf16_on_cuda_trains_float32_weights_with_losses_close_to_float32():
    full = fit(cuda_trainer(flip=True), cuda_data(96, 0), cuda_data(32, 1))
    trainer = cuda_trainer(bf16=True, flip=True)
    half = fit(trainer, cuda_data(96, 0), cuda_data(32, 1))
    for exact, mixed in zip(full, half):
        assert mixed["train_loss"] == pytest.approx(exact["train_loss"], rel=0.05)
        assert mixed["valid_loss"] == pytest.approx(exact["valid_loss"], rel=0.05)
    assert half[0]["train_loss"] != full[0]["train_loss"]
    assert all(parameter.dtype == torch.float32 for parameter in trainer.model.parameters())


def test_evaluation_and_prediction_on_cuda_agree_with_the_cpu(tmp_path):
    trainer = cuda_trainer()
    fit(trainer, cuda_data(64, 0), cuda_data(16, 1))
    save_model(tmp_path / "net.pt", trainer.network)
    faces = bright_square_faces(40, seed=4).X
    on_gpu, on_cpu = load_model(tmp_path / "net.pt", DEVICE), load_model(tmp_path / "net.pt", "cpu")
    assert next(on_gpu.parameters()).device == torch.device(DEVICE)
    predicted_gpu, predicted_cpu = predict(on_gpu, faces), predict(on_cpu, faces)
    assert isinstance(predicted_gpu, np.ndarray) and predicted_gpu.shape == (40, 30)
    np.testing.assert_allclose(predicted_gpu, predicted_cpu, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-9), (torch.float32, 1e-2)])
@pytest.mark.parametrize("net", ["net4", "net5"])
def test_steps_replayed_from_cuda_graphs_compute_the_plain_eager_loop(net, dtype, tolerance):
    """float64 shows the same mathematics; float32 is what trains, where a summed loss against a mean
    and other cuDNN kernels round differently, and 40 SGD steps amplify that (past 0.1% for a bias
    on the CPU)."""
    trainer, *results = fast_and_plain(net, DEVICE, dtype)
    assert trainer.cuda_graphs
    # Both batch shapes (8 and the last 4) were captured, after their warm-up steps, and replayed.
    assert sorted(key[0][0] for key in trainer._captured_steps.graphs) == [4, 8]
    assert_same_training(trainer, *results, tolerance=tolerance)


# The eye centres' specialist, masked: its targets, a third of them lacking the right eye, are NaN there.
EYES = NetConfig(flip=True, keypoints=("left_eye_center", "right_eye_center"), masked=True)


def eyes_lacking_some(faces):
    targets = faces.targets[:, :4].clone()
    targets[::3, 2:] = float("nan")
    return DeviceFaces(faces.images, targets)


@pytest.mark.parametrize("net", ["net5", "net6", "eyes"])
def test_an_epoch_of_replayed_steps_never_waits_for_the_host(net):
    """net6's dropout draws its masks on the device too, and the masked loss counts its labels there."""
    trainer, _ = stage_trainer(net, DEVICE, {"net6": NetConfig(**NET6), "eyes": EYES}.get(net), max_epochs=8,
                               batch_size=16)
    train, valid = faces_of("float32", 36, 0, DEVICE), faces_of("float32", 20, 1, DEVICE)
    if net == "eyes":
        train, valid = eyes_lacking_some(train), eyes_lacking_some(valid)
    fit(trainer, train, valid)  # warm-up steps and captures done
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [run_epoch(trainer, train, train=True), run_epoch(trainer, valid, train=False)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(loss) for loss in losses)


def test_the_first_convolution_keeps_the_default_layout_on_cuda_and_the_others_channels_last():
    """cuDNN's deterministic mode may find no engine for a one-channel NHWC convolution."""
    trainer, _ = stage_trainer("net4", DEVICE, max_epochs=1, batch_size=16)
    assert trainer.network.features[0].weight.stride() == (9, 9, 3, 1)
    assert trainer.network.features[3].weight.is_contiguous(memory_format=torch.channels_last)
    fit(trainer, faces_of("float32", 36, 0, DEVICE), faces_of("float32", 20, 1, DEVICE))
    assert torch.isfinite(torch.tensor(trainer.history[-1]["train_loss"]))


@pytest.mark.parametrize("changes", [{"train.bf16": True}, {"train.deterministic": False}],
                         ids=["bf16-deterministic", "not-deterministic"])
def test_the_stage_trains_with_graphs_in_bf16_and_without_deterministic_kernels(project, tmp_path, monkeypatch, changes):
    """bf16 under deterministic kernels is still repeatable; without them, cuDNN benchmarks its kernels."""
    set_params(project, {**changes, "train.max_epochs": 30})
    trained = []
    for name in ("first", "second"):
        copy = tmp_path / name
        shutil.copytree(project, copy)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / name}.db")
        stage(copy, "pipeline.train", "net5")
        trained.append(copy)
        assert np.isfinite(history(copy, "net5")[["train_loss", "valid_loss"]].to_numpy()).all()
    if changes.get("train.deterministic", True):
        assert_same_weights(weights(trained[0], "net5"), weights(trained[1], "net5"))


def test_a_dropout_net_trained_on_cuda_logs_a_model_that_predicts_on_the_cpu(project):
    set_params(project, {"nets.net6": NET6, "train.max_epochs": 30})
    stage(project, "pipeline.train", "net6")
    [run_] = runs("net6")
    [model] = mlflow.search_logged_models(experiment_ids=[run_.info.experiment_id], output_format="list",
                                          filter_string=f"source_run_id = '{run_.info.run_id}'")
    faces = render_faces(6, seed=3, missing_fraction=0.0)[0]
    expected = predict_pixels(load_model(project / "models/net6.pt", "cpu"), NamedFaces([""] * 6, faces))
    np.testing.assert_allclose(mlflow.pyfunc.load_model(model.model_uri).predict(faces).to_numpy(), expected,
                               rtol=0, atol=1e-4)


def test_checkpoints_written_while_steps_are_captured_hold_their_epochs_weights(tmp_path, monkeypatch):
    """One step an epoch: the capture comes in epoch 4, while the writer thread still writes epoch 3's
    state, copied to pinned host memory on a stream of its own. Every state written holds the weights of
    the epoch it says, as the training had them."""
    written = []

    def keep_written(path, state):
        written.append({key: value.clone() for key, value in state["model"].items()} | {"epochs": len(state["history"])})
        write(path, state)

    write = checkpoints.write_training_state
    monkeypatch.setattr(checkpoints, "write_training_state", keep_written)
    trainer, _ = stage_trainer("net6", DEVICE, NetConfig(**NET6), max_epochs=12, batch_size=16, keep="last")
    epochs = EpochWeights()
    trainer.callbacks += [Checkpoint(tmp_path / "net6.pt", {"net": "net6"}, interval_seconds=0), epochs]
    with trainer.callbacks[-2]:
        fit(trainer, faces_of("float32", 16, 0, DEVICE), faces_of("float32", 16, 1, DEVICE))
    assert len(trainer._captured_steps.graphs) == 1 and len(written) >= 3
    for state in written:
        expected = epochs.weights[state.pop("epochs") - 1]
        for key, value in state.items():
            assert torch.equal(value, expected[key].cpu()), key
