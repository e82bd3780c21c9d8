import contextlib

import pytest
import torch

from pipeline.base.errors import PipelineError
from pipeline.base.weights import load_model, save_model
from pipeline.training.callbacks import KeepBest
from pipeline.training.checkpoint import Checkpoint, fingerprint, read_training_state
from pipeline.training.loop import Callback, fit
from tests.support.loops import EpochWeights, assert_weights, callback_of, data, falls_then_rises, make_trainer
from tests.support.trainings import RaiseIn

# Trainings stopped, saved and resumed.
pytestmark = pytest.mark.slow


class Payload:
    """What a malicious file would carry: unpickling it runs code (here, it creates a file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("read", [load_model, read_training_state])
def test_a_file_carrying_code_is_refused_without_running_it(tmp_path, read):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": Payload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(PipelineError, match="evil.pt: holds objects other than tensors"):
        read(path)
    assert not marker.exists()


def test_saved_weights_load_into_the_net(tmp_path):
    trainer = make_trainer(1)
    save_model(tmp_path / "net.pt", trainer.network)
    loaded = load_model(tmp_path / "net.pt")
    for key, value in trainer.network.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


SETTINGS = {"train": {"max_epochs": 4}, "data_hash": "abc"}


def strip(history):
    return [{key: value for key, value in row.items() if key != "epoch_seconds"} for row in history]


def train_saving(path, epochs, max_epochs=4, interval_seconds=0.0, callbacks=(), dropout=None):
    """`epochs` epochs of a `max_epochs` training, with a Checkpoint as the train stage wires it."""
    trainer = make_trainer(max_epochs, flip=True, dropout=dropout)
    checkpoint = Checkpoint(path, SETTINGS, interval_seconds)
    checkpoint.extra = {"run": "abc"}
    # Ctrl-C in the middle of the epoch after `epochs`, as a user or SIGTERM would stop it.
    trainer.callbacks += [checkpoint, RaiseIn("on_batch_end", epochs + 1, KeyboardInterrupt()), *callbacks]
    with pytest.raises(KeyboardInterrupt) if epochs < max_epochs else contextlib.nullcontext():
        with checkpoint:
            fit(trainer, data(48), data(16, seed=1))
    return trainer, checkpoint


def test_an_interrupted_training_resumes_exactly_like_an_unbroken_one(tmp_path):
    path = tmp_path / "checkpoints" / "net5.pt"
    unbroken = make_trainer(4, flip=True)
    fit(unbroken, data(48), data(16, seed=1))

    # A long interval: nothing is written during the epochs, only the last finished one on the interrupt.
    _, interrupted = train_saving(path, epochs=2, interval_seconds=3600)
    assert interrupted.saved_epochs == 2
    state = read_training_state(path)
    assert (state["fingerprint"], state["extra"], len(state["history"])) == (fingerprint(SETTINGS), {"run": "abc"}, 2)

    torch.manual_seed(123)  # the global generator is part of the state: disturb it
    resumed = make_trainer(4, flip=True)
    checkpoint = Checkpoint(path, SETTINGS, 3600)
    assert checkpoint.resume(resumed) and checkpoint.extra == {"run": "abc"}
    fit(resumed, data(48), data(16, seed=1))
    assert strip(resumed.history) == strip(unbroken.history)
    for key, value in unbroken.network.state_dict().items():
        assert torch.equal(resumed.network.state_dict()[key], value), key


NET6 = (0.1, 0.2, 0.3, 0.5)


def test_a_training_with_dropout_resumes_exactly_like_an_unbroken_one(tmp_path):
    """Dropout draws its masks from torch's global generator, which the checkpoint keeps: the resumed
    epochs draw the masks the unbroken ones drew."""
    path = tmp_path / "checkpoints" / "net6.pt"
    unbroken = make_trainer(4, flip=True, dropout=NET6)
    fit(unbroken, data(48), data(16, seed=1))
    without_dropout = make_trainer(4, flip=True)
    fit(without_dropout, data(48), data(16, seed=1))
    assert unbroken.history[0]["train_loss"] != without_dropout.history[0]["train_loss"]  # the masks were drawn

    train_saving(path, epochs=2, dropout=NET6)
    torch.manual_seed(123)  # disturb the global generator: the checkpoint must set it back
    resumed = make_trainer(4, flip=True, dropout=NET6)
    assert Checkpoint(path, SETTINGS, 3600).resume(resumed)
    fit(resumed, data(48), data(16, seed=1))
    assert strip(resumed.history) == strip(unbroken.history)
    assert_weights(resumed.network, unbroken.network.state_dict())


class Saved(Callback):
    """The epochs in the checkpoint file after each epoch, as another process would read them."""

    def __init__(self, checkpoint):
        self.checkpoint, self.epochs = checkpoint, []

    def on_epoch_finished(self, trainer, history):
        self.checkpoint._wait()  # the background write of this epoch, if one started
        state = read_training_state(self.checkpoint.path)
        self.epochs.append(len(state["history"]) if state else 0)


def test_the_state_is_written_at_most_once_per_interval_and_at_the_end(tmp_path):
    for interval, expected in ((0, [1, 2, 3, 4]), (3600, [0, 0, 0, 0])):
        path = tmp_path / f"every-{interval}.pt"
        trainer = make_trainer(4)
        checkpoint = Checkpoint(path, SETTINGS, interval)
        saved = Saved(checkpoint)
        trainer.callbacks += [checkpoint, saved]
        with checkpoint:
            fit(trainer, data(32), data(16, seed=1))
        assert saved.epochs == expected, interval
        assert len(read_training_state(path)["history"]) == 4  # the end is always written


@pytest.mark.parametrize("stop, before_the_copy", [
    # A crash as epoch 3 begins: epochs 1-2 were copied.
    (RaiseIn("on_epoch_begin", 3, RuntimeError("CUDA error: an illegal memory access was encountered")), False),
    # Ctrl-C as epoch 3 ends, before the checkpoint's hook copied it: the copy of epoch 2 is saved.
    (RaiseIn("on_epoch_finished", 3, KeyboardInterrupt()), True),
])
def test_a_stop_keeps_the_last_epoch_that_was_copied(tmp_path, stop, before_the_copy):
    path = tmp_path / "net4.pt"
    trainer = make_trainer(4)
    checkpoint = Checkpoint(path, SETTINGS, 3600)
    trainer.callbacks += [stop, checkpoint] if before_the_copy else [checkpoint, stop]
    with pytest.raises(type(stop.error)), checkpoint:
        fit(trainer, data(32), data(16, seed=1))
    assert len(trainer.history) == (3 if before_the_copy else 2)
    assert len(read_training_state(path)["history"]) == 2


def test_a_checkpoint_of_other_settings_is_not_resumed(tmp_path, capsys):
    path = tmp_path / "net4.pt"
    train_saving(path, epochs=1)
    trainer = make_trainer(4)
    checkpoint = Checkpoint(path, {**SETTINGS, "data_hash": "abd"}, 60)
    assert not checkpoint.resume(trainer)
    assert trainer.history == [] and checkpoint.extra == {}
    assert "was saved with other settings, data or code: training afresh" in capsys.readouterr().out


def test_a_failed_write_becomes_the_trainings_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    trainer = make_trainer(1)
    checkpoint = Checkpoint(blocker / "net4.pt", SETTINGS, 0)
    trainer.callbacks.append(checkpoint)
    with pytest.raises(PipelineError, match=r"file/net4.pt: not written: .*/file is a file, not a folder$"), checkpoint:
        fit(trainer, data(16), data(16, seed=1))


def test_the_fingerprint_changes_with_any_setting():
    settings = {"train": {"max_epochs": 3, "lr": 0.03}, "data_hash": "abc"}
    assert fingerprint(settings) == fingerprint({"data_hash": "abc", "train": {"lr": 0.03, "max_epochs": 3}})
    assert fingerprint(settings) != fingerprint({**settings, "data_hash": "abd"})
    assert fingerprint(settings) != fingerprint({**settings, "train": {"max_epochs": 3, "lr": 0.02}})


def test_a_truncated_checkpoint_is_named(tmp_path):
    path = tmp_path / "net4.pt"
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(PipelineError, match="net4.pt: damaged: .*; delete it to train from the first epoch"):
        read_training_state(path)


def test_a_resumed_training_keeps_the_best_epoch_so_far_and_stops_early_where_an_unbroken_one_does(tmp_path):
    """Epoch 2 of 4 is the best and epoch 3 brings no better one, so patience 1 stops the training
    after epoch 3. Stopped in epoch 3 and resumed, the training must still keep epoch 2's weights
    (the checkpoint's; its own epochs after resuming hold none better) and stop after epoch 3
    (counting from the restored history)."""
    epochs = EpochWeights()
    unbroken = make_trainer(4, [epochs], keep="best", patience=1, schedules=falls_then_rises())
    fit(unbroken, data(16), data(16, seed=1))
    assert [row["kept_epoch"] for row in unbroken.history] == [1, 2, 2]
    assert_weights(unbroken.network, epochs.weights[1])

    path = tmp_path / "net4.pt"
    interrupted = make_trainer(4, keep="best", patience=1, schedules=falls_then_rises())
    checkpoint = Checkpoint(path, SETTINGS, 3600)
    interrupted.callbacks += [checkpoint, RaiseIn("on_batch_end", 3, KeyboardInterrupt())]
    with pytest.raises(KeyboardInterrupt), checkpoint:
        fit(interrupted, data(16), data(16, seed=1))
    saved = read_training_state(path)
    assert [row["kept_epoch"] for row in saved["history"]] == [1, 2]
    assert_weights(unbroken.network, saved["callbacks"]["KeepBest"]["weights"])

    resumed = make_trainer(4, keep="best", patience=1, schedules=falls_then_rises())
    assert Checkpoint(path, SETTINGS, 3600).resume(resumed)
    assert_weights(unbroken.network, callback_of(resumed, KeepBest).weights)
    fit(resumed, data(16), data(16, seed=1))
    assert strip(resumed.history) == strip(unbroken.history)
    assert_weights(resumed.network, epochs.weights[1])
