"""The training stage under faults: kill -9, SIGTERM, changed params, divergence, a dead tracking
store, two trainings on one SQLite store, a second training of one net, a full disk.
Real processes, real DVC, real MLflow stores, real mounts."""

import dataclasses
import fcntl
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import torch
import torch.nn.functional as F

from tests.support.faults import full_disk, run_with
from tests.support.loops import callback_of, data
from pipeline.base.config import NetConfig
from pipeline.faces.data import loss_to_rmse_px
from pipeline.tracking.store import EXPERIMENT
from pipeline.train import build_trainer, kept_weights_line
from pipeline.training.callbacks import EarlyStopping, KeepBest
from pipeline.training.loop import run_epoch
from tests.support.project import ROOT, default_config, free_port, make_project, run, set_params
from tests.support.trainings import (assert_same_weights, history, logged, metric_keys, runs, saved_epochs, start,
                                     train, wait_for_checkpoint, weights)

# Real stages in processes of their own, through DVC and MLflow: the slow half of the suite.
pytestmark = pytest.mark.slow

EPOCHS = 10


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A scratch project with its data prepared; each test trains in a copy of it."""
    # A checkpoint after every epoch, so that a test can stop a training once one is on disk.
    project = make_project(tmp_path_factory.mktemp("prepared") / "project",
                           {"train.max_epochs": EPOCHS, "checkpoint.interval_seconds": 0})
    run(project, "dvc", "repro", "prepare")
    return project


@pytest.fixture
def project(prepared, tmp_path):
    copy = tmp_path / "project"
    shutil.copytree(prepared, copy, symlinks=True)
    return copy


def test_kill_9_then_dvc_repro_resumes_to_the_uninterrupted_result(project, tmp_path, monkeypatch):
    uninterrupted = tmp_path / "uninterrupted"
    shutil.copytree(project, uninterrupted, symlinks=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'uninterrupted.db'}")
    train(uninterrupted)
    reference_run = runs()[0].info.run_id
    reference_history = {key: logged(reference_run, key) for key in metric_keys(uninterrupted)
                         if key != "epoch_seconds"}

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'resumed.db'}")
    repro = start(project, "dvc", "repro", "train@net4")
    wait_for_checkpoint(project, repro)
    os.killpg(repro.pid, signal.SIGKILL)  # dvc and the training, with no chance to clean up
    repro.wait()
    done = saved_epochs(project)
    assert 2 <= done < EPOCHS and not (project / "models/net4.pt").exists()

    resumed = run(project, "dvc", "repro", "train@net4")
    assert f"resuming after epoch {done}" in resumed.stdout
    assert_same_weights(weights(project), weights(uninterrupted))
    assert history(project).equals(history(uninterrupted))
    [resumed_run] = runs()
    assert resumed_run.info.status == "FINISHED"
    for key, points in reference_history.items():
        assert logged(resumed_run.info.run_id, key) == points, key  # every epoch once, same values
    # The kept epoch (train.keep: best) in the history, models/net4.json, MLflow and the stage's output.
    losses = history(project)["valid_loss"]
    kept_epoch = int(losses.idxmin()) + 1
    assert history(project)["kept_epoch"].iloc[-1] == kept_epoch
    assert json.loads((project / "models/net4.json").read_text())["kept_epoch"] == kept_epoch
    new_best = losses < losses.cummin().shift(fill_value=math.inf)
    assert history(project)["valid_loss_best"].tolist() == new_best.astype(float).tolist()
    assert resumed_run.data.metrics["kept_epoch"] == kept_epoch  # the last epoch's value: the kept one
    assert f"train net4: kept the weights of epoch {kept_epoch} (the lowest valid loss" in resumed.stdout
    assert not (project / "checkpoints/net4.pt").exists()


def test_a_second_training_of_a_net_stops_at_once_naming_the_orphan_that_trains_it(project):
    # Epochs enough that the orphan still trains while a second `dvc repro` starts, however loaded the machine.
    set_params(project, {"train.max_epochs": 60})
    repro = start(project, "dvc", "repro", "train@net4")
    wait_for_checkpoint(project, repro)
    holder = (project / "checkpoints/net4.lock").read_text().split()[1]
    os.kill(repro.pid, signal.SIGKILL)  # dvc alone: its training goes on, orphaned
    repro.wait()
    second = run(project, "dvc", "repro", "train@net4", check=False)
    assert second.returncode != 0
    [line] = [line for line in second.stderr.splitlines() if line.startswith("error: training")]
    assert line == (f"error: training net4 is already running: process {holder} "
                    f"(started {line.split('(started ')[1].split(')')[0]}) holds checkpoints/net4.lock")
    # The orphan, stopped as any training is, saved and logged its epochs undisturbed: one run, each epoch once.
    os.kill(int(holder), signal.SIGTERM)
    wait_for_release(project / "checkpoints/net4.lock")
    done = saved_epochs(project)
    [orphans_run] = runs()
    assert orphans_run.info.status == "KILLED" and done >= 2
    for key in orphans_run.data.metrics:
        assert_logged_once_up_to(done, [step for step, _ in logged(orphans_run.info.run_id, key)], key)


def assert_logged_once_up_to(saved: int, steps: list[int], key: str) -> None:
    """Every epoch the checkpoint keeps is logged, once. A stop that lands after an epoch's row joined the
    history but before the checkpoint copied it logs that epoch too: the resumed training computes it
    again, identically, and the run keeps the first (docs/training.md)."""
    assert steps in (list(range(1, saved + 1)), list(range(1, saved + 2))), (key, saved, steps)


def wait_for_release(lock):
    """Until no process holds the lock (the operating system releases it when its holder ends)."""
    deadline = time.monotonic() + 120
    with open(lock) as stream:
        while True:
            try:
                fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                assert time.monotonic() < deadline, f"{lock} still held after 2 minutes"
                time.sleep(0.1)


def test_a_full_disk_under_checkpoints_stops_the_training_in_one_line(project):
    result = run_with(project, [full_disk(project / "checkpoints")], sys.executable, "-m", "pipeline.train", "net4")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == "error: checkpoints/net4.pt: not written: No space left on device"
    [failed] = runs()
    assert failed.info.status == "FAILED"


def test_sigterm_saves_the_last_finished_epoch_and_marks_the_run_killed(project):
    set_params(project, {"checkpoint.interval_seconds": 3600})
    training = start(project, sys.executable, "-m", "pipeline.train", "net4")
    finished = 0
    while finished < 3:  # the plain per-epoch lines: "epoch 3/10 ..."
        line = training.stdout.readline()
        assert line, training.communicate()
        finished += line.startswith("epoch ")
    assert saved_epochs(project) == 0  # within the interval, nothing was written
    training.send_signal(signal.SIGTERM)
    out, err = training.communicate(timeout=60)
    assert training.returncode == 130, err
    # Whatever the interval, the stop wrote the last finished epoch and MLflow has every one, once.
    done = saved_epochs(project)
    finished += sum(line.startswith("epoch ") for line in out.splitlines())
    assert 3 <= done == finished < EPOCHS
    assert err.splitlines()[-1].startswith(f"error: train net4 interrupted in epoch {done + 1}; ")
    assert f"checkpoints/net4.pt keeps epochs 1-{done}: run the stage again" in err and "Traceback" not in err
    [killed] = runs()
    assert killed.info.status == "KILLED"
    keys = killed.data.metrics
    assert {"train_loss", "valid_loss", "learning_rate", "momentum"} <= set(keys)
    for key in keys:
        assert_logged_once_up_to(done, [step for step, _ in logged(killed.info.run_id, key)], key)

    resumed = train(project)
    assert f"resuming after epoch {done}" in resumed.stdout
    [same] = runs()
    assert same.info.run_id == killed.info.run_id and same.info.status == "FINISHED"
    for key in keys:
        assert [step for step, _ in logged(same.info.run_id, key)] == list(range(1, EPOCHS + 1)), key


def change_learning_rate(project):
    set_params(project, {"train.schedules.lr.start": 0.02})


def change_the_model_code(project):
    with (project / "pipeline/base/model.py").open("a") as source:
        source.write("\n# edited after the checkpoint was saved\n")


@pytest.mark.parametrize("change", [change_learning_rate, change_the_model_code])
def test_changed_params_or_code_train_afresh_instead_of_resuming(project, change):
    training = start(project, sys.executable, "-m", "pipeline.train", "net4")
    wait_for_checkpoint(project, training)
    training.send_signal(signal.SIGTERM)
    training.communicate(timeout=60)
    change(project)
    fresh = train(project)
    assert "training afresh" in fresh.stdout and "resuming" not in fresh.stdout
    statuses = {r.info.status: r for r in runs()}
    assert set(statuses) == {"KILLED", "FINISHED"}
    assert [step for step, _ in logged(statuses["FINISHED"].info.run_id)] == list(range(1, EPOCHS + 1))
    expected_rate = 0.02 if change is change_learning_rate else 0.03
    assert history(project)["learning_rate"].iloc[0] == pytest.approx(expected_rate)


def test_two_cpu_runs_give_identical_weights_and_histories(project, tmp_path):
    set_params(project, {"train.max_epochs": 3})
    train(project, "net5")
    first_weights, first_history = weights(project, "net5"), history(project, "net5")
    shutil.rmtree(project / "models")
    shutil.rmtree(project / "metrics")
    train(project, "net5")
    assert_same_weights(weights(project, "net5"), first_weights)
    assert history(project, "net5").equals(first_history)


def test_divergence_fails_the_run_and_writes_no_model(project):
    set_params(project, {"train.schedules.lr.start": 1.0e6, "train.schedules.lr.stop": 1.0e6})
    result = train(project, check=False)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith("error: training diverged in epoch 1")
    assert "Traceback" not in result.stderr
    [failed] = runs()
    assert failed.info.status == "FAILED"
    assert not (project / "models/net4.pt").exists() and not (project / "models/net4.json").exists()


def test_an_unreachable_tracking_store_fails_before_training(project, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    result = train(project, check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Connection refused" in result.stderr
    assert "epoch" not in result.stdout and not (project / "checkpoints/net4.pt").exists()


def test_bad_params_are_one_line_before_any_work(project, tmp_path):
    set_params(project, {"train.max_epochs": 0})
    result = train(project, check=False)
    assert (result.returncode, result.stderr) == (2, "error: params.yaml: train.max_epochs must be in 1..100_000, got 0\n")
    set_params(project, {"train.max_epochs": 2})
    text = (project / "params.yaml").read_text().replace("valid_fraction", "valid_fractoin")
    (project / "params.yaml").write_text(text)
    result = train(project, check=False)
    assert result.returncode == 2 and "did you mean train.valid_fraction?" in result.stderr
    assert not (tmp_path / "mlflow.db").exists()  # the tracking store was not even opened


def test_two_trainings_log_to_one_new_sqlite_store_at_once(project, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}")
    set_params(project, {"train.max_epochs": 8})
    trainings = [start(project, sys.executable, "-m", "pipeline.train", net) for net in ("net4", "net5")]
    for training in trainings:
        out, err = training.communicate(timeout=300)
        assert training.returncode == 0, err
        assert "locked" not in err
    for net in ("net4", "net5"):
        [finished] = runs(net)
        for key in metric_keys(project, net):
            assert [step for step, _ in logged(finished.info.run_id, key)] == list(range(1, 9)), (net, key)


def test_processes_creating_one_store_at_once_all_succeed(tmp_path, monkeypatch):
    """The race that breaks MLflow's own table creation: several processes on a store that does not exist."""
    store = tmp_path / "race" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    go = tmp_path / "go"
    script = (
        "import os, time\n"
        "from pipeline.tracking.store import connect\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
        "connect()\n"
    )
    racers = [subprocess.Popen([sys.executable, "-c", script], env=os.environ, stderr=subprocess.PIPE, text=True,
                               cwd=ROOT)
              for _ in range(4)]
    time.sleep(3)  # let every racer finish importing, so that they connect together
    go.touch()
    for racer in racers:
        _, err = racer.communicate(timeout=120)
        assert racer.returncode == 0, err
    assert mlflow.MlflowClient().get_experiment_by_name(EXPERIMENT) is not None


