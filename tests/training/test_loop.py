import math
import dataclasses
import io
from types import SimpleNamespace

import pytest
import torch

from tests.support.loops import EpochWeights, assert_weights, bright_square_faces, data, falls_then_rises, make_trainer
from pipeline.base.errors import PipelineError
from pipeline.faces.data import loss_to_rmse_px
from pipeline.training.callbacks import EarlyStopping, EpochTable
from pipeline.training.loop import Callback, DeviceFaces, fit, lowest_valid_loss, masked_loss
from tests.support.plain_loop import assert_same_training, fast_and_plain


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_train_begin(self, trainer):
        self.calls.append("train_begin")

    def on_epoch_begin(self, trainer, epoch):
        self.calls.append(f"epoch_begin {epoch}")

    def on_batch_end(self, trainer, batch, n_batches):
        self.calls.append(f"batch {batch}/{n_batches}")

    def on_epoch_finished(self, trainer, history):
        self.calls.append(f"epoch_finished {history[-1]['epoch']}")

    def on_train_end(self, trainer, history):
        self.calls.append("train_end")


@pytest.mark.slow
def test_loss_falls_on_a_learnable_task():
    history = fit(make_trainer(4, lr=0.1), data(256), data(32, seed=1))
    assert history[-1]["train_loss"] < 0.2 * history[0]["train_loss"]
    assert history[-1]["valid_loss"] < history[0]["valid_loss"]


def test_history_rows_hold_every_epoch_figure():
    history = fit(make_trainer(2), data(32), data(16, seed=1))
    assert [row["epoch"] for row in history] == [1, 2]
    row = history[0]
    assert set(row) == {"epoch", "train_loss", "valid_loss", "train_valid_ratio", "valid_rmse_px",
                        "learning_rate", "momentum", "epoch_seconds", "valid_loss_best", "kept_epoch"}
    assert row["train_valid_ratio"] == pytest.approx(row["train_loss"] / row["valid_loss"])
    assert row["valid_rmse_px"] == pytest.approx(loss_to_rmse_px(row["valid_loss"]))


def test_hooks_run_in_order():
    recorder = Recorder()
    fit(make_trainer(2, callbacks=[recorder]), data(32), data(16, seed=1))
    assert recorder.calls == ["train_begin", "epoch_begin 1", "batch 1/2", "batch 2/2", "epoch_finished 1",
                              "epoch_begin 2", "batch 1/2", "batch 2/2", "epoch_finished 2", "train_end"]


class ListLogger:
    """A MetricLogger that keeps what it is handed."""

    def __init__(self):
        self.rows, self.closed = [], False

    def log_row(self, row, step):
        self.rows.append((step, dict(row)))

    def close(self):
        self.closed = True


class RowCopies(Callback):
    def __init__(self):
        self.rows = []

    def on_epoch_finished(self, trainer, history):
        self.rows.append(dict(history[-1]))


def test_each_finished_row_goes_to_the_logger_as_the_callbacks_see_it_and_the_history_keeps_it():
    logger, seen = ListLogger(), RowCopies()
    trainer = make_trainer(3, [seen], keep="best")
    history = fit(trainer, data(32), data(16, seed=1), logger)
    assert [step for step, _ in logger.rows] == [1, 2, 3]
    assert [row for _, row in logger.rows] == seen.rows == history  # complete when handed on, and never edited
    assert not logger.closed  # whoever made the logger closes it


def test_a_resumed_training_hands_its_earlier_rows_to_the_logger_first():
    unbroken = fit(make_trainer(3), data(32), data(16, seed=1))
    trainer, logger = make_trainer(3), ListLogger()
    trainer.history = [dict(row) for row in unbroken[:2]]
    fit(trainer, data(32), data(16, seed=1), logger)
    assert [step for step, _ in logger.rows] == [1, 2, 3]
    assert [row for _, row in logger.rows[:2]] == unbroken[:2]


def test_annealing_sets_the_values_used_during_each_epoch():
    trainer = make_trainer(3, schedules={"lr": (0.03, 0.0001), "momentum": (0.9, 0.999)})
    history = fit(trainer, data(32), data(16, seed=1))
    assert [row["learning_rate"] for row in history] == pytest.approx([0.03, 0.01505, 0.0001])
    assert [row["momentum"] for row in history] == pytest.approx([0.9, 0.9495, 0.999])


