"""Small in-process trainings on made-up faces, for the tests of the loop, checkpoints, tracking and weights."""

import dataclasses

import numpy as np
import torch

from pipeline.base.config import NetConfig, Schedule
from pipeline.faces.data import FaceSet
from pipeline.train import build_trainer
from pipeline.training.loop import Callback, DeviceFaces
from tests.support.project import default_config


def bright_square_faces(n, seed):
    """Images with one bright square whose position is the target: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    X = np.zeros((n, 1, 96, 96), dtype=np.float32)
    y = np.zeros((n, 30), dtype=np.float32)
    for i in range(n):
        row, column = rng.integers(10, 80, size=2)
        X[i, 0, row:row + 8, column:column + 8] = 1
        y[i, 0::2] = (column + 4 - 48) / 48
        y[i, 1::2] = (row + 4 - 48) / 48
    return FaceSet(X, y)


def stage_trainer(net, device, declared: NetConfig | None = None, **train_settings):
    """The train stage's own trainer (build_trainer) for the default params, with some train.* changed
    and `net` declared as `declared` where given (a net with dropout, say)."""
    config = default_config()
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, **train_settings),
                                 nets={**config.nets, **({net: declared} if declared else {})})
    return build_trainer(config, net, torch.device(device)), config.train.schedules


def make_trainer(max_epochs, callbacks=(), flip=False, lr=0.01, momentum=0.9, keep="last", patience=0, dropout=None,
                 schedules=None):
    """The stage's trainer of net5 (flips) or net4 on the CPU, or of net6 (flips and these `dropout`
    rates): batches of 16, seed 0, a constant learning rate and momentum unless `schedules` (name ->
    (start, stop)) anneals them, train.keep and train.patience as given; `callbacks` come after the
    stage's own."""
    net, declared = ("net6", NetConfig(flip=flip, dropout=dropout)) if dropout else ("net5" if flip else "net4", None)
    trainer, _ = stage_trainer(net, "cpu", declared, max_epochs=max_epochs, batch_size=16, seeds=(0,),
                               keep=keep, patience=patience,
                               schedules={"lr": Schedule(lr, lr), "momentum": Schedule(momentum, momentum)})
    # Past params.yaml's checks: the tests anneal to values no user would (a negative learning rate).
    trainer.schedules.update(schedules or {})
    trainer.callbacks += callbacks
    return trainer


def callback_of(trainer, kind):
    """The trainer's one callback of this class (the stage's KeepBest, EarlyStopping, ...)."""
    (callback,) = [callback for callback in trainer.callbacks if type(callback) is kind]
    return callback


def faces_of(dtype, n, seed, device="cpu"):
    """bright_square_faces on the device, in that precision."""
    faces = bright_square_faces(n, seed)
    return DeviceFaces.of(FaceSet(faces.X.astype(dtype), faces.y.astype(dtype)), torch.device(device))


def data(n=64, seed=0):
    return faces_of("float32", n, seed)


def falls_then_rises():
    """Schedules for make_trainer: a learning rate annealed from 0.3 to -0.3 over 4 epochs, descent then
    ascent, so that on tiny data the valid loss is lowest in epoch 2 and the last epoch's weights are worse."""
    return {"lr": (0.3, -0.3)}


class EpochWeights(Callback):
    """A copy of the net's weights after every epoch."""

    def __init__(self):
        self.weights = []

    def on_epoch_finished(self, trainer, history):
        self.weights.append({key: value.clone() for key, value in trainer.network.state_dict().items()})


def assert_weights(model, expected):
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