def test_torchrun_on_two_processes_trains_like_one_process(project, tmp_path):
    net = "net5"  # net4's training and the flips, split over the ranks
    set_params(project, {"train.max_epochs": 2})
    single = tmp_path / "single"
    shutil.copytree(project, single, symlinks=True)
    train(single, net)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    parallel = run(project, torchrun, "--standalone", "--nproc_per_node=2", "-m", "pipeline.train", net)
    assert "x 2 processes" in parallel.stdout
    distributed = [r for r in runs(net) if r.data.params["world_size"] == "2"]
    assert len(distributed) == 1 and distributed[0].info.status == "FINISHED"  # rank 1 logs nothing
    for key in ("train_loss", "valid_loss"):
        points = logged(distributed[0].info.run_id, key)
        assert [step for step, _ in points] == [1, 2] and all(math.isfinite(value) for _, value in points)
    # Same batches and flips, split over two ranks: only the order of float additions differs.
    together, alone = history(project, net), history(single, net)
    for key in ("train_loss", "valid_loss"):
        assert together[key].tolist() == pytest.approx(alone[key].tolist(), rel=1e-5), key
    for key, value in weights(single, net).items():
        assert torch.allclose(weights(project, net)[key], value, rtol=1e-4, atol=1e-6), key


def test_the_params_choose_the_kept_weights_and_early_stopping():
    config = default_config()
    assert (config.train.keep, config.train.patience) == ("best", 0)  # the seed protocol runs every epoch
    cpu = torch.device("cpu")
    best = build_trainer(config, "net4", cpu)
    assert best.keep_best and [type(c) for c in best.callbacks] == [KeepBest]
    last = build_trainer(dataclasses.replace(config, train=dataclasses.replace(config.train, keep="last", patience=50)),
                         "net4", cpu)
    [stopping] = last.callbacks
    assert not last.keep_best and isinstance(stopping, EarlyStopping) and stopping.patience == 50

    rows = [{"epoch": epoch, "valid_loss": loss, "valid_rmse_px": loss_to_rmse_px(loss), "kept_epoch": 1}
            for epoch, loss in enumerate([0.01, 0.04, 0.09], start=1)]
    assert kept_weights_line("net4", rows, dataclasses.replace(config.train, patience=2)) == (
        "train net4: kept the weights of epoch 1 (the lowest valid loss: valid loss 0.010000, 4.800 px); "
        "stopped early after epoch 3 of 90: 2 epochs without a new lowest valid loss")