def test_annealing_any_hyperparameter_by_name():
    trainer = make_trainer(2)
    # The stage's Nesterov SGD has no weight decay; torch's SGD, in its place, has.
    trainer.optimizer = torch.optim.SGD(trainer.network.parameters(), lr=0.01, momentum=0.9, weight_decay=0.0)
    trainer.schedules["weight_decay"] = (0.0, 0.5)
    fit(trainer, data(16), data(16, seed=1))
    assert trainer.optimizer.param_groups[0]["weight_decay"] == 0.5


def test_annealing_an_unknown_hyperparameter_is_a_clear_error():
    with pytest.raises(PipelineError, match="^train.schedules.lr_decay: the optimizer has no hyperparameter "
                                            r"'lr_decay' \(it has lr, momentum\)$"):
        dataclasses.replace(make_trainer(1), schedules={"lr_decay": (0.1, 0.2)})


def test_same_seed_gives_identical_history_and_weights():
    first, second = make_trainer(2), make_trainer(2)
    history_one = fit(first, data(32), data(16, seed=1))
    history_two = fit(second, data(32), data(16, seed=1))
    strip = lambda history: [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in history]
    assert strip(history_one) == strip(history_two)
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)


def test_flip_training_never_modifies_the_stored_data():
    train = data(32)
    stored_images, stored_targets = train.images.clone(), train.targets.clone()
    history = fit(make_trainer(2, flip=True), train, data(16, seed=1))
    assert torch.equal(train.images, stored_images) and torch.equal(train.targets, stored_targets)
    plain = fit(make_trainer(2), data(32), data(16, seed=1))
    assert history[0]["train_loss"] != plain[0]["train_loss"]


def test_divergence_stops_with_the_epoch_named():
    with pytest.raises(PipelineError, match="diverged in epoch 1"):
        fit(make_trainer(3, lr=1e6), data(32), data(16, seed=1))


def test_epoch_table_prints_one_plain_line_per_epoch(capsys):
    fit(make_trainer(2, callbacks=[EpochTable()]), data(16), data(16, seed=1))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("epoch 1/2 train_loss ") and "valid_loss" in lines[0] and "lr 0.01" in lines[0]


def test_bf16_autocast_trains_with_float32_losses_close_to_full_precision():
    full = fit(make_trainer(1), data(32), data(16, seed=1))
    trainer = make_trainer(1)
    trainer.bf16 = True
    half = fit(trainer, data(32), data(16, seed=1))
    assert half[0]["train_loss"] == pytest.approx(full[0]["train_loss"], rel=0.05)
    assert half[0]["train_loss"] != full[0]["train_loss"]


