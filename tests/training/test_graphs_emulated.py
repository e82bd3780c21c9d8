"""The CUDA-graph path of the train stage (graphs.CapturedSteps, optim.NesterovSGD) run on the CPU, its
graphs emulated (tests/support/emulated_cuda.py): `python -m pytest -k emulated`."""

import gc
import math
import weakref

import pytest
import torch

from tests.support.emulated_cuda import CaptureViolation, EmulatedCuda
from tests.support.loops import faces_of, stage_trainer
from pipeline.base.config import NetConfig
from pipeline.training.checkpoint import Checkpoint
from pipeline.training.loop import DeviceFaces, fit
from pipeline.training.optim import NesterovSGD
from tests.support.trainings import RaiseIn

pytestmark = pytest.mark.slow

EPOCHS = 6
# The tutorial's net6: net5 with dropout, whose masks a replay must draw as an eager step does.
NETS = {"net4": None, "net5": None, "net6": NetConfig(flip=True, dropout=(0.1, 0.2, 0.3, 0.5))}


def trainer_of(net, graphs, optimizer=None, **settings):
    """The stage's trainer on the CPU, annealed over EPOCHS epochs; batches of 8 from 20 faces make
    each epoch two steps of 8 and one of 4, so both shapes are captured and replayed."""
    trainer, _ = stage_trainer(net, "cpu", NETS[net], max_epochs=EPOCHS, batch_size=8, keep="best", **settings)
    trainer.cuda_graphs = graphs  # build_trainer turns them on for CUDA only
    if optimizer is not None:
        group = trainer.optimizer.param_groups[0]
        trainer.optimizer = optimizer(trainer.network.parameters(), lr=group["lr"], momentum=group["momentum"])
    return trainer


def train(trainer, cuda=None):
    with cuda or EmulatedCuda():
        return fit(trainer, faces_of("float32", 20, 0), faces_of("float32", 8, 1))


def without_times(history):
    return [{key: value for key, value in row.items() if key != "epoch_seconds"} for row in history]


def assert_same_training(trainer, history, expected_trainer, expected_history):
    assert without_times(history) == without_times(expected_history)
    for (name, weights), expected in zip(trainer.network.state_dict().items(),
                                         expected_trainer.network.state_dict().values()):
        assert torch.equal(weights, expected), name


class PythonNumberSGD(NesterovSGD):
    """The bug the device-side hyperparameters exist to avoid: the update reads lr and momentum as
    Python numbers, as torch's SGD does, which a graph freezes at the values of its capture."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [parameter for parameter in group["params"] if parameter.grad is not None]
            grads = [parameter.grad for parameter in params]
            buffers = [self.state[parameter]["momentum_buffer"] for parameter in params]
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, grads)
            update = torch._foreach_add(grads, buffers, alpha=group["momentum"])
            torch._foreach_add_(params, update, alpha=-group["lr"])


class ItemSGD(NesterovSGD):
    """A step that reads a value on the host: a real capture fails on it ("operation not permitted")."""

    def step(self, closure=None):
        if self._values[0]["lr"].item() > 0:
            super().step(closure)


class LoggingNet(torch.nn.Module):
    """A forward pass that prints its mean, as debugging code does: `float(tensor)` waits for the device."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, images):
        self.last_mean = float(images.mean())
        return self.network(images)


@pytest.mark.parametrize("net", NETS)
def test_emulated_graphs_train_bit_identical_to_the_eager_loop(net):
    eager = trainer_of(net, graphs=False)
    expected = train(eager)
    replayed = trainer_of(net, graphs=True)
    cuda = EmulatedCuda()
    history = train(replayed, cuda)
    # Both batch shapes captured, once each, after their warm-up steps; every later step replayed.
    assert sorted(key[0][0] for key in replayed._captured_steps.graphs) == [4, 8]
    assert [graph.replays for graph in cuda.graphs] == [2 * EPOCHS - 3, EPOCHS - 3]
    assert_same_training(replayed, history, eager, expected)
    assert history[-1]["learning_rate"] < history[0]["learning_rate"]  # the annealing reached the replays