def test_the_code_fingerprint_of_a_checkpoint_changes_with_the_stages_own_modules_only(tmp_path):
    """Editing predict.py keeps a resumable checkpoint; editing a module the training runs discards it."""
    project = make_project(tmp_path / "project", git=False)

    def fingerprint():
        return run(project, sys.executable, "-c",
                   "from pipeline.base.sources import code_hash; print(code_hash('pipeline.train'))").stdout

    before = fingerprint()
    for module, runs_in_training in (("predict.py", False), ("evaluate.py", False), ("training/optim.py", True)):
        with (project / "pipeline" / module).open("a") as source:
            source.write("\n# edited\n")
        after = fingerprint()
        assert (after != before) == runs_in_training, module
        before = after


# The tutorial's net6, with fewer epochs of its own than train.max_epochs.
NET6 = {"flip": True, "dropout": [0.1, 0.2, 0.3, 0.5], "max_epochs": EPOCHS - 2}


def test_kill_9_of_a_net_with_dropout_then_rerun_resumes_to_the_uninterrupted_result(project, tmp_path, monkeypatch):
    """Dropout draws from torch's global generator, which the checkpoint keeps: the resumed epochs draw
    the masks the uninterrupted ones drew. The net's own max_epochs is the one it trains and records."""
    set_params(project, {"nets.net6": NET6})
    uninterrupted = tmp_path / "uninterrupted"
    shutil.copytree(project, uninterrupted, symlinks=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'uninterrupted.db'}")
    train(uninterrupted, "net6")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'resumed.db'}")
    repro = start(project, "dvc", "repro", "train@net6")
    wait_for_checkpoint(project, repro, net="net6")
    os.killpg(repro.pid, signal.SIGKILL)
    repro.wait()
    done = saved_epochs(project, "net6")
    assert 2 <= done < NET6["max_epochs"] and not (project / "models/net6.pt").exists()

    resumed = run(project, "dvc", "repro", "train@net6")
    assert f"{NET6['max_epochs']} epochs, resuming after epoch {done}" in resumed.stdout
    assert_same_weights(weights(project, "net6"), weights(uninterrupted, "net6"))
    assert history(project, "net6").equals(history(uninterrupted, "net6"))
    assert len(history(project, "net6")) == NET6["max_epochs"]
    info = json.loads((project / "models/net6.json").read_text())
    assert info["config"]["train"]["max_epochs"] == NET6["max_epochs"] and info["config"]["nets"]["net6"] == NET6
    [resumed_run] = runs("net6")
    params = resumed_run.data.params
    assert (params["train.max_epochs"], params["hidden"], params["dropout"]) == ("8", "500", "[0.1, 0.2, 0.3, 0.5]")


