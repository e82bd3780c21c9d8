"""Real trainings in a scratch project (tests/support/project.py), and what they leave: files, checkpoints, MLflow runs;
and a callback that stops an in-process training where a test wants it."""

import json
import subprocess
import sys
import time

import mlflow
import pandas as pd
import torch

from pipeline.base.weights import load_checked
from pipeline.tracking.store import EXPERIMENT
from pipeline.tracking.trained_by import TRAINING_RUN_KEY, WEIGHTS_TAG
from pipeline.training.checkpoint import read_training_state
from pipeline.training.loop import Callback
from tests.support.project import run, tool_env


def start(project, *command):
    """A command in its own process group, as a terminal or a scheduler would start it."""
    return subprocess.Popen(command, cwd=project, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def saved_epochs(project, net="net4"):
    state = read_training_state(project / "checkpoints" / f"{net}.pt")
    return len(state["history"]) if state else 0


def wait_for_checkpoint(project, process, epochs=2, net="net4"):
    deadline = time.monotonic() + 120
    while saved_epochs(project, net) < epochs:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint within 2 minutes"
        time.sleep(0.05)


def train(project, net="net4", check=True):
    return run(project, sys.executable, "-m", "pipeline.train", net, check=check)


def weights(project, net="net4"):
    return load_checked(project / "models" / f"{net}.pt", remedy="")


def history(project, net="net4"):
    return pd.read_csv(project / "metrics" / "history" / f"{net}.csv")


def metric_keys(project, net="net4"):
    """Every figure of the history, each logged to MLflow at every epoch."""
    return list(history(project, net).columns.drop("epoch")) + ["epoch_seconds"]


def trained_run_of(project, net):
    """The MLflow run that the training noted for the project's weights of the net (trained_by.record_training_run)."""
    weights = json.loads((project / "models" / f"{net}.json").read_text())[WEIGHTS_TAG]
    [record] = (project / "training-runs").glob(f"{net}-{weights[:16]}.json")
    return json.loads(record.read_text())[TRAINING_RUN_KEY]


def runs(name="net4"):
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("net") == name]


def logged(run_id, key="train_loss"):
    return [(point.step, point.value) for point in mlflow.MlflowClient().get_metric_history(run_id, key)]


def assert_same_weights(first, second):
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


class RaiseIn(Callback):
    """Raise `error` in the hook `hook` of epoch `epoch`: a crash, or Ctrl-C or SIGTERM as a
    KeyboardInterrupt, at a chosen moment of the loop."""

    def __init__(self, hook: str, epoch: int, error: BaseException):
        self.hook, self.epoch, self.error = hook, epoch, error

    def _reached(self, hook: str, epoch: int) -> None:
        if (hook, epoch) == (self.hook, self.epoch):
            raise self.error

    def on_epoch_begin(self, trainer, epoch):
        self._reached("on_epoch_begin", epoch)

    def on_batch_end(self, trainer, batch, n_batches):
        self._reached("on_batch_end", len(trainer.history) + 1)

    def on_epoch_finished(self, trainer, history):
        self._reached("on_epoch_finished", len(history))
