import io
from types import SimpleNamespace

import pytest

from pipeline.training.callbacks import EpochTable


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def row(epoch, seconds):
    return {"epoch": epoch, "train_loss": 0.01, "valid_loss": 0.02, "train_valid_ratio": 0.5, "valid_rmse_px": 6.8,
            "learning_rate": 0.01, "momentum": 0.9, "epoch_seconds": seconds}


def lines_after(history, max_epochs, stream):
    """What the table prints once each epoch of `history` has finished."""
    table, trainer = EpochTable(stream), SimpleNamespace(max_epochs=max_epochs)
    table.on_train_begin(trainer)
    for finished in range(1, len(history) + 1):
        table.on_epoch_finished(trainer, history[:finished])
    return stream.getvalue().replace("\r", "").splitlines()  # a terminal's row starts with \r (over the bar)


@pytest.mark.parametrize("stream", [io.StringIO(), FakeTerminal()], ids=["plain", "terminal"])
def test_every_epoch_ends_with_the_epochs_to_go_times_the_mean_epoch(stream):
    lines = lines_after([row(1, 50.0), row(2, 70.0)], max_epochs=92, stream=stream)
    assert lines[-2].endswith(" 1:15:50")  # 91 epochs to go at 50 s
    assert lines[-1].endswith(" 1:30:00")  # 90 epochs to go at the mean of 50 and 70 s
    assert lines_after([row(1, 9.6)], max_epochs=3, stream=io.StringIO())[-1].endswith(" eta 0:19")
    assert lines_after([row(1, 9.6)], max_epochs=1, stream=io.StringIO())[-1].endswith(" eta 0:00")


def test_a_resumed_training_counts_the_epochs_before_the_stop():
    """A resumed training's history starts with the epochs from the checkpoint, at their own times."""
    resumed = [row(1, 10.0), row(2, 10.0), row(3, 40.0)]
    assert lines_after(resumed, max_epochs=5, stream=io.StringIO())[-1].endswith(" eta 0:40")  # 2 x 20 s


def test_the_terminal_table_has_an_eta_column(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    lines = lines_after([row(1, 2.0)], max_epochs=31, stream=FakeTerminal())
    assert lines[0].split() == ["epoch", "train", "loss", "valid", "loss", "train/val", "dur", "eta"]
    assert lines[2].split()[-2:] == ["2.00s", "1:00"]
    assert len(lines[2]) == len(lines[1]) == len(lines[0])  # the columns line up