def test_dropout_is_on_in_training_steps_and_off_in_validation():
    config = default_config()
    net6 = NetConfig(flip=True, dropout=(0.1, 0.2, 0.3, 0.5))
    config = dataclasses.replace(config, nets={**config.nets, "net6": net6})
    trainer = build_trainer(config, "net6", torch.device("cpu"))
    valid = data(32, seed=1)
    trainer.model.train()
    with torch.no_grad():
        assert not torch.equal(trainer.model(valid.images), trainer.model(valid.images))
    losses = [run_epoch(trainer, valid, train=False) for _ in range(2)]
    assert not trainer.model.training and torch.equal(*losses)
    torch.manual_seed(0)  # evaluation mode draws nothing: the same loss whatever the generator's state
    with torch.no_grad():
        expected = F.mse_loss(trainer.model(valid.images), valid.targets)
    torch.testing.assert_close(losses[0], expected)


def test_a_nets_own_max_epochs_and_patience_replace_trains_for_it_alone():
    config = default_config()
    net7 = NetConfig(flip=True, dropout=(0.1, 0.2, 0.3, 0.5), hidden=1000, max_epochs=3000, patience=200)
    config = dataclasses.replace(config, nets={**config.nets, "net7": net7})
    cpu = torch.device("cpu")
    trainer = build_trainer(config, "net7", cpu)
    assert trainer.max_epochs == 3000 and callback_of(trainer, EarlyStopping).patience == 200
    assert trainer.network.hidden == 1000
    seed = build_trainer(config, "net4", cpu)
    assert seed.max_epochs == config.train.max_epochs and not any(isinstance(c, EarlyStopping) for c in seed.callbacks)


