import pytest
import torch

from pipeline.checkpoint import (Checkpointer, fingerprint, load_model, read_training_state,
                                 restore_training_state, save_model)
from pipeline.errors import PipelineError
from pipeline.loop import fit
from test_loop import data, make_trainer


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


def test_a_restored_state_continues_exactly_like_an_unbroken_training(tmp_path):
    path = tmp_path / "checkpoints" / "net5.pt"
    unbroken = make_trainer(4, flip=True)
    fit(unbroken, data(48), data(16, seed=1))

    first_half = make_trainer(2, flip=True)
    with Checkpointer(path, "settings", "run") as checkpointer:
        first_half.callbacks.append(checkpointer)
        fit(first_half, data(48), data(16, seed=1))
    state = read_training_state(path)
    assert (state["fingerprint"], state["mlflow_run_id"], len(state["history"])) == ("settings", "run", 2)

    torch.manual_seed(123)  # the global generator is part of the state: disturb it
    second_half = make_trainer(4, flip=True)
    restore_training_state(second_half, state)
    fit(second_half, data(48), data(16, seed=1))
    strip = lambda history: [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in history]
    assert strip(second_half.history) == strip(unbroken.history)
    for key, value in unbroken.network.state_dict().items():
        assert torch.equal(second_half.network.state_dict()[key], value), key


def test_a_failed_write_becomes_the_trainings_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    trainer = make_trainer(1)
    with pytest.raises(PipelineError, match="checkpoint could not be written"):
        with Checkpointer(blocker / "net4.pt", "settings", None) as checkpointer:
            trainer.callbacks.append(checkpointer)
            fit(trainer, data(16), data(16, seed=1))


def test_the_fingerprint_changes_with_any_setting():
    settings = {"train": {"max_epochs": 3, "lr": 0.03}, "data_hash": "abc"}
    assert fingerprint(settings) == fingerprint({"data_hash": "abc", "train": {"lr": 0.03, "max_epochs": 3}})
    assert fingerprint(settings) != fingerprint({**settings, "data_hash": "abd"})
    assert fingerprint(settings) != fingerprint({**settings, "train": {"max_epochs": 3, "lr": 0.02}})


def test_a_truncated_checkpoint_is_named(tmp_path):
    path = tmp_path / "net4.pt"
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(PipelineError, match="net4.pt: not a readable PyTorch file .*; delete it"):
        read_training_state(path)
