"""The plain eager loop, over the very batches and flips fit() draws: the yardstick of the fast path.

torch.optim.SGD with Python-number hyperparameters set before each epoch, one batch at a time,
each loss read back at once, validation in batches of the training's size.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from tests.support.loops import faces_of, stage_trainer
from pipeline.training.loop import DeviceFaces, Trainer, fit
from pipeline.training.schedule import linear


def plain_fit(trainer: Trainer, train: DeviceFaces, valid: DeviceFaces, schedules: dict) -> tuple[list[dict], torch.nn.Module]:
    """Train a copy of `trainer`'s net for trainer.max_epochs with its seeds; the trainer is not touched."""
    model = copy.deepcopy(trainer.network)
    optimizer = torch.optim.SGD(model.parameters(), lr=schedules["lr"].start, momentum=schedules["momentum"].start,
                                nesterov=True)
    generator = copy.deepcopy(trainer.generator)
    augment_generator = copy.deepcopy(trainer.augment_generator)
    history = []
    for epoch in range(1, trainer.max_epochs + 1):
        for name, schedule in schedules.items():
            optimizer.param_groups[0][name] = linear(schedule.start, schedule.stop, trainer.max_epochs, epoch)
        model.train()
        order = torch.randperm(len(train), generator=generator, device=generator.device)
        train_sum = 0.0
        for start in range(0, len(train), trainer.batch_size):
            rows = order[start:start + trainer.batch_size]
            images, targets = train.images[rows], train.targets[rows]
            if trainer.augment is not None:
                images, targets = trainer.augment(images, targets, augment_generator)
            optimizer.zero_grad()
            loss = F.mse_loss(model(images), targets)
            loss.backward()
            optimizer.step()
            train_sum += loss.item() * len(rows)
        model.eval()
        valid_sum = 0.0
        with torch.no_grad():
            for start in range(0, len(valid), trainer.batch_size):
                rows = slice(start, start + trainer.batch_size)
                images, targets = valid.images[rows], valid.targets[rows]
                valid_sum += F.mse_loss(model(images), targets).item() * len(images)
        history.append({"epoch": epoch, "train_loss": train_sum / len(train), "valid_loss": valid_sum / len(valid)})
        assert math.isfinite(history[-1]["train_loss"])
    return history, model


def fast_and_plain(net, device, dtype):
    """fit() of the stage's trainer and the plain loop on the same batches: 20 epochs with the annealing
    and, for net5, the flips; 12 faces in batches of 8 make an epoch's last batch one of 4."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the net, the optimizer's state and the losses in that precision
    try:
        trainer, schedules = stage_trainer(net, device, max_epochs=20, batch_size=8, keep="last")
        train, valid = faces_of(str(dtype).removeprefix("torch."), 12, 0, device), \
            faces_of(str(dtype).removeprefix("torch."), 6, 1, device)
        initial = {name: weights.clone() for name, weights in trainer.network.state_dict().items()}
        expected_history, expected_model = plain_fit(trainer, train, valid, schedules)
        history = fit(trainer, train, valid)
    finally:
        torch.set_default_dtype(default)
    return trainer, history, expected_history, expected_model.state_dict(), initial


def assert_same_training(trainer, history, expected_history, expected_weights, initial, tolerance):
    assert len(history) == len(expected_history) == 20
    for row, expected in zip(history, expected_history):
        assert row["train_loss"] == pytest.approx(expected["train_loss"], rel=tolerance)
        assert row["valid_loss"] == pytest.approx(expected["valid_loss"], rel=tolerance)
    for name, weights in trainer.network.state_dict().items():
        expected = expected_weights[name]
        difference = (weights - expected).norm()
        assert difference <= tolerance * expected.norm(), name
        # Every tensor moved in training far more than the two loops differ: the agreement is not
        # that of weights left as they were.
        assert (weights - initial[name]).norm() > 10 * difference, name