def test_contiguous_layout_gives_the_same_losses_as_channels_last():
    fast = fit(make_trainer(1), data(32), data(16, seed=1))
    trainer = make_trainer(1)
    trainer.model = trainer.model.to(memory_format=torch.contiguous_format)
    plain_data = DeviceFaces.of(bright_square_faces(32, 0), torch.device("cpu"), torch.contiguous_format)
    plain_valid = DeviceFaces.of(bright_square_faces(16, 1), torch.device("cpu"), torch.contiguous_format)
    plain = fit(trainer, plain_data, plain_valid)
    assert plain[0]["train_loss"] == pytest.approx(fast[0]["train_loss"], rel=1e-4)
    assert plain[0]["valid_loss"] == pytest.approx(fast[0]["valid_loss"], rel=1e-4)


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_epoch_table_on_a_terminal_marks_the_best_losses_in_colour(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    terminal = FakeTerminal()
    fit(make_trainer(2, callbacks=[EpochTable(terminal)]), data(16), data(16, seed=1))
    lines = terminal.getvalue().splitlines()
    assert "train loss" in lines[0] and "valid loss" in lines[0]
    assert EpochTable.GREEN in terminal.getvalue()
    monkeypatch.setenv("NO_COLOR", "1")
    plain = FakeTerminal()
    fit(make_trainer(1, callbacks=[EpochTable(plain)]), data(16), data(16, seed=1))
    assert "\033[" not in plain.getvalue()


def test_the_net_ends_with_the_weights_of_the_lowest_valid_loss_or_of_the_last_epoch():
    epochs = EpochWeights()
    best = make_trainer(4, [epochs], keep="best", schedules=falls_then_rises())
    history = fit(best, data(16), data(16, seed=1))
    losses = [row["valid_loss"] for row in history]
    assert losses.index(min(losses)) == 1 and min(losses) < losses[-1]  # the construction: epoch 2 of 4 is best
    assert [row["valid_loss_best"] for row in history] == [1.0, 1.0, 0.0, 0.0]
    assert [row["kept_epoch"] for row in history] == [1, 2, 2, 2]
    assert_weights(best.network, epochs.weights[1])

    last = make_trainer(4, keep="last", schedules=falls_then_rises())
    history = fit(last, data(16), data(16, seed=1))
    assert [row["valid_loss"] for row in history] == losses
    assert [row["valid_loss_best"] for row in history] == [1.0, 1.0, 0.0, 0.0]
    assert [row["kept_epoch"] for row in history] == [1, 2, 3, 4]
    assert_weights(last.network, epochs.weights[3])
    assert any(not torch.equal(value, epochs.weights[1][key]) for key, value in epochs.weights[3].items())


def test_early_stopping_ends_the_training_patience_epochs_after_the_best_one():
    trainer = make_trainer(4, keep="best", patience=1, schedules=falls_then_rises())
    history = fit(trainer, data(16), data(16, seed=1))
    assert [row["epoch"] for row in history] == [1, 2, 3]  # epoch 2 is the best, epoch 3 brings none
    assert trainer.should_stop and (trainer.best_epoch, history[-1]["kept_epoch"]) == (2, 2)


def rows(*valid_losses):
    return [{"epoch": epoch, "valid_loss": loss} for epoch, loss in enumerate(valid_losses, start=1)]


def resumed(history, max_epochs):
    """What fit() hands the callbacks of a training resumed with this history."""
    return SimpleNamespace(history=history, max_epochs=max_epochs, should_stop=False,
                           best_epoch=lowest_valid_loss(history)[0])


def test_the_lowest_valid_loss_is_its_first_epoch_and_none_before_any():
    assert lowest_valid_loss(rows(0.5, 0.3, 0.4, 0.3)) == (2, 0.3)  # a tie is no new best
    assert lowest_valid_loss([]) == (0, float("inf"))


def test_early_stopping_counts_from_the_history_so_a_resumed_training_stops_where_an_unbroken_one_does():
    trainer = resumed(rows(0.5, 0.3, 0.4), max_epochs=10)
    stopping = EarlyStopping(2)
    stopping.on_train_begin(trainer)  # resumed after epoch 3: one epoch without a new best so far
    assert not trainer.should_stop
    trainer.history += rows(0.5, 0.3, 0.4, 0.3)[3:]  # a tie is no new best: fit() keeps epoch 2
    stopping.on_epoch_finished(trainer, trainer.history)
    assert trainer.should_stop
    stopped = resumed(rows(0.5, 0.3, 0.4, 0.3), max_epochs=10)
    EarlyStopping(2).on_train_begin(stopped)  # resumed after the stop: no further epoch
    assert stopped.should_stop
    ended = resumed(rows(0.5, 0.3, 0.4, 0.3), max_epochs=4)
    EarlyStopping(2).on_train_begin(ended)  # the last epoch ended the training anyway: no early stop
    assert not ended.should_stop


@pytest.mark.slow
@pytest.mark.parametrize("net", ["net4", "net5"])
def test_the_stage_loop_computes_the_losses_and_weights_of_the_plain_eager_loop(net):
    """In float64, where rounding cannot hide a difference in the mathematics."""
    assert_same_training(*fast_and_plain(net, "cpu", torch.float64), tolerance=1e-9)


def test_the_masked_loss_is_the_mean_over_labelled_coordinates_and_passes_no_gradient_to_the_others():
    predicted = torch.tensor([[0.5, -0.2, 0.9, 0.3], [0.15, 0.4, -0.6, 0.2]], requires_grad=True)
    nan = float("nan")
    targets = torch.tensor([[0.0, 0.0, nan, nan], [0.1, nan, -0.5, 0.0]])
    loss = masked_loss(predicted, targets)
    labelled = ~targets.isnan()
    torch.testing.assert_close(loss, ((predicted - targets)[labelled] ** 2).mean())
    loss.backward()
    assert (predicted.grad[~labelled] == 0).all() and (predicted.grad[labelled] != 0).all()
    assert torch.isfinite(predicted.grad).all()
    # Fully labelled targets: the plain mean squared error.
    full = torch.zeros(2, 4)
    torch.testing.assert_close(masked_loss(predicted.detach(), full), torch.nn.functional.mse_loss(predicted.detach(), full))


def test_a_masked_net_trains_on_faces_with_unlabelled_coordinates_to_finite_losses():
    faces = bright_square_faces(48, 0)
    y = faces.y.copy()
    y[::2, 4:] = float("nan")  # half the faces labelled for their first two keypoints only
    trainer = make_trainer(max_epochs=3)
    trainer.masked = True
    history = fit(trainer, DeviceFaces.of(type(faces)(faces.X, y), torch.device("cpu")), data(16, seed=1))
    assert all(math.isfinite(row["train_loss"]) for row in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
