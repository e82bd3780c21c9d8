"""Runs left RUNNING by a training that died (kill -9, a lost machine) before a checkpoint kept its
epochs: the next training of the net marks them KILLED, with a note saying why, and touches no other."""

import os
import signal
import sys
import time

import mlflow
import pytest

from pipeline.tracking.dead_runs import LOCK_TAG, NOTE_TAG, close_dead_runs, lock_tag
from pipeline.tracking.store import set_experiment
from tests.support.project import make_project, run, set_params
from tests.support.trainings import runs, start, train


def test_only_the_runs_of_the_net_under_the_held_lock_are_marked_killed(tmp_path):
    client = mlflow.MlflowClient()
    experiment = set_experiment()
    held, other_project = tmp_path / "checkpoints" / "net4.lock", tmp_path / "elsewhere" / "checkpoints" / "net4.lock"

    def running(net, lock):
        return client.create_run(experiment, run_name=net, tags={"net": net, LOCK_TAG: lock_tag(lock)})

    dead = running("net4", held)
    client.log_metric(dead.info.run_id, "train_loss", 0.5, timestamp=dead.info.start_time + 1500, step=1)
    live, beside = running("net4", held), running("net5", tmp_path / "checkpoints" / "net5.lock")
    elsewhere = running("net4", other_project)
    assert close_dead_runs("net4", held, live.info) == [dead.info.run_id]
    closed = client.get_run(dead.info.run_id)
    assert closed.info.status == "KILLED" and closed.info.end_time == dead.info.start_time + 1500
    note = closed.data.tags[NOTE_TAG]
    assert "ended without ending its run" in note and f"run {live.info.run_id}" in note
    for untouched in (live, beside, elsewhere):
        assert client.get_run(untouched.info.run_id).info.status == "RUNNING"


@pytest.mark.slow
def test_a_training_killed_in_its_first_epoch_leaves_one_finished_run_and_a_killed_one(tmp_path):
    # The default checkpoint interval (60 s): a kill in the first epoch leaves no checkpoint to resume.
    project = make_project(tmp_path / "project", {"train.max_epochs": 1000})
    run(project, "dvc", "repro", "prepare")
    set_experiment()  # the store and its experiment, before two trainings look for them
    # A training of another net at the same time, alive throughout: its run is not the dead one's business.
    other = start(project, sys.executable, "-m", "pipeline.train", "net5")
    killed = start(project, sys.executable, "-m", "pipeline.train", "net4")
    try:
        wait_for_a_running_run(killed, "net4")
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
        wait_for_a_running_run(other, "net5")
        assert not (project / "checkpoints" / "net4.pt").exists()
        [dead] = runs("net4")
        assert dead.info.status == "RUNNING"  # as MLflow leaves it

        set_params(project, {"train.max_epochs": 2})
        train(project, "net4")
        finished, killed_run = sorted(runs("net4"), key=lambda logged: logged.info.status)
        assert (finished.info.status, killed_run.info.status) == ("FINISHED", "KILLED")
        assert killed_run.info.run_id == dead.info.run_id
        assert f"run {finished.info.run_id}" in killed_run.data.tags[NOTE_TAG]
        assert killed_run.info.end_time <= finished.info.start_time
        [alive] = runs("net5")
        assert alive.info.status == "RUNNING" and other.poll() is None
    finally:
        other.kill()
        other.wait()


def wait_for_a_running_run(process, net):
    """Until the training has started its MLflow run (before its first epoch ends)."""
    deadline = time.monotonic() + 120
    while not any(logged.info.status == "RUNNING" for logged in runs(net)):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"no run of {net} within 2 minutes"
        time.sleep(0.05)