@pytest.fixture(scope="module")
def prepared_for_memory(tmp_path_factory):
    """Enough faces for a batch of 700 (about 3 GB of activations in a training step), and net6 with
    dense layers of 20,000 (710 million parameters)."""
    project = make_project(tmp_path_factory.mktemp("memory") / "project", {
        "synthetic.n_faces": 1500, "train.max_epochs": 1,
        "nets": {"net4": {"flip": False}, "net6": {"flip": False, "hidden": 20_000}},
    }, git=False)
    run(project, sys.executable, "-m", "pipeline.synthesize")
    run(project, sys.executable, "-m", "pipeline.prepare")
    return project


def train_within(project, kilobytes, net, *changes):
    for change in changes:
        set_params(project, change)
    return run(project, "bash", "-c", f"ulimit -v {kilobytes}; exec {sys.executable} -m pipeline.train {net}",
               check=False)


@pytest.mark.slow  # trainings in processes of their own, under real memory limits
def test_out_of_memory_in_training_is_one_line_naming_the_knobs(prepared_for_memory):
    """Under `ulimit -v` the first training step printed a 66-line traceback."""
    failed = train_within(prepared_for_memory, 2_500_000, "net4", {"train.batch_size": 1000})
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert failed.stderr.splitlines()[-1] == ("error: train: out of memory: lower train.batch_size, or "
                                              "nets.<net>.hidden, or free memory (other programs, ulimit -v)")
    assert not (prepared_for_memory / "models" / "net4.pt").exists()
    trained = train_within(prepared_for_memory, 2_500_000, "net4", {"train.batch_size": 64})
    assert trained.returncode == 0, trained.stderr  # the same limit holds a smaller batch


@pytest.mark.slow  # a training in a process of its own, under a real memory limit
def test_a_net_whose_parameters_cannot_fit_is_refused_before_any_work_naming_its_hidden(prepared_for_memory):
    """nets.net6.hidden: 10000000 started training and died with a 25-line traceback (620 GB asked)."""
    before = sorted(prepared_for_memory.rglob("*"))
    refused = train_within(prepared_for_memory, 4_000_000, "net6")
    assert refused.returncode == 2
    assert refused.stderr == ("error: nets.net6.hidden: 20000 makes a net of 710,441,502 parameters, and training it "
                              "needs 34.1 GB for them (12 copies), more than the 4.1 GB of memory this process may use: "
                              "use a smaller hidden\n")
    assert sorted(prepared_for_memory.rglob("*")) == before  # no lock, checkpoint or run