def test_emulated_graphs_train_a_masked_specialist_bit_identical_to_the_eager_loop():
    """The eye centres' specialist, masked, a third of its faces lacking the right eye: the masked loss
    and the group's flips run in the captured step as they do eagerly."""
    eyes = NetConfig(flip=True, keypoints=("left_eye_center", "right_eye_center"), masked=True)

    def faces(n, seed):
        whole = faces_of("float32", n, seed)
        targets = whole.targets[:, :4].clone()
        targets[::3, 2:] = float("nan")
        return DeviceFaces(whole.images, targets)

    trainings = []
    for graphs in (False, True):
        trainer, _ = stage_trainer("eyes", "cpu", eyes, max_epochs=EPOCHS, batch_size=8, keep="best")
        trainer.cuda_graphs = graphs
        cuda = EmulatedCuda()
        with cuda:
            trainings.append((trainer, fit(trainer, faces(20, 0), faces(8, 1))))
    (eager, expected), (replayed, history) = trainings
    assert [graph.replays for graph in cuda.graphs] == [2 * EPOCHS - 3, EPOCHS - 3]
    assert_same_training(replayed, history, eager, expected)
    assert all(math.isfinite(row["valid_loss"]) for row in history)


def test_emulated_graphs_catch_an_optimizer_that_reads_its_hyperparameters_as_python_numbers():
    eager, mutant_eager = trainer_of("net5", graphs=False), trainer_of("net5", graphs=False, optimizer=PythonNumberSGD)
    expected = train(eager)
    # Eagerly, the mutant is the same update, bit for bit...
    assert_same_training(mutant_eager, train(mutant_eager), eager, expected)
    # ...but its replays keep the lr and momentum of their capture, and the training departs from the eager one.
    mutant = trainer_of("net5", graphs=True, optimizer=PythonNumberSGD)
    history = train(mutant)
    assert without_times(history[:2]) == without_times(expected[:2])  # captured and replayed with the values of their own epoch
    assert [row["train_loss"] for row in history[1:]] != [row["train_loss"] for row in expected[1:]]


@pytest.mark.parametrize("culprit", ["optimizer", "model"])
def test_emulated_capture_refuses_a_step_that_waits_for_the_host(culprit):
    trainer = trainer_of("net4", graphs=True, optimizer=ItemSGD if culprit == "optimizer" else None)
    if culprit == "model":
        trainer.model = LoggingNet(trainer.model)
    with pytest.raises(CaptureViolation, match="_local_scalar_dense.*on the host during a CUDA graph capture"):
        train(trainer)
    assert len(trainer.history) == 1  # the first capture, in epoch 2 after three eager steps, refused it


def test_emulated_graphs_stopped_and_resumed_through_the_checkpoint_match_an_unbroken_run(tmp_path):
    """net6: dropout and flips, so the generators' states in the checkpoint matter too; the resumed
    training steps eagerly again, then captures anew."""
    unbroken = trainer_of("net6", graphs=True)
    expected = train(unbroken)

    settings, path = {"net": "net6"}, tmp_path / "net6.pt"
    stopped = trainer_of("net6", graphs=True)
    checkpoint = Checkpoint(path, settings, interval_seconds=0)
    stopped.callbacks += [checkpoint, RaiseIn("on_batch_end", 4, KeyboardInterrupt())]
    with pytest.raises(KeyboardInterrupt), checkpoint:
        train(stopped)
    assert checkpoint.saved_epochs == 3

    torch.manual_seed(123)  # the global generator, which dropout draws from, is restored from the checkpoint
    resumed = trainer_of("net6", graphs=True)
    resumed.callbacks.append(Checkpoint(path, settings, interval_seconds=0))
    assert resumed.callbacks[-1].resume(resumed)
    assert_same_training(resumed, train(resumed), unbroken, expected)


def test_emulated_graphs_are_freed_with_their_finished_training_without_the_garbage_collector(tmp_path):
    trainer = trainer_of("net5", graphs=True)
    trainer.callbacks.append(Checkpoint(tmp_path / "net5.pt", {"net": "net5"}, interval_seconds=0))
    train(trainer)
    graphs = weakref.ref(trainer._captured_steps)
    gc.disable()
    try:
        del trainer
        assert graphs() is None  # no reference cycle kept the trainer, and its graphs, alive
    finally:
        gc.enable()
